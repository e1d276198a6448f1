"""``MoERecord``: what one MoE layer's forward reports about its routing, returned with its output.

The record leaves the layer as part of what its ``forward`` returns, never as an attribute set
on a module, so that anything that re-runs or wraps a forward (activation checkpointing, FSDP,
hooks) hands the criterion the record of the forward whose graph the loss goes through. It is
registered as a pytree node (as is the ``GateOutput`` it holds), so that
``modules/checkpointing.py`` can pass its tensors through fairseq's checkpoint function one by
one.

It holds the routing decision as the gate returned it (``routing``, a ``GateOutput``: the
losses, counts and entropy are derived there, on first access) and adds what only the layer
knows: its name, the computed counts and where the routed tokens sit in the input. A decoding
step reads nothing from it and so pays for none of the derived statistics. The losses are
computed from ``routing.logits`` and ``routing.probs``, which carry the router's gradient.

Tokens: ``N`` non-padding tokens routed, ``k`` experts per token, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.utils import _pytree as pytree

from .routing import GateOutput, RoutingMode


def _routing_field(name: str, detach: bool = False, derived: bool = False):
    """A read-only view of ``routing.<name>`` (detached when the record should not carry the
    gradient, as for the combine weights). A ``derived`` statistic is cached on the record too
    once read, so that ``vars(record)`` shows what a step has computed (and the detached views
    are made once)."""

    def get(self):
        value = getattr(self.routing, name)
        return value.detach() if detach else value

    get.__doc__ = f"``routing.{name}``" + (" (detached)" if detach else "")
    if derived:
        return cached_property(get)
    return property(get)


@dataclass
class MoERecord:
    """One MoE layer's routing in one forward. Only the two losses carry gradients."""

    layer: str  # the layer's module name, e.g. ``encoder.layers.1`` (see ``naming.py``)
    routing: GateOutput  # the gate's decision for the N routed tokens
    # E int32: the end row of each expert's assignments in the dispatch (cumulative counts,
    # after capacity); ``expert_counts`` derives the counts, on first access.
    expert_offsets: torch.Tensor
    # N long: where the routed tokens are in the layer input flattened over its leading dims
    # (``t * B + b`` for a T x B x C input); None when no padding mask was given (token i is
    # flat position i).
    token_index: torch.Tensor | None
    input_shape: tuple[int, ...]  # the layer input's leading shape, e.g. (T, B)

    # The routing decision, read through (see ``GateOutput`` for shapes and meaning).
    logits = _routing_field("logits")  # N x E float32 (differentiable)
    probs = _routing_field("probs")  # N x E float32 (differentiable)
    expert_index = _routing_field("expert_index", detach=True, derived=True)  # N x k long
    expert_weight = _routing_field("expert_weight", detach=True, derived=True)  # N x k float
    keep = _routing_field("keep", derived=True)  # N x k bool
    balance_type = _routing_field("balance_type")
    fallback_tokens = _routing_field("fallback_tokens", derived=True)  # 0-dim long, or None
    mode = _routing_field("mode")  # RoutingMode
    k = _routing_field("k")
    # Derived on first access (cached on the routing output).
    logits_finite = _routing_field("logits_finite", derived=True)
    balance_loss = _routing_field("balance_loss", derived=True)  # differentiable
    z_loss = _routing_field("z_loss", derived=True)  # differentiable
    expert_load = _routing_field("expert_load", derived=True)
    expert_counts_routed = _routing_field("expert_counts_routed", derived=True)
    dropped = _routing_field("dropped", derived=True)
    dropped_tokens = _routing_field("dropped_tokens", derived=True)
    unchosen_tokens = _routing_field("unchosen_tokens")
    computed_assignments = _routing_field("computed_assignments", derived=True)
    routed_tokens = _routing_field("routed_tokens", derived=True)
    token_entropy = _routing_field("token_entropy", derived=True)
    entropy = _routing_field("entropy", derived=True)

    @cached_property
    def expert_counts(self) -> torch.Tensor:
        """E long: assignments each expert computed (after capacity)."""
        offsets = self.expert_offsets.long()
        return torch.diff(offsets, prepend=offsets.new_zeros(1))

    @property
    def dense(self) -> bool:
        """Dense routing: every expert weighted by its probability (k = E)."""
        return self.routing.mode is RoutingMode.DENSE

    @property
    def expert_choice(self) -> bool:
        """Expert choice: ``keep`` marks the tokens each expert took (k = E)."""
        return self.routing.mode is RoutingMode.EXPERT_CHOICE

    def aux_loss(self, balance_weight: float, z_weight: float) -> torch.Tensor:
        """``balance_weight * balance_loss + z_weight * z_loss`` (a scalar)."""
        return balance_weight * self.balance_loss + z_weight * self.z_loss


pytree.register_dataclass(MoERecord)
