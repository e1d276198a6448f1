"""From the router's choices to the experts' rows and back, what every expert kind shares.

Rows are flattened tokens throughout: ``N`` tokens, ``k`` choices per token, ``M`` kept
(token, choice) assignments sorted by expert, ``E`` experts, ``C`` = d_model.

- ``DispatchPlan``: the kept assignments sorted by expert (``counts[e]`` consecutive rows go to
  expert e), the token of each row, and the inverse map each choice takes back;
- ``check_plan``: the plan, the tokens and the combine weights agree with the experts held here;
- ``cast_once``: the tokens, the combine weights and the expert parameters in the compute dtype;
- ``expert_slices``: the (expert, first row, end row) of every expert that received rows;
- ``combine``: each token's weighted sum of its rows through the inverse map, dropped choices
  adding nothing; ``scatter_combine``: the same sum as a weighted scatter-add of the rows (five
  ops, no inverse map: what the grouped-GEMM path uses).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class DispatchPlan:
    """Where each kept (token, choice) assignment is computed, and the way back.

    Rows ``offsets[e-1]:offsets[e]`` (``counts[e]`` consecutive rows) go to expert e. The plan is
    built on the tokens' device without a host sync, in three ops (a sort, and a search of the
    sorted experts for each expert's end row); what only some paths read is derived on first
    access: the counts, the inverse map ``combine_index`` (the per-expert loop and the padded
    path combine through it; the grouped-GEMM path scatter-adds instead), and
    ``tokens_per_expert`` (the counts as host ints, which a loop over experts needs; one sync).
    """

    order: torch.Tensor  # M flat assignment ids (token * k + choice), by expert
    sorted_expert: torch.Tensor  # M long: the expert of each row (non-decreasing)
    offsets: torch.Tensor  # E int32: the end row of each expert's rows (cumulative counts)
    num_tokens: int  # N
    k: int  # choices per token

    @classmethod
    def from_routing(
        cls, expert_index: torch.Tensor, keep: torch.Tensor | None, num_experts: int
    ) -> DispatchPlan:
        """From the router's N x k chosen experts and N x k keep mask (False: dropped; None:
        every assignment is kept)."""
        num_tokens, k = expert_index.shape
        expert_flat = expert_index.reshape(-1)  # (N*k), token-major
        if keep is None:
            sorted_expert, order = torch.sort(expert_flat, stable=True)  # M = N*k, by expert
        else:
            kept = keep.reshape(-1).nonzero().squeeze(1)  # M
            sorted_expert, by_expert = torch.sort(expert_flat[kept], stable=True)
            order = kept[by_expert]  # M, grouped by expert
        offsets = torch.searchsorted(
            sorted_expert, _expert_ids(num_experts, sorted_expert.device), right=True,
            out_int32=True,
        )  # fmt: skip
        return cls(order, sorted_expert, offsets, num_tokens, k)

    @cached_property
    def token_index(self) -> torch.Tensor:
        """M long: the token of each row (``order // k``)."""
        return torch.div(self.order, self.k, rounding_mode="floor")

    @cached_property
    def counts(self) -> torch.Tensor:
        """E long: the rows of each expert, summing to M."""
        offsets = self.offsets.long()
        return torch.diff(offsets, prepend=offsets.new_zeros(1))

    @cached_property
    def combine_index(self) -> torch.Tensor:
        """N x k: each choice's row; M (the zero row the combining paths append) where dropped."""
        rows = self.num_rows
        index = self.order.new_full((self.num_tokens * self.k,), rows)  # (N*k)
        index[self.order] = torch.arange(rows, device=self.order.device)
        return index.view(self.num_tokens, self.k)

    @cached_property
    def tokens_per_expert(self) -> list[int]:
        """``counts`` as E host ints (a host sync on an accelerator, once per plan)."""
        ends = self.offsets.tolist()
        return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    @property
    def num_experts(self) -> int:
        return self.offsets.numel()


@functools.lru_cache(maxsize=64)
def _expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    """``arange(E)`` on ``device``, made once per (E, device): the plan searches for it."""
    return torch.arange(num_experts, device=device)


def check_plan(
    plan: DispatchPlan, x: torch.Tensor, weight: torch.Tensor | None, num_experts: int
) -> None:
    """ValueError unless ``plan`` has one count per expert held here (``num_experts``) and
    covers the N tokens of ``x`` (N x C), and ``weight`` (N x k combine weights) matches it."""
    num_tokens, k = plan.num_tokens, plan.k
    if plan.num_experts != num_experts or num_tokens != x.shape[0]:
        raise ValueError(
            f"the plan's tokens_per_expert must have {num_experts} entries (one per expert held "
            f"here) and cover the {x.shape[0]} tokens of x; it has {plan.num_experts} "
            f"entries for {num_tokens} tokens"
        )
    if weight is not None and weight.shape != (num_tokens, k):
        raise ValueError(
            f"combine weights must have shape {(num_tokens, k)}, got {tuple(weight.shape)}"
        )


def cast_once(
    x: torch.Tensor, weight: torch.Tensor | None, params: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """x, the combine weights and the expert parameters in the experts' compute dtype: the
    autocast dtype under autocast (cast once here, where autocast would cast op by op, each
    expert's slice again), else the parameters' dtype. The caller then computes with autocast
    off."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        params = tuple(_to(p, dtype) for p in params)
    else:
        dtype = params[0].dtype
    return _to(x, dtype), (None if weight is None else _to(weight, dtype)), params


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without dispatching a cast when it already is (one op less)."""
    return t if t.dtype == dtype else t.to(dtype)


def combine(
    rows: torch.Tensor,
    combine_index: torch.Tensor,
    weight: torch.Tensor | None,
    inplace: bool = True,
) -> torch.Tensor:
    """y[t] = sum_j weight[t, j] * rows[combine_index[t, j]]: (M+1) x C rows -> N x C.

    The last row of ``rows`` is zero, so dropped choices (index M) add nothing. ``inplace``
    accumulates into the first gathered rows (no autograd); False builds new tensors, so that
    autograd can differentiate it."""
    y = rows.index_select(0, combine_index[:, 0])  # N x C
    if weight is not None:
        y = y.mul_(weight[:, :1]) if inplace else y * weight[:, :1]
    for j in range(1, combine_index.shape[1]):
        part = rows.index_select(0, combine_index[:, j])  # N x C
        if weight is None:
            y = y.add_(part) if inplace else y + part
        elif inplace:
            y = y.addcmul_(part, weight[:, j : j + 1])
        else:
            y = torch.addcmul(y, part, weight[:, j : j + 1])
    return y


def scatter_combine(
    rows: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None
) -> torch.Tensor:
    """y[t] = sum over t's rows m of weight(m) * rows[m]: M x C rows (in plan order) -> N x C.

    Differentiable (autograd's own backward of the gather, the product and the scatter-add); a
    token with no kept row gets zero. The sum over a token's k rows is a scatter-add, which on
    CUDA adds in no fixed order for k >= 3 (exact for k <= 2: 0 + a + b = 0 + b + a)."""
    if weight is not None:
        rows = rows * torch.take(weight, plan.order).unsqueeze(1)  # M x C, weighted
    y = rows.new_zeros(plan.num_tokens, rows.shape[1])  # N x C
    return y.index_add_(0, plan.token_index, rows)


def expert_slices(plan: DispatchPlan):
    """(expert, first row, end row) of every expert that received rows, in order."""
    start = 0
    for e, count in enumerate(plan.tokens_per_expert):
        if count:
            yield e, start, start + count
            start += count
