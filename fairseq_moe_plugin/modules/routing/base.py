"""``RoutingMethod``: what every routing method declares and does.

A routing method turns the router's probabilities into a ``GateOutput`` (``route``) and declares
what the tools need to know about it as capabilities, so that no tool compares method names:

- ``causal``: a token's routing depends only on itself, so the method can run in a decoder
  (incremental decoding routes one position at a time);
- ``batch_independent``: in eval mode (dropless capacity) a token routes the same whatever else
  is in its batch (distillation teachers and serving batch requests together);
- ``has_capacity``: ``--moe-capacity-factor``/``--moe-capacity-priority`` apply;
- ``onnx_static``: a per-token static graph computes it (``deploy/onnx_moe.py``);
- ``bias_balancing``: ``--moe-bias-balancing-rate`` can steer its selection;
- ``growable``: experts can be added without changing what the old ones are given
  (``models/grow.py``).

Where a capability is False the method says why (``reasons``), and the tools that refuse it
quote that reason. ``flags`` names the options only this method reads, with their defaults, so
that the validation table (``models/config_rules.py``) warns when one is set while no method in
use reads it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .output import GateOutput, RoutingMode


class RoutingMethod:
    """Base class of the routing methods; subclasses set the class attributes and ``route``."""

    name: ClassVar[str]  # the --moe-routing value
    label: ClassVar[str]  # how messages name it, e.g. "expert-choice"
    mode: ClassVar[RoutingMode] = RoutingMode.TOKEN_CHOICE
    causal: ClassVar[bool] = True
    batch_independent: ClassVar[bool] = True
    has_capacity: ClassVar[bool] = False
    onnx_static: ClassVar[bool] = True
    bias_balancing: ClassVar[bool] = False
    growable: ClassVar[bool] = True
    # options only this method reads (MoEConfig names) -> their MoEConfig defaults
    flags: ClassVar[dict[str, object]] = {}
    # capability -> why the method lacks it (every False capability above has one)
    reasons: ClassVar[dict[str, str]] = {}

    def route(
        self,
        gate,  # the TopKGate holding the options (modules/gate.py)
        logits: torch.Tensor,
        probs: torch.Tensor,
        finite_rows: torch.Tensor | None,
    ) -> GateOutput:
        """The routing of N tokens from their N x E fp32 ``logits`` and ``probs``; ``gate``
        holds the options (``k``, capacity factors, ...) and the training state.
        ``finite_rows`` (N x 1 bool: False for a token whose logits were not finite and went
        to the fallback expert; None when no fallback applies) is passed on to the output."""
        raise NotImplementedError

    def experts_per_token(self, gate) -> float:
        """The mean number of experts a token is computed by (FLOPs, active parameters)."""
        return float(gate.k)

    def capacity_factor(self, gate) -> float | None:
        """The expert-side capacity factor c when experts choose (E x ceil(c N / E)
        assignments), else None."""
        return None

    @property
    def title(self) -> str:
        """e.g. "expert-choice routing"."""
        return f"{self.label} routing"

    @property
    def a_label(self) -> str:
        """e.g. "an expert-choice" (for "cannot grow an expert-choice model")."""
        return ("an " if self.label[0] in "aeiou" else "a ") + self.label

    def reason(self, capability: str) -> str:
        """Why this method lacks ``capability`` (for the messages that refuse it)."""
        return self.reasons.get(capability, f"{self.title} does not support it")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
