"""``MoERecord``: what one MoE layer's forward reports about its routing, returned with its output.

The record leaves the layer as part of what its ``forward`` returns, never as an attribute set
on a module, so that anything that re-runs or wraps a forward (activation checkpointing, FSDP,
hooks) hands the criterion the record of the forward whose graph the loss goes through. It is
registered as a pytree node, so that ``modules/checkpointing.py`` can pass its tensors through
fairseq's checkpoint function one by one.

Tokens: ``N`` non-padding tokens routed, ``k`` experts per token, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree


@dataclass
class MoERecord:
    """One MoE layer's routing in one forward. Only the two losses carry gradients."""

    layer: str  # the layer's module name, e.g. ``encoder.layers.1`` (see ``naming.py``)
    balance_loss: torch.Tensor  # scalar, differentiable: Switch Transformer eq. 4-6
    z_loss: torch.Tensor  # scalar, differentiable: ST-MoE eq. 5
    expert_counts: torch.Tensor  # E long: assignments each expert computed (after capacity)
    expert_counts_routed: torch.Tensor  # E long: assignments the router chose (before capacity)
    dropped: torch.Tensor  # scalar long: assignments dropped by capacity
    dropped_tokens: torch.Tensor  # scalar long: tokens all of whose k assignments were dropped
    routed_tokens: torch.Tensor  # scalar long: N
    entropy: torch.Tensor  # scalar float: mean routing entropy over the N tokens (nats)
    logits_finite: torch.Tensor  # scalar bool: every router logit was finite
    k: int  # experts per token
    expert_index: torch.Tensor  # N x k long: each token's experts, best first
    expert_weight: torch.Tensor  # N x k float: their combine weights, 0 where dropped
    token_entropy: torch.Tensor  # N float: each token's routing entropy (nats)
    # N long: where the routed tokens are in the layer input flattened over its leading dims
    # (``t * B + b`` for a T x B x C input); None when no padding mask was given (token i is
    # flat position i).
    token_index: torch.Tensor | None
    input_shape: tuple[int, ...]  # the layer input's leading shape, e.g. (T, B)

    def aux_loss(self, balance_weight: float, z_weight: float) -> torch.Tensor:
        """``balance_weight * balance_loss + z_weight * z_loss`` (a scalar)."""
        return balance_weight * self.balance_loss + z_weight * self.z_loss


pytree.register_dataclass(MoERecord)
