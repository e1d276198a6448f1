"""The grouped-GEMM ways to compute E stacked FFN experts on a ``DispatchPlan`` (torch's grouped
GEMM, and a padded batched GEMM for small inference batches), and the rule that picks one of
them or the per-expert loop (``expert_loop.py``).

Every path computes the same function, ``y[t] = sum_j weight[t, j] * fc2_e(act(fc1_e(x[t])))``
over t's kept choices j (``expert_loop.grouped_expert_ffn`` documents it), and the tests check
each against the naive per-token loop. What differs is how the matrix products are issued:

- ``loop``: ``expert_loop``'s per-expert matmuls with its hand-written backward (reused
  gradient buffers, no E x F x C zero gradient per expert). The CPU training path, and the one
  used where nothing else applies. It reads the tokens per expert on the host.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` over the expert-sorted rows, two calls per
  forward, differentiated by torch's own grouped GEMM backward. No host sync (the group offsets
  stay on the device), so a GPU step never waits for the router. torch's CUDA kernel takes bf16
  on SM >= 80; it also runs on CPU, where it is not faster than ``loop`` (README, performance).
- ``padded``: for inference on few tokens (a decoding step). The rows are laid out in an
  ``E x cap`` grid (``cap`` the largest expert's rows, the rest zero) and each FFN is one
  ``baddbmm`` over all experts. On CPU one batched call streams each expert's weights once on
  one thread, where E small matmuls each split their few rows over the threads and pay a fixed
  cost per call; it wastes the padded rows' FLOPs, so it is used only where the grid is small
  (``use_padded``).

What this adds to ``torch.nn.functional.grouped_mm`` itself: the choice per call, and a
small-batch inference path for CPUs, which torch's CPU grouped GEMM does not speed up.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .activations import activate
from .dispatch import DispatchPlan, combine, scatter_combine

IMPLS = ("auto", "loop", "grouped_mm", "padded")

# ``padded`` is used when every expert has rows (so that it reads no weights the loop would not:
# a decoding step's weights come from memory, not cache, and an expert that no token chose would
# cost its full weight read for nothing), the grid holds at most this many rows per expert, and
# at most this many times the real rows. Measured on 2 AMD EPYC cores, fp32, E=8, k=2, d=256,
# d_ff=1024, random routing, ms per forward with the weights in cache (loop / padded): N=5
# 0.43/0.29, N=10 0.72/0.42, N=40 1.15/0.90, N=160 2.61/2.41, N=320 4.20/4.22, N=640 7.6/9.1.
# In beam search on a trained router (batch 1, beam 5: 10 assignments) some experts get no
# rows; there a padded step took 0.44 ms per baddbmm against 0.07 ms per expert matmul, which
# is why an expert without rows rules it out.
PADDED_MAX_ROWS_PER_EXPERT = 64
PADDED_MAX_WASTE = 3.0


def grouped_mm_available() -> bool:
    """Whether this torch has a grouped GEMM (``F.grouped_mm``, or ``torch._grouped_mm``)."""
    return _grouped_mm_op() is not None


def _grouped_mm_op():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` has a kernel for x: fp32 on CPU, bf16 on CUDA (torch's kernels)."""
    if not grouped_mm_available():
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    return x.device.type == "cuda" and x.dtype == torch.bfloat16


def use_padded(plan: DispatchPlan) -> bool:
    """The crossover above: every expert has rows, few of them, and the grid is not much larger
    than the rows."""
    rows = plan.num_rows
    if rows == 0 or min(plan.tokens_per_expert) == 0:
        return False
    cap = max(plan.tokens_per_expert)
    grid = cap * len(plan.tokens_per_expert)
    return cap <= PADDED_MAX_ROWS_PER_EXPERT and grid <= PADDED_MAX_WASTE * rows


class RoutingCounts(NamedTuple):
    """What ``use_padded`` reads of a plan: the rows of each expert, and their sum."""

    tokens_per_expert: list[int]
    num_rows: int


def pick_impl(requested: str, x: torch.Tensor, plan, inference: bool, decide_on=None) -> str:
    """The path for one call: ``requested`` unless it is ``auto``, then ``grouped_mm`` on a GPU
    that supports it, ``padded`` for CPU inference on a small grid, else ``loop``. ``inference``:
    no autograd and no activation dropout (what ``padded`` computes). ``decide_on`` (a plan or
    ``RoutingCounts``; default ``plan``): the routing whose counts decide ``auto``; expert
    parallelism passes the whole batch's, so that a shard computes a peer's rows with the path
    one process holding every expert takes for that batch."""
    if requested not in IMPLS:
        raise ValueError(f"unknown expert implementation {requested!r}; expected one of {IMPLS}")
    if requested == "padded" and not inference:
        raise ValueError(
            "the padded expert implementation is for inference only (no autograd, no "
            "activation dropout)"
        )
    if requested == "grouped_mm" and not grouped_mm_supported(x):
        raise ValueError(
            f"grouped_mm has no kernel for {x.dtype} on {x.device.type} in torch "
            f"{torch.__version__} (it needs CPU, or CUDA with bfloat16)"
        )
    if requested != "auto":
        return requested
    if x.device.type != "cpu":
        return "grouped_mm" if grouped_mm_supported(x) else "loop"
    if inference and use_padded(plan if decide_on is None else decide_on):
        return "padded"
    return "loop"


def grouped_mm_ffn(
    x: torch.Tensor,  # N x C
    plan: DispatchPlan,
    weight: torch.Tensor | None,  # N x k combine weights; None: 1
    fc1_weight: torch.Tensor,  # E x F x C
    fc1_bias: torch.Tensor,  # E x F
    fc2_weight: torch.Tensor,  # E x C x F
    fc2_bias: torch.Tensor,  # E x C
    activation: str,
    dropout_p: float,  # 0 outside training
) -> torch.Tensor:
    """The experts as two grouped GEMMs over the expert-sorted rows, combined by a weighted
    scatter-add; differentiable by autograd. No host sync, and as few ops as the reference
    (``fairseq-moe-count-ops``): the biases are gathered by each row's expert, which needs no
    counts."""
    grouped_mm = _grouped_mm_op()
    rows = x.index_select(0, plan.token_index)  # M x C, sorted by expert
    h = grouped_mm(rows, fc1_weight.transpose(1, 2), offs=plan.offsets)  # M x F
    h = h + fc1_bias.index_select(0, plan.sorted_expert)
    h = activate(activation, h)[0]
    if dropout_p > 0:
        h = F.dropout(h, p=dropout_p, training=True)
    out = grouped_mm(h, fc2_weight.transpose(1, 2), offs=plan.offsets)  # M x C
    out = out + fc2_bias.index_select(0, plan.sorted_expert)
    return scatter_combine(out, plan, weight)  # N x C


@torch.no_grad()
def padded_ffn(
    x: torch.Tensor,  # N x C
    plan: DispatchPlan,
    weight: torch.Tensor | None,  # N x k
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    activation: str,
    cap: int | None = None,
) -> torch.Tensor:
    """Inference: the experts as two ``baddbmm`` over an ``E x cap`` grid of rows (``cap``:
    default the most rows an expert has; expert parallelism passes the whole batch's, so that a
    shard multiplies the grid one process would)."""
    counts = plan.tokens_per_expert
    num_experts, rows = len(counts), plan.num_rows
    cap = max(counts, default=0) if cap is None else max(cap, max(counts, default=0))
    expert = plan.sorted_expert  # M: each sorted row's expert
    first = plan.offsets - plan.counts  # E: each expert's first sorted row
    slot = expert * cap + (torch.arange(rows, device=x.device) - first[expert])  # M, in the grid
    grid = x.new_zeros(num_experts * cap, x.shape[1])  # (E*cap) x C
    grid.index_copy_(0, slot, x.index_select(0, plan.token_index))
    h = torch.baddbmm(
        fc1_bias.unsqueeze(1), grid.view(num_experts, cap, -1), fc1_weight.transpose(1, 2)
    )  # E x cap x F
    h = activate(activation, h)[0]
    out = torch.baddbmm(fc2_bias.unsqueeze(1), h, fc2_weight.transpose(1, 2))  # E x cap x C
    sorted_out = x.new_empty(rows + 1, out.shape[2])  # (M+1) x C, row M zero (dropped)
    sorted_out[rows].zero_()
    torch.index_select(out.view(num_experts * cap, -1), 0, slot, out=sorted_out[:rows])
    return combine(sorted_out, plan.combine_index, weight)
