"""Capacity: how many assignments an expert may compute, and which it keeps when that binds.

Capacity policy (documented, deterministic). When ``capacity = ceil(capacity_factor * k * N / E)``
binds, each expert keeps the assignments with the best priority and drops the rest, where the
priority orders assignments by

1. choice rank (all first choices before any second choice, ...), as in batch-prioritised
   routing (Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of Experts", sec. 4.1) and
   fairseq's nllb top-2 gate;
2. then gate probability, highest first;
3. then token position in the flattened batch, first first (ties only).

So the kept set never depends on a random draw, and a token that an expert values most is the
last to be dropped. A capacity factor <= 0 means dropless: nothing is ever dropped. The
``random`` priority (``random_keep_mask``) is the ablation the papers compare against.

Tokens are flattened: ``N`` non-padding tokens, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import math

import torch

from .losses import expert_counts

CAPACITY_PRIORITIES = ("rank_prob", "random")


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * k * num_tokens / num_experts)``, or ``num_tokens`` (every
    assignment fits) when ``capacity_factor <= 0`` (dropless)."""
    if capacity_factor <= 0:
        return num_tokens
    return int(math.ceil(capacity_factor * k * num_tokens / num_experts))


def _keep_in_order(order: torch.Tensor, flat: torch.Tensor, num_experts: int, capacity: int):
    """``order`` lists the flat assignments grouped by expert, best priority first within each:
    keep the first ``capacity`` of every expert. Returns a bool tensor shaped like ``flat``."""
    counts = expert_counts(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = position < capacity
    return keep


def capacity_keep_mask(
    expert_index: torch.Tensor, expert_prob: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which assignments fit under ``capacity`` with the module's documented priority.

    Args:
        expert_index: N x k chosen experts, column j being every token's (j+1)-th choice.
        expert_prob: N x k their softmax probabilities (the priority within a choice rank; read
            detached, only when capacity can bind).
        capacity: the most assignments an expert may keep.
    Returns:
        N x k bool, True where the assignment is kept.
    """
    num_tokens, k = expert_index.shape
    if capacity >= num_tokens:  # an expert gets at most one assignment per token
        return torch.ones_like(expert_index, dtype=torch.bool)
    # Lay assignments out rank-major (all first choices, then all second choices, ...), so that a
    # stable sort keeps rank order and then token order among equal probabilities.
    expert_rm = expert_index.t().reshape(-1)  # (k*N), rank-major
    prob_rm = expert_prob.detach().t().reshape(-1)  # (k*N)
    order = torch.sort(prob_rm, descending=True, stable=True).indices
    rank_of = torch.arange(k, device=expert_index.device).repeat_interleave(num_tokens)
    order = order[torch.sort(rank_of[order], stable=True).indices]
    order = order[torch.sort(expert_rm[order], stable=True).indices]
    keep_rm = _keep_in_order(order, expert_rm, num_experts, capacity)
    return keep_rm.view(k, num_tokens).t()


def random_keep_mask(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Capacity with random priority: each expert keeps ``capacity`` of its assignments chosen
    uniformly at random, whatever their choice rank or gate probability. This is the "random
    token selection" policy that Zoph et al. 2022 (ST-MoE) and Riquelme et al. 2021 (sec. 4.1)
    compare batch-prioritised routing against.

    Args:
        expert_index: N x k chosen experts.
        capacity: the most assignments an expert may keep.
    Returns:
        N x k bool, True where the assignment is kept.
    """
    num_tokens, k = expert_index.shape
    if capacity >= num_tokens:
        return torch.ones_like(expert_index, dtype=torch.bool)
    flat = expert_index.reshape(-1)  # (N*k) token-major
    perm = torch.randperm(flat.numel(), device=flat.device)
    order = perm[torch.sort(flat[perm], stable=True).indices]  # by expert, random within
    return _keep_in_order(order, flat, num_experts, capacity).view(num_tokens, k)
