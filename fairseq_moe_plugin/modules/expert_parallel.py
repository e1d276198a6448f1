"""Expert parallelism over ``torch.distributed``: the experts of every MoE layer are sharded over
groups of P ranks, and tokens travel to their experts' rank and back by all-to-all.

Layout, for W ranks and P | W (ranks counted in the global group):

- **expert-parallel groups** ``{g*P, ..., g*P + P-1}``: together they hold all E experts, rank
  ``i`` of a group the E/P experts ``[i*E/P, (i+1)*E/P)``; tokens are exchanged inside a group;
- **replica groups** ``{i, i+P, i+2P, ...}``: the W/P copies of one shard; their gradients are
  summed (``expert_parallel_training.py``), as data parallelism does for every other parameter.

Dispatch (``expert_parallel_ffn``), per MoE layer and forward, for the M kept (token, expert)
assignments of this rank sorted by global expert (``DispatchPlan``):

1. the per-expert counts are exchanged (``all_gather`` of E integers), so every rank knows how
   many rows it receives from each peer for each of its experts;
2. the rows (M x C, padding never included) go to their experts' ranks with a variable-size
   ``all_to_all_single`` (gloo and NCCL both take uneven splits in this form);
3. the local experts run on what arrived, grouped by local expert: today's grouped FFN (in
   eval mode, on each peer's rows apart, on the path ``grouped_gemm.pick_impl`` picks for that
   peer's whole batch: every expert then multiplies exactly the rows one process holding all
   experts multiplies for that batch, the same way, so generation gives the same bits);
4. the outputs go back by the reverse exchange, arrive in the order they were sent, and each token
   sums its k weighted outputs, exactly as one process holding all experts would.

The backward of each exchange is the reverse exchange (``_AllToAll``). torch's own differentiable
``torch.distributed.nn.functional.all_to_all_single`` is deprecated in torch 2.13 and its
replacement is private, hence the ten lines of ``_AllToAll``.

Plain torch; no fairseq.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import DispatchPlan, combine
from .grouped_gemm import RoutingCounts


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the expert-parallel layout."""

    size: int  # P, ranks sharing one copy of the experts
    rank: int  # this rank's index in its expert-parallel group
    world_size: int  # W, all data-parallel ranks
    group: object  # the expert-parallel process group (P ranks)
    replica_group: object  # the ranks holding the same shard (W / P ranks)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.size


_GROUPS: dict[int, ExpertParallelGroups] = {}


def expert_parallel_groups(size: int) -> ExpertParallelGroups | None:
    """The groups for expert-parallel size ``size`` (built once per process, by every rank: a
    collective call). None when ``size`` is 1 or the process is not distributed.

    Raises ValueError when the world size is not a multiple of ``size``.
    """
    if size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    if size in _GROUPS:
        return _GROUPS[size]
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(
            f"--moe-expert-parallel-size {size} must divide the number of processes "
            f"(--distributed-world-size) {world}"
        )
    ep_group = replica_group = None
    for g in range(world // size):  # every rank creates every group, in the same order
        ranks = list(range(g * size, (g + 1) * size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for i in range(size):
        ranks = list(range(i, world, size))
        group = dist.new_group(ranks)
        if rank in ranks:
            replica_group = group
    _GROUPS[size] = ExpertParallelGroups(size, rank % size, world, ep_group, replica_group)
    return _GROUPS[size]


def forget_expert_parallel_groups() -> None:
    """Drop the cached layouts (their process groups end with ``destroy_process_group``)."""
    _GROUPS.clear()


def active_expert_parallel_groups() -> ExpertParallelGroups | None:
    """The layout of the sharded experts built in this process, or None when there are none."""
    if len(_GROUPS) > 1:
        raise RuntimeError(
            f"this process built experts sharded in several layouts ({sorted(_GROUPS)}); one "
            "--moe-expert-parallel-size per process is supported"
        )
    return next(iter(_GROUPS.values()), None)


_LOCAL_STATE = contextvars.ContextVar("fairseq_moe_local_expert_state", default=False)


@contextlib.contextmanager
def local_expert_state():
    """Inside this context, state dicts of sharded experts (the model's and the optimizer's) hold
    each process's own rows instead of gathering the full stacks: what a sharded checkpoint
    writes, every process its own part."""
    token = _LOCAL_STATE.set(True)
    try:
        yield
    finally:
        _LOCAL_STATE.reset(token)


def gathers_expert_state() -> bool:
    """Whether state dicts gather the expert shards into full stacks (outside
    ``local_expert_state``)."""
    return not _LOCAL_STATE.get()


class _AllToAll(torch.autograd.Function):
    """Rows to peers: ``send_splits[i]`` rows go to rank i of ``group``, ``recv_splits[i]`` come
    from it. Backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, rows, recv_splits, send_splits, group):  # rows: sum(send) x C
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])  # sum(recv) x C
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        recv_splits, send_splits = ctx.splits
        grad = grad_out.new_empty(sum(send_splits), *grad_out.shape[1:])
        dist.all_to_all_single(
            grad, grad_out.contiguous(), send_splits, recv_splits, group=ctx.group
        )
        return grad, None, None, None


def all_to_all(rows: torch.Tensor, recv_splits, send_splits, group) -> torch.Tensor:
    """Differentiable variable-size all-to-all of rows (see ``_AllToAll``)."""
    return _AllToAll.apply(rows, list(recv_splits), list(send_splits), group)


def _local_experts(experts, rows: torch.Tensor, local_expert: torch.Tensor, decide_on=None):
    """This rank's experts on ``rows`` (R x C), row r going to local expert ``local_expert[r]``
    (grouped by expert); R x C, each row its expert's output."""
    keep = torch.ones_like(local_expert, dtype=torch.bool).unsqueeze(1)  # R x 1
    plan = DispatchPlan.from_routing(local_expert.unsqueeze(1), keep, experts.num_local_experts)
    return experts(rows, plan, decide_on=decide_on)


def expert_parallel_ffn(
    tokens: torch.Tensor,
    plan: DispatchPlan,
    weight: torch.Tensor,
    experts,
    groups: ExpertParallelGroups,
) -> torch.Tensor:
    """The sharded experts on this rank's tokens (the module doc's steps 1-4).

    Args:
        tokens: N x C, this rank's non-padding tokens.
        plan: their kept assignments sorted by global expert (E entries).
        weight: N x k combine weights (0 where dropped).
        experts: this rank's ``StackedExperts`` shard (E/P local experts).
        groups: the expert-parallel layout.
    Returns:
        N x C: row t is ``sum_j weight[t, j] * expert_{e_tj}(tokens[t])`` over t's kept choices.
    """
    num_local, size = experts.num_local_experts, groups.size
    counts = plan.counts  # E, on the tokens' device; gloo exchanges host tensors
    if groups.group is None or dist.get_backend(groups.group) != "nccl":
        counts = counts.cpu()
    gathered = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(gathered, counts, group=groups.group)  # 1.
    all_counts = torch.stack(gathered)  # P x E: every peer's routing
    first = groups.rank * num_local
    recv_by_peer = all_counts[:, first : first + num_local]  # P x E/P, for the local experts
    send_splits = counts.view(size, num_local).sum(1).tolist()
    recv_splits = recv_by_peer.sum(1).tolist()

    rows = tokens.index_select(0, plan.token_index)  # M x C, grouped by destination rank
    received = all_to_all(rows, recv_splits, send_splits, groups.group)  # 2. R x C
    local_expert = torch.repeat_interleave(  # R: each received row's local expert
        torch.arange(num_local, device=tokens.device).repeat(size),
        recv_by_peer.reshape(-1).to(tokens.device),
    )
    if experts.training:
        out = _local_experts(experts, received, local_expert)  # 3. R x C, row r: its expert's
    else:  # eval: each peer's rows apart, on the path its whole batch's routing picks
        peer_counts = all_counts.tolist()
        out = torch.cat([
            _local_experts(experts, chunk, index, RoutingCounts(peer_counts[p], sum(peer_counts[p])))
            for p, (chunk, index) in enumerate(zip(received.split(recv_splits),
                                                   local_expert.split(recv_splits), strict=True))
        ])  # fmt: skip
    back = all_to_all(out, send_splits, recv_splits, groups.group)  # 4. M x C, as sent

    back = torch.cat([back, back.new_zeros(1, back.shape[1])])  # row M: the dropped choices
    # the combine of one process holding every expert (the same operations, so the same bits)
    return combine(back, plan.combine_index, weight.to(back.dtype), inplace=False)  # N x C
