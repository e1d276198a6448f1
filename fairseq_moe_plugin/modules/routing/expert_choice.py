"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
every expert takes its top ``C = ceil(c * N / E)`` tokens."""

from __future__ import annotations

import math

import torch

from .base import RoutingMethod
from .output import GateOutput, RoutingMode

_NOT_CAUSAL = (
    "each expert picks its tokens among all the batch's tokens, future ones included, so a "
    "token's output would depend on tokens not generated yet, and incremental decoding (one "
    "token per step) has no batch of tokens to choose from"
)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ``ceil(c * N / E)`` (Zhou et al. 2022,
    sec. 3.1, ``k = n * c / e``), at most N."""
    return min(num_tokens, int(math.ceil(capacity_factor * num_tokens / num_experts)))


def expert_choice_keep(probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Zhou et al. 2022, eq. 1: ``S = softmax(X W_g)`` (token-to-expert scores, softmax over
    experts), ``G, I = TopK(S^T, k)``: each expert picks the ``capacity`` tokens with the highest
    score.

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


class ExpertChoice(RoutingMethod):
    name = "expert_choice"
    label = "expert-choice"
    mode = RoutingMode.EXPERT_CHOICE
    causal = False
    batch_independent = False
    onnx_static = False
    growable = False
    flags = {"moe_expert_capacity_factor": 2.0}
    reasons = {
        "causal": _NOT_CAUSAL,
        "batch_independent": "each expert takes its top C tokens of the whole batch",
        "onnx_static": "each expert takes its top C tokens of the whole batch, which a "
        "per-token static graph does not compute",
        "bias_balancing": "expert choice gives every expert the same number of tokens by "
        "construction",
        "growable": "each expert takes ceil(c * N / E) tokens, so adding experts changes which "
        "tokens the old experts take, and the grown model would not compute what the old one did",
    }

    def route(self, gate, logits, probs, finite_rows) -> GateOutput:
        """A token's weight for an expert that took it is its probability (renormalised over
        the experts that took it with ``normalize_top_k``), 0 elsewhere (logits, probs: N x E)."""
        num_tokens = probs.shape[0]
        capacity = expert_choice_capacity(num_tokens, gate.num_experts, gate.expert_capacity_factor)
        keep = expert_choice_keep(probs.detach(), capacity)  # N x E
        weight = probs * keep.to(probs.dtype)  # N x E
        if gate.normalize_top_k:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        index = torch.arange(gate.num_experts, device=probs.device)
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=index.expand(num_tokens, -1),  # N x E
            expert_weight=weight,
            kept=keep,
            capacity=capacity,
            balance_type=gate.balance_type,
            mode=self.mode,
            finite_rows=finite_rows,
        )

    def experts_per_token(self, gate) -> float:
        return min(float(gate.expert_capacity_factor), float(gate.num_experts))

    def capacity_factor(self, gate) -> float | None:
        return float(gate.expert_capacity_factor)
