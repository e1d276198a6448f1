"""Tests for fairseq_moe_plugin/modules/experts.py and moe_layer.py: the stacked experts and the
sort-based MoE layer, checked against dense FFNs and a naive per-token loop
(tests/helpers/naive_moe.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from moe_factories import D_FF, D_MODEL, assert_grads_close, make_layer, param_grads
from naive_moe import naive_keep_mask, naive_moe

import fairseq_moe_plugin.modules.routing.topk as topk_module
from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.experts import StackedExperts, get_activation_fn
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.moe_layer import MoELayer
from fairseq_moe_plugin.modules.routing.losses import load_balance_loss, routing_entropy


def sorted_plan(counts: list[int]) -> DispatchPlan:
    """The plan of rows already sorted by expert (the first counts[0] rows to expert 0, ...),
    one choice each, all kept: the experts' output row m is row m's expert output."""
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # M
    keep = torch.ones(len(experts), 1, dtype=torch.bool)
    plan = DispatchPlan.from_routing(experts.view(-1, 1), keep, len(counts))
    assert plan.tokens_per_expert == list(counts) and plan.order.tolist() == list(
        range(len(experts))
    )
    return plan


def dense_ffn_from_expert(experts: StackedExperts, e: int) -> nn.Sequential:
    """nn.Linear -> relu -> nn.Linear holding copies of expert e's weights."""
    fc1 = nn.Linear(experts.d_model, experts.d_ff).to(experts.fc1_weight.dtype)
    fc2 = nn.Linear(experts.d_ff, experts.d_model).to(experts.fc1_weight.dtype)
    with torch.no_grad():
        fc1.weight.copy_(experts.fc1_weight[e])
        fc1.bias.copy_(experts.fc1_bias[e])
        fc2.weight.copy_(experts.fc2_weight[e])
        fc2.bias.copy_(experts.fc2_bias[e])
    return nn.Sequential(fc1, nn.ReLU(), fc2)


# --------------------------------------------------------------------------------------------
# StackedExperts
# --------------------------------------------------------------------------------------------

_REFERENCE_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@pytest.mark.parametrize("name", sorted(_REFERENCE_ACTIVATIONS))
def test_expert_forward_is_linear_act_linear(name):
    torch.manual_seed(0)
    experts = StackedExperts(3, D_MODEL, D_FF, activation_fn=name).double()
    x = torch.randn(5, D_MODEL, dtype=torch.float64)  # M x C
    act = _REFERENCE_ACTIVATIONS[name]
    for e in range(3):
        h = act(x @ experts.fc1_weight[e].t() + experts.fc1_bias[e])  # M x d_ff
        expected = h @ experts.fc2_weight[e].t() + experts.fc2_bias[e]  # M x C
        torch.testing.assert_close(experts.expert_forward(e, x), expected)


def test_activation_lookup():
    x = torch.linspace(-3, 3, 13)
    for name, ref in _REFERENCE_ACTIVATIONS.items():
        torch.testing.assert_close(get_activation_fn(name)(x), ref(x))
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation_fn("swish_of_doom")


def test_experts_init_like_nn_linear():
    torch.manual_seed(0)
    experts = StackedExperts(4, 32, 64)
    assert experts.fc1_weight.shape == (4, 64, 32) and experts.fc1_bias.shape == (4, 64)
    assert experts.fc2_weight.shape == (4, 32, 64) and experts.fc2_bias.shape == (4, 32)
    assert experts.fc1_weight.abs().max() <= 32**-0.5
    assert experts.fc1_bias.abs().max() <= 32**-0.5
    assert experts.fc2_weight.abs().max() <= 64**-0.5
    assert experts.fc2_bias.abs().max() <= 64**-0.5
    assert experts.fc1_weight.abs().max() > 0.8 * 32**-0.5  # uses the full range
    assert not torch.equal(experts.fc1_weight[0], experts.fc1_weight[1])  # experts differ


def test_experts_grouped_forward_matches_per_expert():
    torch.manual_seed(0)
    experts = StackedExperts(4, D_MODEL, D_FF).double()
    counts = [3, 0, 5, 2]  # expert 1 receives nothing
    x = torch.randn(sum(counts), D_MODEL, dtype=torch.float64)  # M x C, sorted by expert
    expected = torch.cat(
        [experts.expert_forward(e, chunk) for e, chunk in enumerate(x.split(counts)) if len(chunk)]
    )  # M x C
    torch.testing.assert_close(experts(x, sorted_plan(counts)), expected)
    # gradients reach only experts that received tokens
    experts(x, sorted_plan(counts)).sum().backward()
    assert experts.fc1_weight.grad[1].abs().sum() == 0
    for e in (0, 2, 3):
        assert experts.fc1_weight.grad[e].abs().sum() > 0


def test_experts_bad_plans():
    experts = StackedExperts(3, D_MODEL, D_FF)
    x = torch.randn(4, D_MODEL)
    with pytest.raises(ValueError, match="tokens_per_expert .* cover the 4 tokens .* for 3 tokens"):
        experts(x, sorted_plan([1, 1, 1]))  # a plan for 3 tokens, not 4
    with pytest.raises(ValueError, match="tokens_per_expert must have 3 entries .* it has 2"):
        experts(x, sorted_plan([2, 2]))  # two entries for three experts


def test_experts_no_tokens():
    experts = StackedExperts(3, D_MODEL, D_FF).double()
    out = experts(torch.zeros(0, D_MODEL, dtype=torch.float64), sorted_plan([0, 0, 0]))
    assert out.shape == (0, D_MODEL) and out.dtype == torch.float64


def test_experts_activation_dropout_only_in_training():
    torch.manual_seed(0)
    experts = StackedExperts(2, D_MODEL, 64, activation_dropout=0.5)
    x = torch.randn(6, D_MODEL)
    experts.eval()
    a, b = experts(x, sorted_plan([3, 3])), experts(x, sorted_plan([3, 3]))
    assert torch.equal(a, b)
    experts.train()
    torch.manual_seed(1)
    c = experts(x, sorted_plan([3, 3]))
    assert not torch.allclose(a, c)


def test_experts_output_in_input_dtype():
    experts = StackedExperts(2, D_MODEL, D_FF).to(torch.bfloat16)
    out = experts(torch.randn(4, D_MODEL).to(torch.bfloat16), sorted_plan([1, 3]))
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# 1. E = 1, k = 1 equals a dense FFN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_single_expert_equals_dense_ffn(normalize):
    layer = make_layer(1, 1, normalize_top_k=normalize, capacity_factor=0.0)
    dense = dense_ffn_from_expert(layer.experts, 0)
    torch.manual_seed(1)
    x = torch.randn(4, 3, D_MODEL, dtype=torch.float64, requires_grad=True)  # T x B x C
    r = torch.randn(4, 3, D_MODEL, dtype=torch.float64)  # T x B x C, a random cotangent

    y, record = layer(x)
    assert y.shape == x.shape
    (y * r).sum().backward()
    x_grad = x.grad.clone()
    x.grad = None

    y_dense = dense(x)
    (y_dense * r).sum().backward()
    torch.testing.assert_close(y, y_dense)
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(layer.experts.fc1_weight.grad[0], dense[0].weight.grad)
    torch.testing.assert_close(layer.experts.fc1_bias.grad[0], dense[0].bias.grad)
    torch.testing.assert_close(layer.experts.fc2_weight.grad[0], dense[2].weight.grad)
    torch.testing.assert_close(layer.experts.fc2_bias.grad[0], dense[2].bias.grad)
    # softmax over one expert is constant: the router gets no gradient from the output
    assert layer.gate.wg.weight.grad is None or not layer.gate.wg.weight.grad.any()
    assert record.balance_loss.item() == pytest.approx(1.0)
    assert record.dropped.item() == 0


def test_single_expert_with_capacity_factor_one_drops_nothing():
    # capacity ceil(1 * 1 * N / 1) = N
    layer = make_layer(1, 1, normalize_top_k=False, capacity_factor=1.0)
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    y, record = layer(x)
    torch.testing.assert_close(y, dense_ffn_from_expert(layer.experts, 0)(x))
    assert record.dropped.item() == 0


# --------------------------------------------------------------------------------------------
# 2. k = E equals the softmax-weighted mixture of all experts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])  # all probabilities already sum to 1
def test_top_all_equals_softmax_mixture(normalize):
    num_experts = 4
    layer = make_layer(num_experts, num_experts, normalize_top_k=normalize, capacity_factor=0.0)
    torch.manual_seed(2)
    x = torch.randn(11, D_MODEL, dtype=torch.float64)  # N x C
    y, record = layer(x)

    probs = torch.softmax(x.float() @ layer.gate.wg.weight.float().t(), dim=-1)  # N x E
    expected = torch.zeros_like(x)
    for e in range(num_experts):
        expected += probs[:, e : e + 1].double() * layer.experts.expert_forward(e, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(record.expert_counts, torch.full((num_experts,), 11))


# --------------------------------------------------------------------------------------------
# 3. sort-based dispatch equals the naive per-token loop (forward and gradients)
# --------------------------------------------------------------------------------------------

_SETTINGS = [
    # (E, k, capacity_factor, normalize_top_k)
    (4, 1, 0.0, False),
    (4, 2, 0.0, True),
    (4, 2, 0.5, True),
    (4, 2, 0.5, False),
    (8, 2, 1.0, True),
    (6, 3, 0.75, False),
    (5, 1, 0.5, False),
    (3, 3, 1.25, True),
    (8, 4, 0.5, True),
    (2, 1, 0.3, True),
]


@pytest.mark.parametrize("num_experts, k, factor, normalize", _SETTINGS)
def test_dispatch_matches_naive_loop(num_experts, k, factor, normalize):
    layer = make_layer(num_experts, k, normalize_top_k=normalize, capacity_factor=factor, seed=k)
    torch.manual_seed(10 * num_experts + k)
    num_tokens = 24
    x = torch.randn(num_tokens, D_MODEL, dtype=torch.float64, requires_grad=True)  # N x C
    r = torch.randn(num_tokens, D_MODEL, dtype=torch.float64)  # N x C cotangent

    y, record = layer(x)
    (y * r).sum().backward()
    x_grad, grads = x.grad.clone(), param_grads(layer)
    x.grad = None

    gate_out = layer.gate(x)
    chosen = gate_out.probs.gather(1, gate_out.expert_index).detach()  # N x k
    keep = naive_keep_mask(gate_out.expert_index, chosen, num_experts, gate_out.capacity)
    assert torch.equal(gate_out.keep, keep)
    expected_capacity = math.ceil(factor * k * num_tokens / num_experts) if factor > 0 else 24
    assert gate_out.capacity == expected_capacity
    if (num_experts, k, factor) in {(4, 2, 0.5), (8, 4, 0.5), (5, 1, 0.5), (2, 1, 0.3)}:
        assert not keep.all(), "the setting was meant to make capacity bind"
    y_ref = naive_moe(layer.experts, x, gate_out, normalize, keep=keep)
    (y_ref * r).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, param_grads(layer), rtol=1e-5, atol=1e-6)
    # The router learns from y unless its weights are identically 1 (top-1, normalised), where
    # d(p / p)/dp = 0 exactly (in float, 0 or rounding noise).
    assert grads["gate.wg.weight"].abs().sum() > 0 or (k == 1 and normalize)
    # dropped assignments contribute nothing: fully dropped tokens give exactly zero
    dropped_tokens = ~keep.any(dim=-1)
    assert not y[dropped_tokens].any()
    assert record.dropped.item() == int((~keep).sum())


def test_dispatch_matches_naive_loop_in_eval_with_eval_capacity():
    layer = make_layer(4, 2, capacity_factor=0.0, eval_capacity_factor=0.5).eval()
    torch.manual_seed(5)
    x = torch.randn(20, D_MODEL, dtype=torch.float64)
    y, record = layer(x)
    gate_out = layer.gate(x)
    assert gate_out.capacity == 5  # ceil(.5 * 2 * 20 / 4)
    assert record.dropped.item() > 0
    torch.testing.assert_close(y, naive_moe(layer.experts, x, gate_out, True), rtol=1e-5, atol=0)


def test_eval_is_dropless_by_default_even_with_tiny_capacity_factor():
    layer = make_layer(4, 2, capacity_factor=0.1)
    torch.manual_seed(6)
    x = torch.randn(20, D_MODEL, dtype=torch.float64)
    _, record = layer(x)
    assert record.dropped.item() > 0  # training: capacity ceil(.1 * 2 * 20 / 4) = 1
    layer.eval()
    y, record = layer(x)
    assert record.dropped.item() == 0
    gate_out = layer.gate(x)
    assert gate_out.keep.all()
    torch.testing.assert_close(y, naive_moe(layer.experts, x, gate_out, True), rtol=1e-5, atol=0)


def test_leading_shape_is_flattened_and_restored():
    layer = make_layer(4, 2, capacity_factor=0.75)
    torch.manual_seed(7)
    x = torch.randn(5, 3, D_MODEL, dtype=torch.float64)  # T x B x C
    y, record = layer(x)
    y_flat, record_flat = layer(x.reshape(15, D_MODEL))
    assert y.shape == (5, 3, D_MODEL)
    torch.testing.assert_close(y.reshape(15, D_MODEL), y_flat)
    assert torch.equal(record.expert_counts, record_flat.expert_counts)


# --------------------------------------------------------------------------------------------
# 6. padding
# --------------------------------------------------------------------------------------------


def _padded_batch(seed: int = 0):
    """x: T x B x C and its padding mask (T x B, True at padding)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 1, 6]  # B = 4 sentences
    time_steps = 7
    mask = torch.arange(time_steps)[:, None] >= torch.tensor(lengths)[None, :]  # T x B
    x = torch.randn(time_steps, len(lengths), D_MODEL, generator=gen, dtype=torch.float64)
    return x, mask


@pytest.mark.parametrize("garbage", ["random", "huge", "nan"])
@pytest.mark.parametrize("k, factor", [(1, 0.5), (2, 0.5), (2, 0.0)])
def test_padding_changes_nothing(garbage, k, factor):
    layer = make_layer(4, k, capacity_factor=factor)
    x, mask = _padded_batch()
    n_real = int((~mask).sum())
    x_real = x[~mask].clone().requires_grad_(True)  # N x C, the non-pad tokens in order
    y_ref, rec_ref = layer(x_real)
    y_ref.sum().backward()
    grads_ref = param_grads(layer)

    fill = {
        "random": 1e3 * torch.randn_like(x),
        "huge": torch.full_like(x, 1e30),
        "nan": torch.full_like(x, float("nan")),
    }[garbage]
    x_pad = torch.where(mask[..., None], fill, x).requires_grad_(True)  # T x B x C
    y, rec = layer(x_pad, padding_mask=mask)
    y.sum().backward()

    assert y.shape == x.shape
    assert torch.equal(y[mask], torch.zeros(int(mask.sum()), D_MODEL, dtype=y.dtype))
    torch.testing.assert_close(y[~mask], y_ref, rtol=0, atol=0)
    assert torch.isfinite(x_pad.grad).all()
    assert not x_pad.grad[mask].any()
    torch.testing.assert_close(x_pad.grad[~mask], x_real.grad)
    assert_grads_close(param_grads(layer), grads_ref)
    torch.testing.assert_close(rec.balance_loss, rec_ref.balance_loss, rtol=0, atol=0)
    torch.testing.assert_close(rec.z_loss, rec_ref.z_loss, rtol=0, atol=0)
    for key in (
        "expert_counts",
        "expert_counts_routed",
        "dropped",
        "dropped_tokens",
        "routed_tokens",
        "entropy",
    ):
        assert torch.equal(getattr(rec, key), getattr(rec_ref, key)), key
    assert rec.routed_tokens.item() == n_real
    if factor > 0:
        assert rec.dropped.item() > 0  # capacity, computed from N real tokens, binds


def test_padding_values_do_not_matter():
    layer = make_layer(4, 2, capacity_factor=0.5)
    x, mask = _padded_batch(seed=1)
    y1, rec1 = layer(x, padding_mask=mask)
    x2 = torch.where(mask[..., None], torch.randn_like(x) * 50, x)
    y2, rec2 = layer(x2, padding_mask=mask)
    assert torch.equal(y1, y2)
    assert torch.equal(rec1.balance_loss, rec2.balance_loss)
    assert torch.equal(rec1.expert_counts, rec2.expert_counts)


def test_no_padding_mask_equals_all_false_mask():
    layer = make_layer(4, 2, capacity_factor=0.5)
    x, mask = _padded_batch(seed=2)
    y1, rec1 = layer(x)
    y2, rec2 = layer(x, padding_mask=torch.zeros_like(mask))
    assert torch.equal(y1, y2)
    assert torch.equal(rec1.expert_counts, rec2.expert_counts)


# --------------------------------------------------------------------------------------------
# 8. routing records
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts, k, factor", [(4, 1, 0.5), (4, 2, 0.3), (6, 3, 0.0)])
def test_records(num_experts, k, factor):
    layer = make_layer(num_experts, k, capacity_factor=factor)
    x, mask = _padded_batch(seed=3)
    y, rec = layer(x, padding_mask=mask)
    x_real = x[~mask]  # N x C
    n_real = x_real.shape[0]
    gate_out = layer.gate(x_real)  # deterministic: no jitter
    keep, index = gate_out.keep, gate_out.expert_index  # N x k

    assert rec.layer == "encoder.layers.0"
    assert rec.k == k
    assert rec.expert_counts.shape == (num_experts,)
    assert rec.expert_counts.dtype == torch.long
    assert torch.equal(rec.expert_counts, torch.bincount(index[keep], minlength=num_experts))
    assert torch.equal(
        rec.expert_counts_routed, torch.bincount(index.reshape(-1), minlength=num_experts)
    )
    assert rec.expert_counts.sum().item() == int(keep.sum())
    assert rec.expert_counts_routed.sum().item() == n_real * k
    assert rec.dropped.item() == n_real * k - int(keep.sum())
    assert rec.dropped_tokens.item() == int((~keep.any(dim=-1)).sum())
    assert rec.routed_tokens.item() == n_real == int((~mask).sum())
    assert torch.all(rec.expert_counts <= gate_out.capacity)
    if factor > 0:
        assert rec.dropped.item() > 0
    if k == 1 and factor > 0:
        assert rec.dropped_tokens.item() == rec.dropped.item() > 0

    probs = gate_out.probs  # N x E
    expected_entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(rec.entropy, routing_entropy(probs).mean())
    torch.testing.assert_close(rec.entropy, expected_entropy)
    assert rec.entropy.dtype == torch.float32 and not rec.entropy.requires_grad

    torch.testing.assert_close(rec.balance_loss, load_balance_loss(probs, index))
    torch.testing.assert_close(rec.z_loss, torch.logsumexp(gate_out.logits, -1).pow(2).mean())
    assert rec.balance_loss.requires_grad and rec.z_loss.requires_grad
    for key in ("expert_counts", "expert_counts_routed", "dropped", "dropped_tokens"):
        assert not getattr(rec, key).requires_grad, key
    (rec.balance_loss + rec.z_loss).backward()
    assert layer.gate.wg.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# 9. edge cases
# --------------------------------------------------------------------------------------------


def test_every_assignment_dropped(monkeypatch):
    monkeypatch.setattr(topk_module, "expert_capacity", lambda *args: 0)
    layer = make_layer(4, 2, capacity_factor=1.0)
    torch.manual_seed(8)
    x = torch.randn(6, 2, D_MODEL, dtype=torch.float64, requires_grad=True)  # T x B x C
    y, rec = layer(x)
    assert y.shape == x.shape
    assert not y.any()
    assert rec.dropped.item() == 6 * 2 * 2
    assert rec.dropped_tokens.item() == 12
    assert not rec.expert_counts.any()
    assert rec.expert_counts_routed.sum().item() == 24
    (y.sum() + rec.balance_loss + rec.z_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for p in layer.experts.parameters():  # no expert ran
        assert p.grad is None or not p.grad.any()


@pytest.mark.parametrize("k, factor", [(1, 1.0), (2, 1.0), (2, 0.1), (4, 0.0)])
def test_single_token(k, factor):
    layer = make_layer(4, k, capacity_factor=factor)
    torch.manual_seed(9)
    x = torch.randn(1, 1, D_MODEL, dtype=torch.float64, requires_grad=True)  # T x B x C
    y, rec = layer(x)
    gate_out = layer.gate(x.reshape(1, D_MODEL))
    assert gate_out.keep.all()  # capacity >= 1 always fits a single token's k distinct choices
    y_ref = naive_moe(layer.experts, x.reshape(1, D_MODEL), gate_out, True)
    torch.testing.assert_close(y.reshape(1, D_MODEL), y_ref, rtol=1e-5, atol=1e-6)
    assert rec.routed_tokens.item() == 1 and rec.dropped.item() == 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("how", ["all_padding", "zero_length"])
def test_no_tokens(how):
    layer = make_layer(4, 2, capacity_factor=1.0)
    if how == "all_padding":
        x = torch.randn(3, 2, D_MODEL, dtype=torch.float64, requires_grad=True)  # T x B x C
        mask: torch.Tensor | None = torch.ones(3, 2, dtype=torch.bool)  # T x B
    else:
        x = torch.randn(0, 2, D_MODEL, dtype=torch.float64, requires_grad=True)  # 0 x B x C
        mask = None
    y, rec = layer(x, padding_mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype and not y.any()
    assert rec.balance_loss.item() == 0.0 and rec.z_loss.item() == 0.0
    assert rec.routed_tokens.item() == 0
    assert rec.dropped.item() == 0 and rec.dropped_tokens.item() == 0
    assert not rec.expert_counts.any() and not rec.expert_counts_routed.any()
    assert rec.entropy.item() == 0.0
    (y.sum() + rec.balance_loss + rec.z_loss).backward()
    if x.grad is not None:
        assert not x.grad.any()
    for p in layer.parameters():
        assert p.grad is None or not p.grad.any()


# --------------------------------------------------------------------------------------------
# 10. precision
# --------------------------------------------------------------------------------------------


def test_bf16_layer_routes_in_fp32_and_outputs_bf16():
    layer32 = make_layer(4, 2, capacity_factor=0.0, dtype=torch.float32)
    layer16 = make_layer(4, 2, capacity_factor=0.0, dtype=torch.float32).to(torch.bfloat16)
    layer32.load_state_dict({k: v.float() for k, v in layer16.state_dict().items()})
    torch.manual_seed(11)
    x16 = torch.randn(3, 5, D_MODEL).to(torch.bfloat16)  # T x B x C
    y16, rec16 = layer16(x16)
    assert y16.dtype == torch.bfloat16
    assert rec16.balance_loss.dtype == torch.float32
    assert rec16.z_loss.dtype == torch.float32
    gate_out = layer16.gate(x16.reshape(-1, D_MODEL))
    assert gate_out.logits.dtype == torch.float32
    assert gate_out.expert_weight.dtype == torch.float32
    # the fp32 router on the same values decides exactly the same
    gate_ref = layer32.gate(x16.reshape(-1, D_MODEL).float())
    assert torch.equal(gate_out.logits, gate_ref.logits)
    assert torch.equal(gate_out.expert_index, gate_ref.expert_index)
    y32, _ = layer32(x16.float())
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)
    y16.float().sum().backward()
    assert layer16.experts.fc1_weight.grad.dtype == torch.bfloat16
    assert layer16.gate.wg.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("use_mask", [False, True])
def test_layer_under_autocast(use_mask):
    layer = make_layer(4, 2, capacity_factor=0.75, dtype=torch.float32)
    x, mask = _padded_batch(seed=4)
    x = x.float().requires_grad_(True)  # T x B x C
    mask = mask if use_mask else None
    y_ref, rec_ref = layer(x, padding_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, rec = layer(x, padding_mask=mask)
    assert y.shape == x.shape
    # routing is fp32 and unaffected by autocast; only the expert matmuls run in bf16
    assert rec.balance_loss.dtype == torch.float32
    assert torch.equal(rec.balance_loss, rec_ref.balance_loss)
    assert torch.equal(rec.expert_counts, rec_ref.expert_counts)
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)
    if use_mask:
        assert not y[mask].any()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# 11. jitter reaches the router only
# --------------------------------------------------------------------------------------------


def test_jitter_changes_routing_but_not_expert_input():
    layer = make_layer(4, 2, capacity_factor=0.0, jitter_eps=0.2)
    torch.manual_seed(12)
    x = torch.randn(16, D_MODEL, dtype=torch.float64)  # N x C
    torch.manual_seed(100)
    y, _ = layer(x)
    torch.manual_seed(100)
    gate_out = layer.gate(x)  # the same noise draw
    clean_logits = x.float() @ layer.gate.wg.weight.float().t()
    assert not torch.allclose(gate_out.logits, clean_logits)  # jittered routing
    # the experts saw the clean x (the naive loop feeds x itself)
    torch.testing.assert_close(y, naive_moe(layer.experts, x, gate_out, True), rtol=1e-5, atol=0)

    layer.eval()
    torch.manual_seed(1)
    y1, _ = layer(x)
    torch.manual_seed(2)
    y2, _ = layer(x)
    assert torch.equal(y1, y2)


def test_jitter_single_expert_still_dense():
    layer = make_layer(1, 1, normalize_top_k=False, capacity_factor=0.0, jitter_eps=0.5)
    x = torch.randn(7, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y, dense_ffn_from_expert(layer.experts, 0)(x))


# --------------------------------------------------------------------------------------------
# 12. argument checks
# --------------------------------------------------------------------------------------------


def test_bad_expert_arguments():
    with pytest.raises(ValueError, match="FFN size"):
        StackedExperts(4, D_MODEL, 0)
    with pytest.raises(ValueError, match="num_experts"):
        StackedExperts(0, D_MODEL, D_FF)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        StackedExperts(4, D_MODEL, D_FF, activation_fn="swishy")


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="gate has 4 experts but experts has 3"):
        MoELayer(TopKGate(D_MODEL, 4), StackedExperts(3, D_MODEL, D_FF))
    with pytest.raises(ValueError, match="top-k"):
        TopKGate(D_MODEL, 2, k=3)


@pytest.mark.parametrize("mask_shape", [(3,), (2, 3), (3, 2, 1), (4, 2)])
def test_wrong_padding_mask_shape(mask_shape):
    layer = make_layer(4, 2)
    x = torch.randn(3, 2, D_MODEL, dtype=torch.float64)  # T x B x C
    with pytest.raises(ValueError, match="padding_mask has shape"):
        layer(x, padding_mask=torch.zeros(mask_shape, dtype=torch.bool))
