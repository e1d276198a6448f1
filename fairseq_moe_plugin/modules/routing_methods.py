"""Routing methods beside plain top-k, as plain functions the gate (``gate.py``) calls:

- expert-choice routing (Zhou et al. 2022), ``expert_choice_keep``;
- auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3), ``bias_balancing_step``;
- random-token-selection capacity (the "random" priority ablation), ``random_keep_mask``.

Tokens are flattened: ``N`` non-padding tokens, ``E`` experts, ``k`` experts per token. Nothing
here needs fairseq.
"""

from __future__ import annotations

import math

import torch

from .router_losses import expert_counts

CAPACITY_PRIORITIES = ("rank_prob", "random")


def check_method_options(
    routing: str = "topk",
    expert_capacity_factor: float = 2.0,
    capacity_priority: str = "rank_prob",
    bias_balancing_rate: float = 0.0,
) -> None:
    """The one check of these methods' options (the gate and the model config call it);
    ValueError naming the flag."""
    if capacity_priority not in CAPACITY_PRIORITIES:
        raise ValueError(
            f"--moe-capacity-priority must be one of {CAPACITY_PRIORITIES}, "
            f"got {capacity_priority!r}"
        )
    if not expert_capacity_factor > 0:
        raise ValueError(
            f"--moe-expert-capacity-factor must be > 0 (the mean number of experts per token "
            f"under expert choice), got {expert_capacity_factor}"
        )
    if not bias_balancing_rate >= 0:
        raise ValueError(
            f"--moe-bias-balancing-rate must be >= 0 (0 = off), got {bias_balancing_rate}"
        )
    if bias_balancing_rate > 0 and routing != "topk":
        raise ValueError(
            f"--moe-bias-balancing-rate balances the top-k selection; it does not apply to "
            f"--moe-routing {routing} (dense routing selects every expert, expert choice gives "
            f"every expert the same number of tokens by construction)"
        )


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ``ceil(c * N / E)`` (Zhou et al. 2022,
    sec. 3.1, ``k = n * c / e``), at most N."""
    return min(num_tokens, int(math.ceil(capacity_factor * num_tokens / num_experts)))


def expert_choice_keep(probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert-choice routing, Zhou et al. 2022 ("Mixture-of-Experts with Expert Choice
    Routing"), eq. 1: ``S = softmax(X W_g)`` (token-to-expert scores, softmax over experts),
    ``G, I = TopK(S^T, k)``: each expert picks the ``capacity`` tokens with the highest score.

    A token may be picked by several experts, or by none (it then passes through the residual
    connection alone). Every expert gets exactly ``capacity`` tokens, so the load is balanced by
    construction; the price is that a token's routing depends on every other token of the batch
    (it is not causal, and eval routing is batch-dependent).

    Args:
        probs: N x E scores (fp32).
        capacity: tokens per expert, 0 <= capacity <= N.
    Returns:
        N x E bool, True where expert e took token n; each column has exactly ``capacity`` Trues.
    """
    num_tokens, num_experts = probs.shape
    keep_t = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=probs.device)  # E x N
    if capacity > 0:
        chosen = torch.topk(probs.t(), capacity, dim=1).indices  # E x C token ids
        # out of place, with a tensor source: torch.jit.trace (fvcore's FLOP count) has no
        # scatter_ overload taking a Python bool
        keep_t = keep_t.scatter(1, chosen, torch.ones_like(chosen, dtype=torch.bool))
    return keep_t.t()  # N x E


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
    counts = expert_counts(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = position < capacity
    return keep.view(num_tokens, k)


def bias_balancing_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free load balancing: Wang et al. 2024 ("Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts"), Algorithm 1, as DeepSeek-V3 (2024, sec. 2.1.2,
    eq. 16) uses it: after each update, ``b_i <- b_i + u * sign(e_i)`` with
    ``e_i = mean_j(c_j) - c_i``, ``c_i`` the tokens assigned to expert i over the update. An
    overloaded expert's bias goes down by u, an underloaded one's up by u; one at the mean
    stays. The bias enters the top-k selection only, never the combine weights.

    Args:
        bias: E, the current biases.
        load: E, the loads of the update (counts, summed over its batches and workers).
        rate: u.
    Returns:
        the new E biases (``bias`` unchanged where the update saw no token at all).
    """
    step = rate * torch.sign(load.mean() - load).to(bias.dtype)
    return torch.where(load.sum() > 0, bias + step, bias)
