"""The expert compute paths (``modules/expert_compute.py``): each equals the naive per-token loop,
the automatic choice picks what its rule says, and a decoding step computes nothing that only
training or analysis reads."""

from __future__ import annotations

import random

import pytest
import torch
from moe_factories import D_MODEL, make_layer
from naive_moe import naive_moe

from fairseq_moe_plugin.modules import grouped_gemm as expert_compute
from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.grouped_gemm import pick_impl, use_padded

ACTIVATIONS = ["relu", "gelu", "gelu_fast", "tanh", "linear"]


def _random_case(seed: int, dtype: torch.dtype):
    rng = random.Random(seed)
    num_experts = rng.choice([1, 2, 3, 5, 8, 9])
    k = rng.randint(1, min(num_experts, 3))
    normalize = rng.random() < 0.5
    layer = make_layer(
        num_experts, k, normalize_top_k=normalize, capacity_factor=rng.choice([0.0, 0.5, 1.0]),
        eval_capacity_factor=rng.choice([0.0, 0.5]), activation_fn=rng.choice(ACTIVATIONS),
        dtype=dtype, seed=seed,
    )  # fmt: skip
    x = torch.randn(
        rng.randint(0, 12), D_MODEL, dtype=dtype, generator=torch.Generator().manual_seed(seed)
    )
    return layer, x, normalize


def _naive(layer, x, normalize):
    with torch.no_grad():
        return naive_moe(layer.experts, x, layer.gate(x), normalize)


@pytest.mark.parametrize("seed", range(12))
def test_padded_inference_equals_the_naive_loop(seed):
    """``padded`` (forced), float64, with drops, empty experts and zero tokens among the cases."""
    layer, x, normalize = _random_case(seed, torch.float64)
    layer.eval()
    layer.experts.impl = "padded"
    with torch.no_grad():
        y, _ = layer(x)
    torch.testing.assert_close(y, _naive(layer, x, normalize), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("training", [False, True])
def test_grouped_mm_equals_the_loop_in_outputs_and_gradients(seed, training):
    """``grouped_mm`` (torch's grouped GEMM, its autograd) against ``loop`` (the hand-written
    backward), float32 on CPU: outputs, input gradient and every parameter's gradient."""
    layer, x, _ = _random_case(seed, torch.float32)
    layer.train(training)
    results = {}
    for impl in ("loop", "grouped_mm"):
        layer.experts.impl = impl
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same jitter, if any
        xi = x.clone().requires_grad_(True)
        y, record = layer(xi)
        (y.square().sum() + record.balance_loss + record.z_loss).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        results[impl] = [y.detach()] + [g if g is not None else torch.zeros(()) for g in grads]
    for a, b in zip(results["loop"], results["grouped_mm"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _plan(counts: list[int], k: int = 1) -> DispatchPlan:
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return DispatchPlan.from_routing(index.view(-1, k), None, len(counts))


def test_use_padded_follows_the_measured_crossover():
    assert use_padded(_plan([2, 1, 3, 1, 2, 1, 1, 1]))  # every expert hit, grid 24 <= 3 x 12 rows
    assert not use_padded(
        _plan([2, 1, 3, 0, 2, 1, 1, 2])
    )  # expert 3 has no rows: weights for nothing
    assert not use_padded(_plan([1, 1] + [0] * 6))  # grid 8 > 3 x 2 rows: loop reads less
    assert not use_padded(_plan([100] * 8))  # > 64 rows per expert: per-expert GEMMs are efficient
    assert not use_padded(_plan([1] + [0] * 63))  # E=64, one row
    assert not use_padded(_plan([0, 0]))  # no rows at all


def test_pick_impl_auto_and_forced():
    x = torch.zeros(10, 4)
    small, large = _plan([2, 1, 3, 1, 2, 1, 1, 1]), _plan([100] * 8)
    assert pick_impl("auto", x, small, inference=True) == "padded"
    assert pick_impl("auto", x, small, inference=False) == "loop"
    assert pick_impl("auto", x, large, inference=True) == "loop"
    assert pick_impl("grouped_mm", x, large, inference=False) == "grouped_mm"
    with pytest.raises(ValueError, match="padded expert implementation is for inference only"):
        pick_impl("padded", x, small, inference=False)
    layer = make_layer(4, 2, dtype=torch.float32, activation_fn="relu").train()
    layer.experts.activation_dropout, layer.experts.impl = 0.5, "padded"
    with torch.no_grad(), pytest.raises(ValueError, match="no activation dropout"):
        layer(torch.randn(12, D_MODEL))  # no autograd, but dropout: refused, not rerouted
    with pytest.raises(ValueError, match="grouped_mm has no kernel for torch.float64 on cpu"):
        pick_impl("grouped_mm", x.double(), small, inference=True)
    with pytest.raises(ValueError, match="unknown expert implementation 'fast'"):
        pick_impl("fast", x, small, inference=True)


def test_the_auto_choice_is_what_runs(monkeypatch):
    """Inference on a few tokens per expert takes ``padded``; a training step, ``loop``."""
    calls = []
    real = expert_compute.padded_ffn
    monkeypatch.setattr(
        "fairseq_moe_plugin.modules.experts.padded_ffn",
        lambda *a, **kw: calls.append("padded") or real(*a, **kw),
    )
    layer = make_layer(4, 2, dtype=torch.float32)
    x = torch.randn(12, D_MODEL)  # 24 assignments over 4 experts: every expert gets rows
    with torch.no_grad():
        layer.eval()(x)
    assert calls == ["padded"]
    layer.train()(x)[0].sum().backward()
    assert calls == ["padded"]


def test_a_decoding_step_computes_no_statistics():
    """The losses, counts and entropies are computed when first read, not in the forward."""
    layer = make_layer(8, 2, dtype=torch.float32).eval()
    with torch.no_grad():
        _, record = layer(torch.randn(5, D_MODEL))
    lazy = ("balance_loss", "z_loss", "logits_finite", "expert_counts_routed", "dropped",
            "dropped_tokens", "routed_tokens", "token_entropy", "entropy")  # fmt: skip
    assert not set(lazy) & set(vars(record))
    assert record.routed_tokens.item() == 5 and record.expert_counts_routed.sum().item() == 10
    assert "routed_tokens" in vars(record)  # cached once read
