"""The workload of one ``benchmark_moe_layer`` setting: weights, input and cotangent for a
(device, T, E, k), the step that is timed per implementation and mode (``moe`` and its
references, ``moe_layer_references.py``), the routing's load and the router/experts breakdown.
"""

from __future__ import annotations

import statistics

import torch

from fairseq_moe_plugin.modules import MoELayer, StackedExperts, TopKGate
from fairseq_moe_plugin.modules.dispatch import DispatchPlan

from .moe_layer_references import (
    DenseFFN,
    EinsumMoE,
    GroupedMMMoE,
    NaiveLoopMoE,
    einsum_peak_bytes_estimate,
)


class Setting:
    """Weights, input and cotangent for one (device, T, E, k), and a step per implementation.
    Shapes: ``x`` and ``grad_out`` are T x C (C = d_model)."""

    def __init__(self, args, device: str, tokens: int, experts: int, k: int):
        self.device, self.tokens, self.experts, self.k = device, tokens, experts, k
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        torch.manual_seed(args.seed)
        d, ff = args.d_model, args.d_ff
        gate = TopKGate(d, experts, k=k, capacity_factor=0.0)  # dropless: the dense FLOPs
        layer = MoELayer(gate, StackedExperts(experts, d, ff, activation_fn=args.activation))
        self.layer = layer.to(device=device, dtype=self.dtype).train()
        self.dense = DenseFFN(d, k * ff, args.activation).to(device=device, dtype=self.dtype)
        self.x = torch.randn(tokens, d, device=device, dtype=self.dtype)  # T x C
        self.grad_out = torch.randn(tokens, d, device=device, dtype=self.dtype)  # T x C
        self.args = args
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, impl: str) -> torch.nn.Module:
        if impl not in self._modules:
            if impl == "grouped_mm":
                self._modules[impl] = GroupedMMMoE(self.layer)
            elif impl in ("moe", "moe_fresh_grads"):
                self._modules[impl] = self.layer
            elif impl == "dense":
                self._modules[impl] = self.dense
            elif impl == "naive_loop":
                self._modules[impl] = NaiveLoopMoE(self.layer)
            elif impl == "naive_loop_modules":
                self._modules[impl] = NaiveLoopMoE(self.layer, per_expert_modules=True).to(
                    self.device
                )
            elif impl == "einsum":
                self._modules[impl] = EinsumMoE(self.layer, self.args.einsum_capacity_factor)
        return self._modules[impl]

    def forward(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        out = self.module(impl)(x)
        return out[0] if impl.startswith("moe") else out  # MoELayer returns (y, record)

    def step(self, impl: str, mode: str):
        """The callable timed for (impl, mode)."""
        module = self.module(impl)
        self.set_grad_buffer_reuse(impl != "moe_fresh_grads")
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    self.forward(impl, self.x)

            return run
        x = self.x.detach().requires_grad_(True)

        def run():
            self.forward(impl, x).backward(self.grad_out)
            for p in module.parameters():  # fairseq's zero_grad
                p.grad = None
            x.grad = None

        return run

    def set_grad_buffer_reuse(self, enabled: bool, clear: bool = False) -> None:
        """Turn the experts' gradient-buffer reuse on or off (absent in older versions)."""
        buffers = getattr(self.layer.experts, "grad_buffers", None)
        if buffers is not None:
            buffers.enabled = enabled
            if clear:
                buffers.clear()

    def einsum_estimate(self) -> int:
        return einsum_peak_bytes_estimate(
            self.tokens,
            self.experts,
            self.k,
            self.args.einsum_capacity_factor,
            torch.finfo(self.dtype).bits // 8,
        )

    def load(self) -> dict:
        """Tokens per expert under this setting's routing (max and min over the mean)."""
        with torch.no_grad():
            _, record = self.layer(self.x)
        counts = record.expert_counts.float()  # E
        mean = counts.mean().item()
        return {
            "max_over_mean": counts.max().item() / mean,
            "min_over_mean": counts.min().item() / mean,
        }

    def breakdown(self, times) -> dict:
        """Router and experts-alone times of the ``moe`` fwd+bwd (``benchmark_moe_layer``'s doc)."""
        layer, x = self.layer, self.x.detach().requires_grad_(True)
        with torch.no_grad():
            counts = layer(self.x)[1].expert_counts  # E: tokens per expert in this routing
        rows = int(counts.sum())  # M
        expert_index_sorted = torch.repeat_interleave(
            torch.arange(self.experts, device=self.device), counts.to(self.device)
        )  # M, ascending: rows already sorted by expert
        plan = DispatchPlan.from_routing(
            expert_index_sorted.view(-1, 1),
            torch.ones(rows, 1, dtype=torch.bool, device=self.device),
            self.experts,
        )  # one choice per row: contiguous gathers, identity combine
        sorted_in = torch.randn(rows, x.shape[1], device=self.device, dtype=self.dtype)  # M x C
        sorted_in.requires_grad_(True)
        sorted_grad = torch.randn_like(sorted_in)  # M x C
        weight_grad = torch.randn(x.shape[0], self.k, device=self.device)  # T x k

        def router():
            g = layer.gate(x)
            ((g.expert_weight * weight_grad).sum() + g.balance_loss + g.z_loss).backward()
            layer.gate.wg.weight.grad = None
            x.grad = None

        def experts():
            layer.experts(sorted_in, plan).backward(sorted_grad)
            for p in layer.experts.parameters():
                p.grad = None
            sorted_in.grad = None

        self.set_grad_buffer_reuse(True)
        router_s = statistics.median(times(router))
        experts_s = statistics.median(times(experts))
        return {"router_s": router_s, "experts_s": experts_s}
