"""``MoERecord``: what one MoE layer's forward reports about its routing, returned with its output.

The record leaves the layer as part of what its ``forward`` returns, never as an attribute set
on a module, so that anything that re-runs or wraps a forward (activation checkpointing, FSDP,
hooks) hands the criterion the record of the forward whose graph the loss goes through. It is
registered as a pytree node, so that ``modules/checkpointing.py`` can pass its tensors through
fairseq's checkpoint function one by one.

It holds what the routing produced anyway (the fields) and derives everything else (the two
losses, counts, entropy) on first access. A decoding step reads nothing from it and so pays for
none of that; the criterion reads what it logs; the analysis tools read the per-token fields.
The losses are computed from ``logits`` and ``probs``, which carry the router's gradient (under
activation checkpointing they are outputs of the checkpointed function, so the gradient flows
through its recompute).

Tokens: ``N`` non-padding tokens routed, ``k`` experts per token, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.utils import _pytree as pytree

from .gate import RouterLosses, expert_counts, routing_entropy


@dataclass
class MoERecord(RouterLosses):
    """One MoE layer's routing in one forward. Only the two losses carry gradients (they, and
    ``logits_finite``, come from ``RouterLosses``)."""

    layer: str  # the layer's module name, e.g. ``encoder.layers.1`` (see ``naming.py``)
    k: int  # experts per token
    logits: torch.Tensor  # N x E float32 router logits (differentiable)
    probs: torch.Tensor  # N x E float32 softmax over all experts (differentiable)
    expert_index: torch.Tensor  # N x k long: each token's experts, best first
    expert_weight: torch.Tensor  # N x k float: their combine weights, 0 where dropped (detached)
    keep: torch.Tensor  # N x k bool: False where capacity dropped the assignment
    expert_counts: torch.Tensor  # E long: assignments each expert computed (after capacity)
    # N long: where the routed tokens are in the layer input flattened over its leading dims
    # (``t * B + b`` for a T x B x C input); None when no padding mask was given (token i is
    # flat position i).
    token_index: torch.Tensor | None
    input_shape: tuple[int, ...]  # the layer input's leading shape, e.g. (T, B)
    balance_type: str = "switch"  # which balance loss ``balance_loss`` is (gate.BALANCE_LOSSES)
    dense: bool = False  # dense routing: k = E, every expert weighted by its probability
    # expert choice (Zhou et al. 2022): expert_index is N x E (every expert, so k = E) and keep
    # marks the tokens each expert took; nothing is dropped, a token may be taken by none
    expert_choice: bool = False
    # 0-dim long: tokens that went to the fallback expert because their router logits were not
    # finite (``TopKGate``'s ``fallback_expert``, eval only); None when no fallback was applied.
    fallback_tokens: torch.Tensor | None = None

    @cached_property
    def expert_load(self) -> torch.Tensor:
        """E float: each expert's load in this forward, summable over batches: the router's
        assignments (``expert_counts_routed``) under top-k routing; under dense routing, where
        every expert gets every token, the probability mass it received (``probs`` summed over
        tokens)."""
        if self.dense:
            return self.probs.detach().sum(dim=0)
        return self.expert_counts_routed.float()

    @cached_property
    def expert_counts_routed(self) -> torch.Tensor:
        """E long: assignments the router chose (before capacity); under expert choice, the
        tokens each expert took (C each)."""
        if self.expert_choice:
            return self.keep.sum(dim=0)
        return expert_counts(self.expert_index.detach(), self.probs.shape[1])

    @cached_property
    def dropped(self) -> torch.Tensor:
        """Scalar long: assignments dropped by capacity (none under expert choice: experts
        choose, see ``unchosen_tokens``)."""
        if self.expert_choice:
            return self.keep.new_zeros((), dtype=torch.long)
        return (~self.keep).sum()

    @cached_property
    def dropped_tokens(self) -> torch.Tensor:
        """Scalar long: tokens all of whose k assignments were dropped; under expert choice, the
        tokens no expert took (``unchosen_tokens``). Their MoE output is zero."""
        return (~self.keep.any(dim=-1)).sum()

    @property
    def unchosen_tokens(self) -> torch.Tensor:
        """Scalar long: tokens no expert took (expert choice; they pass through the residual)."""
        return self.dropped_tokens

    @cached_property
    def computed_assignments(self) -> torch.Tensor:
        """Scalar long: (token, expert) pairs computed, after capacity; divided by
        ``routed_tokens`` it is the mean number of experts per token."""
        return self.keep.sum()

    @cached_property
    def routed_tokens(self) -> torch.Tensor:
        """Scalar long: N."""
        return torch.tensor(self.expert_index.shape[0], device=self.expert_index.device)

    @cached_property
    def token_entropy(self) -> torch.Tensor:
        """N float: each token's routing entropy (nats)."""
        with torch.no_grad():
            return routing_entropy(self.probs.detach())

    @cached_property
    def entropy(self) -> torch.Tensor:
        """Scalar float: mean routing entropy over the N tokens (nats), 0 without tokens."""
        if self.expert_index.shape[0] == 0:
            return self.probs.new_zeros((), dtype=torch.float32)
        return self.token_entropy.mean().float()

    def aux_loss(self, balance_weight: float, z_weight: float) -> torch.Tensor:
        """``balance_weight * balance_loss + z_weight * z_loss`` (a scalar)."""
        return balance_weight * self.balance_loss + z_weight * self.z_loss


pytree.register_dataclass(MoERecord)
