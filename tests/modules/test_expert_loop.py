"""The fast expert path (fairseq_moe_plugin/modules/grouped_ffn.py, grad_buffers.py): its
hand-written backward against autograd, the whole layer against the naive per-token loop on
random settings, and the safety of reusing weight-gradient buffers."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from moe_factories import D_MODEL, assert_grads_close, make_layer, param_grads
from naive_moe import naive_moe

import fairseq_moe_plugin.modules.routing.topk as topk_module
from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.expert_loop import grouped_expert_ffn
from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.grad_buffers import GradientBuffers

ACTIVATIONS = ["relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear"]


def _random_padded_batch(gen: torch.Generator, time_steps: int, batch: int):
    """x: T x B x C (float64) and a random padding mask (T x B, True at padding, right-padded)."""
    lengths = torch.randint(0, time_steps + 1, (batch,), generator=gen)
    mask = torch.arange(time_steps)[:, None] >= lengths[None, :]  # T x B
    x = torch.randn(time_steps, batch, D_MODEL, generator=gen, dtype=torch.float64)
    return x, mask


def _layer_vs_naive(layer, x, mask, normalize):
    """Run the layer and the naive loop on the same tokens; compare outputs and all gradients."""
    x = x.clone().requires_grad_(True)
    r = torch.randn_like(x)  # a random cotangent
    y, record = layer(x, padding_mask=mask)
    (y * r).sum().backward()
    grads, x_grad = param_grads(layer), x.grad.clone()

    x_ref = x.detach().clone().requires_grad_(True)
    real = (
        ~mask.reshape(-1) if mask is not None else torch.ones(x.shape[0] * x.shape[1], dtype=bool)
    )
    tokens = x_ref.reshape(-1, D_MODEL)[real]  # N x C
    gate_out = layer.gate(tokens)
    y_ref = (x_ref * 0).reshape(-1, D_MODEL)  # zero, but on the graph when no token is routed
    y_ref[real] = naive_moe(layer.experts, tokens, gate_out, normalize)
    (y_ref.view_as(x) * r).sum().backward()

    # The router runs in fp32, so its decisions and gradients carry fp32 rounding.
    torch.testing.assert_close(y, y_ref.view_as(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, param_grads(layer), rtol=1e-5, atol=1e-6)
    return record


@pytest.mark.parametrize("seed", range(24))
def test_random_settings_match_the_naive_loop(seed):
    """Random E, k, capacity factor, padding, activation and normalisation; float64."""
    rng = random.Random(seed)
    num_experts = rng.choice([1, 2, 3, 5, 8, 9])
    k = rng.randint(1, min(num_experts, 4))
    factor = rng.choice([0.0, 0.25, 0.6, 1.0, 1.5])
    normalize = rng.random() < 0.5
    activation = rng.choice(ACTIVATIONS)
    layer = make_layer(
        num_experts, k, normalize_top_k=normalize, capacity_factor=factor,
        activation_fn=activation, seed=seed,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    x, mask = _random_padded_batch(gen, rng.randint(1, 9), rng.randint(1, 5))
    use_mask = rng.random() < 0.7
    _layer_vs_naive(layer, x, mask if use_mask else None, normalize)


def test_empty_experts_get_exactly_zero_gradient():
    layer = make_layer(6, 2, capacity_factor=0.0)
    with torch.no_grad():  # experts 2 and 5 can never win a top-2 choice
        layer.gate.wg.weight[2] = -100.0 * layer.gate.wg.weight[2].abs().sum()
        layer.gate.wg.weight[5] = layer.gate.wg.weight[2]
    x = torch.randn(40, D_MODEL, dtype=torch.float64).abs()  # positive: the large weights win
    record = _layer_vs_naive(layer, x.unsqueeze(1), None, True)
    assert record.expert_counts[[2, 5]].tolist() == [0, 0]
    assert record.expert_counts.sum() == 80
    layer.zero_grad(set_to_none=True)
    layer(x)[0].sum().backward()
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        grad = getattr(layer.experts, name).grad
        assert not grad[[2, 5]].any(), name
        assert grad[[0, 1, 3, 4]].abs().sum() > 0, name


def test_every_token_dropped_matches_the_naive_loop(monkeypatch):
    monkeypatch.setattr(topk_module, "expert_capacity", lambda *args: 0)
    layer = make_layer(4, 2, capacity_factor=1.0)
    x, mask = _random_padded_batch(torch.Generator().manual_seed(3), 5, 3)
    record = _layer_vs_naive(layer, x, mask, True)
    assert record.expert_counts.sum() == 0


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_a_single_expert_matches_the_naive_loop(factor):
    layer = make_layer(1, 1, normalize_top_k=False, capacity_factor=factor, seed=4)
    x, mask = _random_padded_batch(torch.Generator().manual_seed(4), 8, 4)
    record = _layer_vs_naive(layer, x, mask, False)
    assert record.dropped.item() == (0 if factor == 0 else record.routed_tokens.item() // 2)


@pytest.mark.parametrize("num_experts, k", [(1, 1), (4, 1), (4, 3)])
def test_one_token_matches_the_naive_loop(num_experts, k):
    layer = make_layer(num_experts, k, capacity_factor=1.0)
    x = torch.randn(1, 1, D_MODEL, dtype=torch.float64)
    _layer_vs_naive(layer, x, None, True)


# --------------------------------------------------------------------------------------------
# the hand-written backward against autograd (gradcheck in float64)
# --------------------------------------------------------------------------------------------


def _plan_and_inputs(seed: int, num_experts: int = 3, k: int = 2, num_tokens: int = 5):
    gen = torch.Generator().manual_seed(seed)
    expert_index = torch.stack(
        [torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)]
    )  # N x k, distinct per token
    keep = torch.rand(num_tokens, k, generator=gen) > 0.2  # some choices dropped
    keep[0] = True
    plan = DispatchPlan.from_routing(expert_index, keep, num_experts)
    x = torch.randn(num_tokens, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(num_tokens, k, generator=gen, dtype=torch.float64) * keep
    experts = StackedExperts(num_experts, 4, 6).double()
    return plan, x, weight.requires_grad_(True), experts


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_passes_gradcheck(activation):
    plan, x, weight, experts = _plan_and_inputs(0)
    params = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]

    def fn(x, weight, *params):
        return grouped_expert_ffn(x, plan, *params, activation=activation, weight=weight)

    assert torch.autograd.gradcheck(fn, (x, weight, *params))


@pytest.mark.parametrize("dropout_p", [0.3, 1.0])
def test_backward_with_activation_dropout_passes_gradcheck(dropout_p):
    plan, x, weight, experts = _plan_and_inputs(1)
    params = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]

    def fn(x, weight, *params):
        torch.manual_seed(7)  # the same dropout mask on every call
        return grouped_expert_ffn(
            x, plan, *params, activation="gelu", weight=weight, dropout_p=dropout_p
        )

    assert torch.autograd.gradcheck(fn, (x, weight, *params))
    if dropout_p == 1.0:  # every activation dropped: each choice contributes its fc2 bias
        counts = torch.tensor(plan.tokens_per_expert)
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)  # M
        expected = torch.zeros_like(x)
        for m, flat in enumerate(plan.order.tolist()):  # flat = token * k + choice, k = 2
            expected[flat // 2] += weight.reshape(-1)[flat] * params[3][expert_of_row[m]]
        torch.testing.assert_close(fn(x, weight, *params), expected)


def test_activation_dropout_matches_a_reference_with_the_same_mask():
    plan, x, weight, experts = _plan_and_inputs(2)
    experts.activation_dropout = 0.5
    experts.train()
    torch.manual_seed(11)
    y = experts(x, plan, weight)
    # The same draw, reproduced: one Bernoulli(0.5) bool mask per non-empty expert, in order.
    torch.manual_seed(11)
    expected = torch.zeros_like(y)
    rows = plan.token_index
    start = 0
    for e, count in enumerate(plan.tokens_per_expert):
        if count == 0:
            continue
        xe = x[rows[start : start + count]]
        h = torch.relu(xe @ experts.fc1_weight[e].t() + experts.fc1_bias[e])
        mask = torch.empty_like(h, dtype=torch.bool).bernoulli_(0.5)
        out = (h * mask * 2.0) @ experts.fc2_weight[e].t() + experts.fc2_bias[e]
        flat = plan.order[start : start + count]
        w = weight.reshape(-1)[flat].unsqueeze(1)
        expected = expected.index_add(0, rows[start : start + count], out * w)
        start += count
    torch.testing.assert_close(y, expected)


def test_double_backward_is_refused():
    plan, x, weight, experts = _plan_and_inputs(3)
    y = experts(x, plan, weight)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gx.sum().backward()


def test_bad_plan_and_weights():
    plan, x, weight, experts = _plan_and_inputs(4)
    with pytest.raises(ValueError, match="combine weights must have shape"):
        experts(x, plan, weight[:, :1])
    with pytest.raises(ValueError, match="cover the 4 tokens of x; it has 3 entries for 5 tokens"):
        experts(x[:4], plan, weight)
    other, *_ = _plan_and_inputs(4, num_experts=2)
    with pytest.raises(ValueError, match="tokens_per_expert must have 3 entries"):
        experts(x, other, weight)


def test_plan_from_routing():
    expert_index = torch.tensor([[2, 0], [0, 1], [2, 1]])  # N=3, k=2
    keep = torch.tensor([[True, True], [True, False], [True, True]])
    plan = DispatchPlan.from_routing(expert_index, keep, 4)
    assert plan.tokens_per_expert == [2, 1, 2, 0]
    # expert 0: (t0, j1)=1, (t1, j0)=2; expert 1: (t2, j1)=5; expert 2: (t0, j0)=0, (t2, j0)=4
    assert plan.order.tolist() == [1, 2, 5, 0, 4]
    assert plan.token_index.tolist() == [0, 1, 2, 0, 2]
    assert plan.combine_index.tolist() == [[3, 0], [1, 5], [4, 2]]  # 5 = M: the dropped choice


# --------------------------------------------------------------------------------------------
# reused weight-gradient buffers
# --------------------------------------------------------------------------------------------


def _step(layer, x):
    y, record = layer(x)
    (y.sum() + record.balance_loss).backward()


def test_buffers_are_reused_when_free_and_results_do_not_change():
    x = torch.randn(30, D_MODEL, dtype=torch.float64)
    reused, fresh = make_layer(4, 2), make_layer(4, 2)
    fresh.experts.grad_buffers.enabled = False
    pointers = []
    for _ in range(3):
        _step(reused, x)
        _step(fresh, x)
        pointers.append(reused.experts.fc1_weight.grad.data_ptr())
        assert_grads_close(param_grads(reused), param_grads(fresh), rtol=0, atol=0)  # -> None
    assert len(set(pointers)) == 1  # the same memory every step
    assert len(reused.experts.grad_buffers) == 2  # fc1_weight and fc2_weight
    assert len(fresh.experts.grad_buffers) == 0


def test_gradient_accumulation_is_not_overwritten():
    x1 = torch.randn(20, D_MODEL, dtype=torch.float64)
    x2 = torch.randn(20, D_MODEL, dtype=torch.float64)
    layer, reference = make_layer(4, 2), make_layer(4, 2)
    reference.experts.grad_buffers.enabled = False
    for model in (layer, reference):
        _step(model, x1)  # p.grad holds the first buffer ...
        _step(model, x2)  # ... so the second backward must not write into it
    assert_grads_close(param_grads(layer), param_grads(reference), rtol=0, atol=0)


def test_a_gradient_kept_by_the_caller_is_never_overwritten():
    layer = make_layer(4, 2)
    x = torch.randn(20, D_MODEL, dtype=torch.float64)
    _step(layer, x)
    kept = layer.experts.fc2_weight.grad[1:3]  # a view the caller keeps
    copy_of_kept = kept.clone()
    layer.zero_grad(set_to_none=True)
    _step(layer, 2 * x)
    assert torch.equal(kept, copy_of_kept)
    assert layer.experts.fc2_weight.grad.data_ptr() != kept.untyped_storage().data_ptr()


def test_eval_deepcopy_and_pickle_drop_the_buffers():
    layer = make_layer(4, 2)
    _step(layer, torch.randn(10, D_MODEL, dtype=torch.float64))
    assert len(layer.experts.grad_buffers) == 2
    assert len(copy.deepcopy(layer).experts.grad_buffers) == 0
    state = layer.experts.grad_buffers.__getstate__()
    assert state["_buffers"] == {} and state["enabled"]
    layer.eval()
    assert len(layer.experts.grad_buffers) == 0


def test_buffers_follow_shape_and_dtype():
    buffers = GradientBuffers()
    a = buffers.empty_like("w", torch.zeros(2, 3))
    ptr = a.data_ptr()
    del a
    assert buffers.empty_like("w", torch.zeros(2, 3)).data_ptr() == ptr  # free: reused
    b = buffers.empty_like("w", torch.zeros(2, 3, dtype=torch.float64))
    assert b.dtype == torch.float64 and b.shape == (2, 3)
    assert GradientBuffers(enabled=False).empty_like("w", torch.zeros(1)).shape == (1,)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_inference_path_equals_the_autograd_path(activation):
    layer = make_layer(5, 2, capacity_factor=0.5, activation_fn=activation)
    layer.experts.impl = "loop"  # its no-grad branch; the other paths: test_expert_compute.py
    x, mask = _random_padded_batch(torch.Generator().manual_seed(5), 6, 3)
    y_train, record_train = layer(x, padding_mask=mask)
    assert y_train.grad_fn is not None
    with torch.no_grad():
        y_infer, record_infer = layer(x, padding_mask=mask)
    assert y_infer.grad_fn is None
    assert torch.equal(y_infer, y_train.detach())
    assert torch.equal(record_infer.expert_counts, record_train.expert_counts)


def test_frozen_experts_still_pass_gradients_to_the_input_and_router():
    layer = make_layer(4, 2, capacity_factor=0.0)
    frozen = make_layer(4, 2, capacity_factor=0.0)
    for p in frozen.experts.parameters():
        p.requires_grad_(False)
    x = torch.randn(12, D_MODEL, dtype=torch.float64)
    grads = {}
    for name, model in (("trainable", layer), ("frozen", frozen)):
        xi = x.clone().requires_grad_(True)
        model(xi)[0].sum().backward()
        grads[name] = (xi.grad, model.gate.wg.weight.grad)
    assert all(p.grad is None for p in frozen.experts.parameters())
    torch.testing.assert_close(grads["frozen"][0], grads["trainable"][0])
    torch.testing.assert_close(grads["frozen"][1], grads["trainable"][1])
