"""Expert-parallel inference when processes do different amounts of work: every process keeps
joining the experts' exchanges, with no tokens, until all are done.

At inference each process works on its own sentences: it encodes its batch, then beam search
decodes one step at a time and stops after its own number of steps; one process may be done
with its sentences while another still decodes. But every forward of an MoE layer with sharded
experts is a collective (its all-to-all exchanges need every process of the expert-parallel
group), and processes must make the same exchanges in the same order.

So in eval mode every forward of a *stack* (an encoder or a decoder: the modules whose forward
runs MoE layers, each with an id given in construction order, the same on every process) is a
round (``run_stack``):

1. the processes of the group all-reduce (MAX) the id of the stack each wants to run;
2. those that want the chosen stack run it; the others join each of its MoE layers' exchanges
   with no tokens (``join_exchanges``: they still serve their experts to the others), and go
   back to 1.

``finish`` asks for nothing (0) until every process of the group does: a process calls it when
it has no forward left to run (the end of a validation step, of fairseq-generate). A decoder is
built after its encoder and so has the larger id: the processes still decoding finish their
batch while the others wait in its exchanges, then all encode their next batch together. In
each round the processes that asked for the chosen stack make progress, so the rounds end when
the work does; one all-reduce of one integer per stack forward is the cost. Training needs none
of this (every process runs the same forwards), and takes no round.

Plain torch; no fairseq.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .dispatch import DispatchPlan
from .expert_parallel import ExpertParallelGroups, expert_parallel_ffn

_STACKS: list[weakref.ref] = []  # id - 1 -> the stack's list of MoE layers with sharded experts


def register_stack(moe_layers: list) -> tuple[int, list] | None:
    """``(round id, layers)`` for a stack whose forward runs ``moe_layers`` (in that order),
    ``layers`` being those with sharded experts, which the stack must keep (the registry holds
    them weakly); None when none of them has sharded experts (no round needed)."""
    sharded = [m for m in moe_layers if getattr(m.experts, "expert_parallel", None) is not None]
    if not sharded:
        return None
    holder = _LayerList(sharded)
    _STACKS.append(weakref.ref(holder))
    return len(_STACKS), holder


class _LayerList(list):
    """A list that a weak reference can point to (the stack keeps it alive)."""


def _agree(want: int, groups: ExpertParallelGroups) -> int:
    device = "cpu"
    if dist.get_backend(groups.group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([want], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=groups.group)
    return int(value.item())


def join_exchanges(moe_layers: list) -> None:
    """Take part in every exchange of ``moe_layers``' forwards with no tokens of one's own,
    computing the rows the others send to this process's experts."""
    for layer in moe_layers:
        experts = layer.experts
        width = experts.d_model
        weight = experts.fc1_weight
        tokens = weight.new_zeros(0, width)  # 0 x C
        k = getattr(layer.gate, "k", 1)
        index = torch.zeros(0, k, dtype=torch.long, device=weight.device)  # 0 x k
        plan = DispatchPlan.from_routing(index, None, experts.num_experts)
        with torch.no_grad():
            expert_parallel_ffn(tokens, plan, weight.new_zeros(0, k), experts,
                                experts.expert_parallel)  # fmt: skip


def _layers(stack_id: int) -> list:
    layers = _STACKS[stack_id - 1]()
    if layers is None:
        raise RuntimeError(f"expert-parallel round for stack {stack_id}, which no longer exists")
    return layers


def run_stack(stack_id: int, groups: ExpertParallelGroups, forward):
    """``forward()`` of stack ``stack_id`` once every process of the group runs it (the module
    doc's round); until then, join the rounds of the stacks the others run."""
    while True:
        chosen = _agree(stack_id, groups)
        if chosen == stack_id:
            return forward()
        join_exchanges(_layers(chosen))


def finish(groups: ExpertParallelGroups | None) -> None:
    """Join the others' rounds until every process of the group has nothing left to run."""
    if groups is None or groups.group is None:
        return
    while (chosen := _agree(0, groups)) != 0:
        join_exchanges(_layers(chosen))
