"""From the router's choices to the experts' rows and back, what every expert kind shares.

Rows are flattened tokens throughout: ``N`` tokens, ``k`` choices per token, ``M`` kept
(token, choice) assignments sorted by expert, ``E`` experts, ``C`` = d_model.

- ``DispatchPlan``: the kept assignments sorted by expert (``counts[e]`` consecutive rows go to
  expert e), the token of each row, and the inverse map each choice takes back;
- ``check_plan``: the plan, the tokens and the combine weights agree with the experts held here;
- ``cast_once``: the tokens, the combine weights and the expert parameters in the compute dtype;
- ``expert_slices``: the (expert, first row, end row) of every expert that received rows;
- ``combine``: each token's weighted sum of its rows, dropped choices adding nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .routing.losses import expert_counts


@dataclass
class DispatchPlan:
    """Where each kept (token, choice) assignment is computed, and the way back.

    ``counts[e]`` consecutive rows go to expert e. The plan is built on the tokens' device
    without a host sync; ``tokens_per_expert`` (the counts as host ints, which a loop over
    experts needs) syncs once, on first access.
    """

    counts: torch.Tensor  # E long: rows of each expert, summing to M
    order: torch.Tensor  # M flat assignment ids (token * k + choice), by expert
    token_index: torch.Tensor  # M, the token of each row (order // k)
    combine_index: torch.Tensor  # N x k, each choice's row; M where dropped

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
        rows = order.numel()
        combine_index = torch.full_like(expert_flat, rows)  # (N*k), M = the zero row
        combine_index[order] = torch.arange(rows, device=order.device)
        return cls(
            counts=expert_counts(sorted_expert, num_experts),
            order=order,
            token_index=torch.div(order, k, rounding_mode="floor"),
            combine_index=combine_index.view(num_tokens, k),
        )

    @cached_property
    def tokens_per_expert(self) -> list[int]:
        """``counts`` as E host ints (a host sync on an accelerator, once per plan)."""
        return self.counts.tolist()

    @property
    def num_rows(self) -> int:
        return self.order.numel()


def check_plan(
    plan: DispatchPlan, x: torch.Tensor, weight: torch.Tensor | None, num_experts: int
) -> None:
    """ValueError unless ``plan`` has one count per expert held here (``num_experts``) and
    covers the N tokens of ``x`` (N x C), and ``weight`` (N x k combine weights) matches it."""
    num_tokens, k = plan.combine_index.shape
    if plan.counts.numel() != num_experts or num_tokens != x.shape[0]:
        raise ValueError(
            f"the plan's tokens_per_expert must have {num_experts} entries (one per expert held "
            f"here) and cover the {x.shape[0]} tokens of x; it has {plan.counts.numel()} "
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
        params = tuple(p.to(dtype) for p in params)
    else:
        dtype = params[0].dtype
    return x.to(dtype), (None if weight is None else weight.to(dtype)), params


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


def expert_slices(plan: DispatchPlan):
    """(expert, first row, end row) of every expert that received rows, in order."""
    start = 0
    for e, count in enumerate(plan.tokens_per_expert):
        if count:
            yield e, start, start + count
            start += count
