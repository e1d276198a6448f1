"""Routing statistics of live traffic, read from the ``MoERecord`` every MoE layer returns.

``RoutingCollector`` registers one forward hook per ``MoELayer``; the hook reads the layer's
return value (``output[1]``, the record) and adds its counts to the collector, which the engine
owns. Nothing is stored on the model's modules. Per model batch (one encoder pass, or every
decoder step of a beam search) the engine calls ``take()`` and gets one ``LayerRouting`` per layer.

Tensors are summed where they live and read back once per batch, not once per layer and step.
Only the engine's single worker thread runs the model, so the collector needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fairseq_moe_plugin.modules.moe_layer import MoELayer
from fairseq_moe_plugin.modules.routing.losses import routing_entropy


@dataclass
class LayerRouting:
    """One MoE layer's routing over one model batch."""

    layer: str
    expert_tokens: list[int]  # E: assignments each expert computed (``record.expert_counts``)
    routed_tokens: int  # tokens routed (N summed over the forwards of the batch)
    entropy_sum: float  # sum over those tokens of the router distribution's entropy (nats)
    fallback_tokens: int  # tokens whose router logits were not finite (sent to the fallback)


class _Accumulator:
    def __init__(self, num_experts: int):
        self.counts = torch.zeros(num_experts, dtype=torch.long)
        self.tokens = 0
        self.entropy = torch.zeros((), dtype=torch.float64)
        self.fallback = torch.zeros((), dtype=torch.long)


class RoutingCollector:
    """Sums each MoE layer's routing records between two ``take()`` calls.

    Args:
        model: any module; every ``MoELayer`` inside it gets a forward hook.
    A dense model (no MoE layer) gets no hook and reports nothing.
    """

    def __init__(self, model: torch.nn.Module):
        self.num_experts: dict[str, int] = {}  # layer name -> E, in model order
        self.fallback_expert: dict[str, int] = {}  # layer name -> its gate's fallback (-1 off)
        self._handles = []
        for module in model.modules():
            if isinstance(module, MoELayer):
                self.num_experts[module.name] = module.num_experts
                self.fallback_expert[module.name] = getattr(module.gate, "fallback_expert", -1)
                self._handles.append(module.register_forward_hook(self._hook))
        self._acc: dict[str, _Accumulator] = {}

    def _hook(self, module, inputs, output) -> None:
        record = output[1]  # the MoERecord this forward returned
        acc = self._acc.get(record.layer)
        if acc is None:
            acc = self._acc[record.layer] = _Accumulator(len(record.expert_counts))
        with torch.no_grad():
            probs = record.probs.detach()  # N x E
            acc.counts = acc.counts.to(record.expert_counts.device) + record.expert_counts
            acc.tokens += probs.shape[0]
            if probs.shape[0]:
                entropy = routing_entropy(probs.float()).sum().double()
                acc.entropy = acc.entropy.to(entropy.device) + entropy
            fallback = getattr(record, "fallback_tokens", None)
            if fallback is not None:
                acc.fallback = acc.fallback.to(fallback.device) + fallback

    def take(self) -> list[LayerRouting]:
        """The routing summed since the last call (layers that ran, in model order), and reset."""
        acc, self._acc = self._acc, {}
        return [
            LayerRouting(
                layer=name,
                expert_tokens=a.counts.tolist(),
                routed_tokens=a.tokens,
                entropy_sum=float(a.entropy),
                fallback_tokens=int(a.fallback),
            )
            for name in self.num_experts
            if (a := acc.get(name)) is not None
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
