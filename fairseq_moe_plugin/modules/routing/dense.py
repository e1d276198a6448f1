"""Dense routing: every token goes to all E experts, each weighted by its probability, with no
capacity (DyLoRA-MoE's "dense collaboration"); also what the maturity schedule
(``--moe-dense-routing-until``, ``DenseSchedule``) routes by while it runs."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import RoutingMethod
from .output import GateOutput, RoutingMode


class Dense(RoutingMethod):
    name = "dense"
    label = "dense"
    mode = RoutingMode.DENSE
    reasons = {"bias_balancing": "dense routing selects every expert"}

    def route(self, gate, logits, probs, finite_rows) -> GateOutput:
        num_tokens = probs.shape[0]
        index = torch.arange(gate.num_experts, device=probs.device)
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=index.expand(num_tokens, -1),  # N x E
            expert_weight=probs,  # N x E
            kept=None,  # every expert computes every token
            capacity=num_tokens,
            balance_type=gate.balance_type,
            mode=self.mode,
            finite_rows=finite_rows,
        )

    def experts_per_token(self, gate) -> float:
        return float(gate.num_experts)


class DenseSchedule:
    """DyLoRA-MoE's maturity schedule: route densely while the update count is below ``until``.

    The count is the host's buffer ``routing_updates`` (0-dim long; registered on the gate under
    that name, which existing checkpoints use), so that a checkpoint routes as it was trained.
    """

    BUFFER = "routing_updates"

    def __init__(self, host: nn.Module, until: int):
        self.host, self.until = host, until
        host.register_buffer(self.BUFFER, torch.zeros((), dtype=torch.long))

    def set_num_updates(self, num_updates: int) -> None:
        getattr(self.host, self.BUFFER).fill_(int(num_updates))

    @property
    def running(self) -> bool:
        """One host read of the update count."""
        return int(getattr(self.host, self.BUFFER)) < self.until
