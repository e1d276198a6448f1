"""The tests' one way to build a router and an MoE layer, and the gradient helpers that compare
two layers. ``make_layer``'s defaults are the small fp64 training layer of
tests/modules/test_moe_layer.py; a test that wants another layer passes what differs."""

from __future__ import annotations

import torch
import torch.nn as nn

from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.moe_layer import MoELayer

D_MODEL = 8
D_FF = 16


def make_gate(d_model: int, num_experts: int, seed: int | None = 0, **gate_kwargs) -> TopKGate:
    """A ``TopKGate`` (``gate_kwargs``: its options), its router drawn after
    ``torch.manual_seed(seed)``; ``seed=None`` draws from the current random state."""
    if seed is not None:
        torch.manual_seed(seed)
    return TopKGate(d_model, num_experts, **gate_kwargs)


def make_layer(
    num_experts: int,
    k: int,
    normalize_top_k: bool = True,
    capacity_factor: float = 0.0,
    activation_fn: str = "relu",
    d_model: int = D_MODEL,
    d_ff: int = D_FF,
    dtype: torch.dtype | None = torch.float64,
    seed: int | None = 0,
    name: str = "encoder.layers.0",
    mode: str | None = "train",
    expert_parallel=None,
    shared=None,
    eom: float = 0.0,
    **gate_kwargs,
) -> MoELayer:
    """An ``MoELayer`` of ``num_experts`` ``StackedExperts`` routed top-``k``: the router, then the
    experts, drawn after ``torch.manual_seed(seed)`` (``None``: the current random state).
    ``gate_kwargs`` go to ``TopKGate`` (``eval_capacity_factor``, ``jitter_eps``, ...). ``dtype``:
    the layer is cast to it (``None``: left in fp32); ``mode``: ``"train"``, ``"eval"`` or
    ``None`` (left as built)."""
    gate = make_gate(
        d_model,
        num_experts,
        seed=seed,
        k=k,
        normalize_top_k=normalize_top_k,
        capacity_factor=capacity_factor,
        **gate_kwargs,
    )
    experts = StackedExperts(
        num_experts, d_model, d_ff, activation_fn=activation_fn, expert_parallel=expert_parallel
    )
    layer = MoELayer(gate, experts, name=name, shared=shared, eom=eom)
    if dtype is not None:
        layer = layer.to(dtype)
    if mode == "train":
        layer = layer.train()
    elif mode == "eval":
        layer = layer.eval()
    elif mode is not None:
        raise ValueError(f"mode must be 'train', 'eval' or None, not {mode!r}")
    return layer


def param_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, zeros where none was computed; then clears them."""
    grads = {}
    for name, p in module.named_parameters():
        grads[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        p.grad = None
    return grads


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}", **tol)
