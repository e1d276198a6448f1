"""Tests for fairseq_moe_plugin/modules/lora_experts.py: LoRA experts adapting a shared frozen
FFN, mixed at each linear layer (MoLoRA), checked against a naive per-token Python loop written
here (no shared code with the module's grouped path), alone and inside ``MoELayer``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.lora_experts import LoRAExperts
from fairseq_moe_plugin.modules.moe_layer import MoELayer

E, C, FF, R = 4, 6, 10, 3  # experts, d_model, d_ff, rank
LORA = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def make_experts(activation: str = "relu", random_b: bool = True, **kwargs) -> LoRAExperts:
    """float64 experts; B drawn at random (fresh init has B = 0, making the deltas vanish)."""
    experts = LoRAExperts(E, C, FF, rank=R, alpha=5.0, activation_fn=activation, **kwargs)
    experts = experts.double()
    if random_b:
        with torch.no_grad():
            experts.lora_b1.normal_()
            experts.lora_b2.normal_()
    return experts


def naive_token(experts: LoRAExperts, x: torch.Tensor, choices) -> torch.Tensor:
    """One token x (C) with its kept choices [(expert, weight)]: the frozen FFN once, with the
    weighted LoRA deltas summed at fc1 and at fc2, vector by vector."""
    act = experts.activation_fn
    s = experts.alpha / experts.rank
    w1, b1, w2, b2 = experts.fc1.weight, experts.fc1.bias, experts.fc2.weight, experts.fc2.bias
    a1, lb1, a2, lb2 = (getattr(experts, n) for n in LORA)
    h = w1 @ x + b1  # F
    for e, w in choices:
        h = h + w * s * (lb1[e] @ (a1[e] @ x))
    a = act(h)  # F
    y = w2 @ a + b2  # C
    for e, w in choices:
        y = y + w * s * (lb2[e] @ (a2[e] @ a))
    return y


def naive_expert(experts: LoRAExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """The frozen FFN with expert e's deltas at weight 1, on one token x (C)."""
    return naive_token(experts, x, [(e, 1.0)])


def naive_moe(experts, x, expert_index, weight, keep) -> torch.Tensor:
    """Row t: the frozen FFN on x[t] adapted by weight[t, j] * expert_{index[t, j]}'s deltas
    over t's kept choices j (the plain frozen FFN with none)."""
    if weight is not None:  # the gate's fp32 weights, cast once (each is used at fc1 and fc2)
        weight = weight.to(x.dtype)
    rows = []
    for t in range(x.shape[0]):
        choices = [
            (int(expert_index[t, j]), 1.0 if weight is None else weight[t, j])
            for j in range(expert_index.shape[1])
            if keep is None or bool(keep[t, j])
        ]
        rows.append(naive_token(experts, x[t], choices))
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def frozen_ffn(experts: LoRAExperts, x: torch.Tensor) -> torch.Tensor:
    return experts.fc2(experts.activation_fn(experts.fc1(x)))  # N x C


def routing(kind: str, num_tokens: int, drop: bool, seed: int = 0):
    """(expert_index N x k, combine weights N x k, keep N x k or None) for top1/top2/dense."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "top1":  # expert E-1 gets no token
        index = torch.randint(0, E - 1, (num_tokens, 1), generator=gen)
        weight = torch.rand(num_tokens, 1, generator=gen, dtype=torch.float64)
    elif kind == "top2":
        index = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(num_tokens)])
        weight = torch.rand(num_tokens, 2, generator=gen, dtype=torch.float64)
    else:  # dense: every token to all E experts, softmax-weighted
        index = torch.arange(E).expand(num_tokens, E).contiguous()
        logits = torch.randn(num_tokens, E, generator=gen, dtype=torch.float64)
        weight = logits.softmax(dim=-1)
    keep = None
    if drop:
        keep = torch.rand(index.shape, generator=gen) > 0.35
        keep[0] = False  # token 0 keeps nothing
    return index, weight, keep


def grads(tensors) -> list[torch.Tensor]:
    out = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("kind", ["top1", "top2", "dense"])
def test_forward_and_gradients_match_naive_loop(kind, drop, activation):
    experts = make_experts(activation)
    num_tokens = 9
    index, weight, keep = routing(kind, num_tokens, drop)
    plan = DispatchPlan.from_routing(index, keep, E)
    x = torch.randn(num_tokens, C, dtype=torch.float64, requires_grad=True)
    weight.requires_grad_(True)
    probe = torch.randn(num_tokens, C, dtype=torch.float64)  # a non-uniform output gradient
    params = [getattr(experts, n) for n in LORA]

    y = experts(x, plan, weight)  # N x C
    (y * probe).sum().backward()
    got = grads([x, weight, *params])
    y_ref = naive_moe(experts, x, index, weight, keep)
    (y_ref * probe).sum().backward()
    expected = grads([x, weight, *params])

    torch.testing.assert_close(y, y_ref)
    for name, g, g_ref in zip(["x", "weight", *LORA], got, expected, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, n=name: f"{n}: {m}")
    assert got[1].abs().sum() > 0  # the router's weights get a gradient through the deltas
    if drop:
        assert not keep[0].any()
        torch.testing.assert_close(y[0], frozen_ffn(experts, x[0]))  # no kept choice: the FFN
        assert not got[1][~keep].any()  # dropped choices get no weight gradient
    if kind == "top1":
        for g in got[2:]:
            assert not g[E - 1].any()  # the expert with no token gets zero gradients


def test_no_weights_means_one():
    experts = make_experts()
    index, _, keep = routing("top2", 5, drop=True)
    x = torch.randn(5, C, dtype=torch.float64)
    y = experts(x, DispatchPlan.from_routing(index, keep, E))
    torch.testing.assert_close(y, naive_moe(experts, x, index, None, keep))


def test_expert_forward_matches_naive_and_top1_at_weight_one():
    experts = make_experts("gelu")
    x = torch.randn(5, C, dtype=torch.float64)  # M x C
    for e in range(E):
        expected = torch.stack([naive_expert(experts, e, row) for row in x])
        torch.testing.assert_close(experts.expert_forward(e, x), expected)
        index = torch.full((5, 1), e)
        ones = torch.ones(5, 1, dtype=torch.float64)
        y = experts(x, DispatchPlan.from_routing(index, None, E), ones)
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("how", ["zero_tokens", "all_dropped"])
def test_no_assignment(how):
    experts = make_experts()
    num_tokens = 0 if how == "zero_tokens" else 4
    index = torch.zeros(num_tokens, 2, dtype=torch.long)
    keep = torch.zeros(num_tokens, 2, dtype=torch.bool)
    x = torch.randn(num_tokens, C, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(num_tokens, 2, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(num_tokens, C, dtype=torch.float64)
    y = experts(x, DispatchPlan.from_routing(index, keep, E), weight)
    assert y.shape == (num_tokens, C)
    y_ref = frozen_ffn(experts, x)  # no kept choice: the plain frozen FFN, not zero
    torch.testing.assert_close(y, y_ref)
    (y * probe).sum().backward()
    for name in LORA:  # zero gradients, not None
        grad = getattr(experts, name).grad
        assert grad is not None and not grad.any(), name
    assert weight.grad is None or not weight.grad.any()  # no delta: no router gradient
    grad_x, x.grad = x.grad, None
    (y_ref * probe).sum().backward()
    if num_tokens:
        torch.testing.assert_close(grad_x, x.grad)  # through the frozen FFN


# --------------------------------------------------------------------------------------------
# the frozen base
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("kind", ["top1", "top2", "dense"])
def test_fresh_experts_are_the_frozen_ffn(kind, drop):
    """B = 0: the frozen FFN for any combine weights, e.g. unnormalised top-1 probabilities
    (``routing`` draws top-1/top-2 weights in [0, 1), not summing to 1)."""
    experts = make_experts(random_b=False)
    assert not experts.lora_b1.any() and not experts.lora_b2.any()
    assert experts.lora_a1.abs().sum() > 0 and experts.lora_a2.abs().sum() > 0
    index, weight, keep = routing(kind, 8, drop=drop)
    x = torch.randn(8, C, dtype=torch.float64)
    y = experts(x, DispatchPlan.from_routing(index, keep, E), weight)
    torch.testing.assert_close(y, frozen_ffn(experts, x))
    y = experts(x, DispatchPlan.from_routing(index, keep, E), weight * 7.0)
    torch.testing.assert_close(y, frozen_ffn(experts, x))


def test_base_is_frozen_and_lora_trains():
    experts = make_experts("gelu", random_b=False)  # gelu: no dead unit hides a gradient
    for p in (*experts.fc1.parameters(), *experts.fc2.parameters()):
        assert not p.requires_grad
    assert all(getattr(experts, n).requires_grad for n in LORA)
    index, weight, _ = routing("top2", 6, drop=False)
    weight.requires_grad_(True)
    x = torch.randn(6, C, dtype=torch.float64)
    plan = DispatchPlan.from_routing(index, None, E)
    experts(x, plan, weight).pow(2).sum().backward()
    assert all(p.grad is None for p in (*experts.fc1.parameters(), *experts.fc2.parameters()))
    # B = 0: A gets no gradient yet, B does (LoRA's start), and the router none (no delta).
    assert not experts.lora_a1.grad.any() and not experts.lora_a2.grad.any()
    assert experts.lora_b1.grad.abs().sum() > 0 and experts.lora_b2.grad.abs().sum() > 0
    assert not weight.grad.any()
    weight.grad = None
    with torch.no_grad():  # once B != 0 the router gets its gradient through the deltas
        experts.lora_b1.normal_()
    experts(x, plan, weight).pow(2).sum().backward()
    assert weight.grad.abs().min() > 0


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("kind", ["top1", "top2", "dense"])
def test_frozen_ffn_once_per_token(kind, drop):
    """The matmul FLOPs are exactly 4 N C F + 4 M r (C + F): fc1 and fc2 on the N tokens plus
    the rank-r deltas (A then B, at fc1 and at fc2) on the M kept assignments; the full FFN on
    M rows would be M / N times the first term."""
    experts = make_experts()
    num_tokens = 7
    index, weight, keep = routing(kind, num_tokens, drop=drop)
    x = torch.randn(num_tokens, C, dtype=torch.float64, requires_grad=True)
    plan = DispatchPlan.from_routing(index, keep, E)
    rows = index.numel() if keep is None else int(keep.sum())  # M
    assert plan.num_rows == rows
    with FlopCounterMode(display=False) as counter:
        experts(x, plan, weight)
    expected = 4 * num_tokens * C * FF + 4 * rows * R * (C + FF)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("kind, drop", [("dense", False), ("top2", True)])
def test_fc1_and_fc2_see_each_token_once(monkeypatch, kind, drop):
    experts = make_experts()
    seen = []
    linear = F.linear

    def counting_linear(inp, weight, bias=None):
        if weight is experts.fc1.weight or weight is experts.fc2.weight:
            seen.append(("fc1" if weight is experts.fc1.weight else "fc2", inp.shape[0]))
        return linear(inp, weight, bias)

    monkeypatch.setattr(F, "linear", counting_linear)
    index, weight, keep = routing(kind, 5, drop=drop)
    x = torch.randn(5, C, dtype=torch.float64)
    experts(x, DispatchPlan.from_routing(index, keep, E), weight)
    assert seen == [("fc1", 5), ("fc2", 5)]  # N rows each, not one per assignment


def test_lora_dropout_touches_only_the_deltas():
    """Dropout is on the LoRA input: with B = 0 the training output is the frozen FFN."""
    experts = make_experts(random_b=False, lora_dropout=0.5).train()
    index, weight, _ = routing("dense", 6, drop=False)
    x = torch.randn(6, C, dtype=torch.float64)
    plan = DispatchPlan.from_routing(index, None, E)
    torch.testing.assert_close(experts(x, plan, weight), frozen_ffn(experts, x))
    experts = make_experts(lora_dropout=0.5)
    y_eval = experts.eval()(x, plan, weight)
    torch.testing.assert_close(y_eval, naive_moe(experts, x, index, weight, None))
    assert not torch.allclose(experts.train()(x, plan, weight), y_eval)
    # The fc2 delta's input is the activation after activation dropout, per token.
    experts = make_experts(activation_dropout=0.5).train()
    torch.manual_seed(3)
    y = experts(x, plan, weight)
    torch.manual_seed(3)
    h = experts.fc1(x)  # N x F; lora_dropout = 0 draws no mask
    s = experts.scaling
    for e in range(E):
        delta = x @ experts.lora_a1[e].t() @ experts.lora_b1[e].t()
        h = h + s * weight[:, e : e + 1] * delta
    a = F.dropout(experts.activation_fn(h), p=0.5, training=True)
    expected = experts.fc2(a)
    for e in range(E):
        delta = a @ experts.lora_a2[e].t() @ experts.lora_b2[e].t()
        expected = expected + s * weight[:, e : e + 1] * delta
    torch.testing.assert_close(y, expected)


def test_autocast_casts_once_and_matches():
    experts = LoRAExperts(E, C, FF, rank=R)
    with torch.no_grad():
        experts.lora_b1.normal_()
        experts.lora_b2.normal_()
    index, weight, _ = routing("top2", 6, drop=False)
    weight = weight.float()
    x = torch.randn(6, C)
    plan = DispatchPlan.from_routing(index, None, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, plan, weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), experts(x, plan, weight), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------
# inside MoELayer, with padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, factor, routing_mode", [(1, 0.0, "topk"), (2, 0.5, "topk"), (1, 0.0, "dense")]
)
def test_moe_layer_with_padding_matches_naive(k, factor, routing_mode):
    torch.manual_seed(0)
    gate = TopKGate(C, E, k=k, capacity_factor=factor, routing=routing_mode)
    layer = MoELayer(gate, LoRAExperts(E, C, FF, rank=R, alpha=5.0), name="enc").double()
    with torch.no_grad():
        layer.experts.lora_b1.normal_()
        layer.experts.lora_b2.normal_()
    lengths = [5, 2, 4]
    mask = torch.arange(5)[:, None] >= torch.tensor(lengths)[None, :]  # T x B, True at padding
    x = torch.randn(5, 3, C, dtype=torch.float64)
    x = torch.where(mask[..., None], torch.full_like(x, float("nan")), x).requires_grad_(True)
    trained = [layer.gate.wg.weight, *(getattr(layer.experts, n) for n in LORA)]

    y, record = layer(x, padding_mask=mask)  # T x B x C
    y.pow(2).sum().backward()
    got = grads([x, *trained])
    x_real = x.detach()[~mask].clone().requires_grad_(True)  # N x C
    gate_out = layer.gate(x_real)
    keep = gate_out.keep
    y_ref = naive_moe(layer.experts, x_real, gate_out.expert_index, gate_out.expert_weight, keep)
    y_ref.pow(2).sum().backward()
    expected = grads([x_real, *trained])

    assert torch.equal(y[mask], torch.zeros(int(mask.sum()), C, dtype=y.dtype))
    torch.testing.assert_close(y[~mask], y_ref)
    assert not got[0][mask].any()
    torch.testing.assert_close(got[0][~mask], expected[0])
    for name, g, g_ref in zip(["wg", *LORA], got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, n=name: f"{n}: {m}")
    if factor > 0:
        assert not keep.all()  # capacity drops assignments
    if routing_mode == "dense":
        assert record.dense and gate_out.expert_index.shape[1] == E


@pytest.mark.parametrize("k, normalize", [(1, False), (1, True), (2, False)])
def test_moe_layer_with_zero_b_is_the_frozen_ffn(k, normalize):
    """An upcycled layer (B = 0) computes the frozen FFN at every real token, also with top-1
    unnormalised (combine weight = the router probability) and capacity drops; padding stays 0."""
    torch.manual_seed(0)
    gate = TopKGate(C, E, k=k, normalize_top_k=normalize, capacity_factor=0.5)
    layer = MoELayer(gate, LoRAExperts(E, C, FF, rank=R, alpha=5.0), name="enc").double()
    mask = torch.arange(5)[:, None] >= torch.tensor([5, 2, 4])[None, :]  # T x B
    x = torch.randn(5, 3, C, dtype=torch.float64)
    y, _ = layer(x, padding_mask=mask)
    x_real = x[~mask]
    gate_out = layer.gate(x_real)
    assert not gate_out.keep.all()  # some tokens lose choices, some all of them
    if not normalize:
        assert gate_out.expert_weight[gate_out.keep].max() < 1
    torch.testing.assert_close(y[~mask], frozen_ffn(layer.experts, x_real))
    assert not y[mask].any()


def test_state_dict_layout():
    experts = LoRAExperts(E, C, FF, rank=R)
    shapes = {k: tuple(v.shape) for k, v in experts.state_dict().items()}
    assert shapes == {
        "fc1.weight": (FF, C),
        "fc1.bias": (FF,),
        "fc2.weight": (C, FF),
        "fc2.bias": (C,),
        "lora_a1": (E, R, C),
        "lora_b1": (E, FF, R),
        "lora_a2": (E, R, FF),
        "lora_b2": (E, C, R),
    }
    assert experts.num_local_experts == E and experts.first_expert == 0
    assert experts.expert_parallel is None and list(experts.local_expert_ids) == list(range(E))
    assert experts.scaling == 16.0 / R


def test_a_init_is_peft_kaiming_uniform():
    experts = LoRAExperts(E, 64, 256, rank=16)
    for a, fan_in in ((experts.lora_a1, 64), (experts.lora_a2, 256)):
        bound = 1.0 / fan_in**0.5  # kaiming_uniform_(a=sqrt(5))
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert not torch.equal(a[0], a[1])  # each expert its own draw


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, r"LoRA rank \(--moe-lora-rank\) must be an integer >= 1, got 0"),
        ({"rank": 2.5}, r"--moe-lora-rank\) must be an integer >= 1, got 2.5"),
        ({"alpha": 0.0}, r"LoRA alpha \(--moe-lora-alpha\) must be > 0, got 0.0"),
        ({"alpha": -1.0}, r"--moe-lora-alpha\) must be > 0, got -1.0"),
        ({"lora_dropout": 1.0}, r"LoRA dropout \(--moe-lora-dropout\) must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"--moe-lora-dropout\) must be in \[0, 1\), got -0.1"),
        ({"activation_fn": "swish"}, r"unknown activation 'swish'"),
        ({"num_experts": 0}, r"--moe-expert-count\) must be >= 1"),
    ],
)
def test_bad_options(kwargs, message):
    args = {"num_experts": E, "d_model": C, "d_ff": FF, **kwargs}
    with pytest.raises(ValueError, match=message):
        LoRAExperts(**args)


def test_plan_and_weight_mismatch():
    experts = make_experts()
    index, weight, _ = routing("top2", 5, drop=False)
    plan = DispatchPlan.from_routing(index, None, E)
    with pytest.raises(ValueError, match="cover the 4 tokens of x"):
        experts(torch.randn(4, C, dtype=torch.float64), plan, weight[:4])
    with pytest.raises(ValueError, match=r"combine weights must have shape \(5, 2\)"):
        experts(torch.randn(5, C, dtype=torch.float64), plan, weight[:, :1])
