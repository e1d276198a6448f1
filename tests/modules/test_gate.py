"""Tests for fairseq_moe_plugin/modules/gate.py: the top-k router, its capacity policy and losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from naive_moe import naive_combine_weights, naive_keep_mask

from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.routing.capacity import capacity_keep_mask, expert_capacity
from fairseq_moe_plugin.modules.routing.losses import (
    load_balance_loss,
    router_z_loss,
    routing_entropy,
)

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# A hand-built routing problem where capacity binds.
#
# 5 tokens, E = 3, k = 2. Token 2 has exactly the same input as token 0, hence the same
# (bitwise) probabilities. Router probabilities (rows sum to 1):
#   t0: [0.40, 0.35, 0.25] -> choices (e0 0.40, e1 0.35)
#   t1: [0.45, 0.50, 0.05] -> choices (e1 0.50, e0 0.45)
#   t2: same as t0          -> choices (e0 0.40, e1 0.35)
#   t3: [0.90, 0.06, 0.04] -> choices (e0 0.90, e1 0.06)
#   t4: [0.10, 0.20, 0.70] -> choices (e2 0.70, e1 0.20)
# Priority within each expert: (choice rank, -prob, token).
#   e0: 1st choices t3 .90, t0 .40, t2 .40 (tie -> t0 first); 2nd choices t1 .45
#   e1: 1st choices t1 .50; 2nd choices t0 .35, t2 .35 (tie -> t0 first), t4 .20, t3 .06
#   e2: 1st choices t4 .70
# capacity 2: e0 keeps t3, t0 (drops t2, and t1's 2nd choice even though .45 > .40);
#             e1 keeps t1, t0 (drops t2, t4, t3); e2 keeps t4.
# capacity 1: e0 keeps t3; e1 keeps t1; e2 keeps t4.
# --------------------------------------------------------------------------------------------
_DISTINCT_PROBS = [
    [0.40, 0.35, 0.25],
    [0.45, 0.50, 0.05],
    [0.90, 0.06, 0.04],
    [0.10, 0.20, 0.70],
]
_TOKEN_PATTERN = [0, 1, 0, 2, 3]  # which row of _DISTINCT_PROBS each token uses
HAND_INDEX = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1], [2, 1]])  # 5 x 2
HAND_PROB = torch.tensor(
    [[0.40, 0.35], [0.50, 0.45], [0.40, 0.35], [0.90, 0.06], [0.70, 0.20]]
)  # 5 x 2
HAND_KEEP_CAP2 = torch.tensor(
    [[True, True], [True, False], [False, False], [True, False], [True, False]]
)  # 5 x 2
HAND_KEEP_CAP1 = torch.tensor(
    [[False, False], [True, False], [False, False], [True, False], [True, False]]
)  # 5 x 2


def _hand_gate(**kwargs) -> tuple[TopKGate, torch.Tensor]:
    """A gate whose softmax on the returned 5 x 4 one-hot inputs is exactly the table above."""
    probs = torch.tensor(_DISTINCT_PROBS)  # 4 x 3
    gate = TopKGate(d_model=4, num_experts=3, k=2, **kwargs)
    with torch.no_grad():
        gate.wg.weight.copy_(probs.log().t())  # E x d_model: logit(t, e) = log p(t, e)
    x = F.one_hot(torch.tensor(_TOKEN_PATTERN), 4).float()  # 5 x 4
    return gate, x


# --------------------------------------------------------------------------------------------
# expert_capacity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, k, factor, expected",
    [
        (10, 4, 1, 1.0, 3),  # ceil(2.5)
        (8, 4, 2, 1.0, 4),  # exact: 4
        (10, 4, 2, 1.25, 7),  # ceil(6.25)
        (3, 8, 1, 1.0, 1),  # ceil(0.375)
        (5, 3, 2, 0.5, 2),  # ceil(1.667)
        (5, 3, 2, 0.25, 1),  # ceil(0.833)
        (100, 8, 2, 2.0, 50),  # exact: 50
        (0, 4, 2, 1.0, 0),  # no tokens
    ],
)
def test_expert_capacity_is_ceil(num_tokens, num_experts, k, factor, expected):
    assert expert_capacity(num_tokens, num_experts, k, factor) == expected


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_expert_capacity_dropless_for_nonpositive_factor(factor):
    assert expert_capacity(37, 4, 2, factor) == 37
    assert expert_capacity(0, 4, 2, factor) == 0


# --------------------------------------------------------------------------------------------
# capacity_keep_mask
# --------------------------------------------------------------------------------------------


def test_capacity_keep_mask_hand_case_capacity_2():
    keep = capacity_keep_mask(HAND_INDEX, HAND_PROB, num_experts=3, capacity=2)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, HAND_KEEP_CAP2)


def test_capacity_keep_mask_hand_case_capacity_1():
    keep = capacity_keep_mask(HAND_INDEX, HAND_PROB, num_experts=3, capacity=1)
    assert torch.equal(keep, HAND_KEEP_CAP1)


def test_capacity_keep_mask_first_choice_beats_higher_probability_second_choice():
    # One expert, capacity 1: token 0's 1st choice (p .30) against token 1's 2nd choice (p .45).
    index = torch.tensor([[0, 1], [1, 0]])  # 2 x 2
    prob = torch.tensor([[0.30, 0.29], [0.50, 0.45]])  # 2 x 2
    keep = capacity_keep_mask(index, prob, num_experts=2, capacity=1)
    # e0: t0 (1st, .30) beats t1 (2nd, .45); e1: t1 (1st, .50) beats t0 (2nd, .29).
    assert torch.equal(keep, torch.tensor([[True, False], [True, False]]))


def test_capacity_keep_mask_probability_then_token_order():
    # All first choices to expert 0 (k = 1).
    index = torch.zeros(5, 1, dtype=torch.long)  # 5 x 1
    prob = torch.tensor([[0.5], [0.7], [0.5], [0.9], [0.5]])  # 5 x 1
    keep = capacity_keep_mask(index, prob, num_experts=2, capacity=3)
    # highest probabilities t3 .9, t1 .7; then the .5 tie goes to the earliest token, t0.
    assert keep[:, 0].tolist() == [True, True, False, True, False]
    keep = capacity_keep_mask(index, prob, num_experts=2, capacity=2)
    assert keep[:, 0].tolist() == [False, True, False, True, False]
    keep = capacity_keep_mask(index, prob, num_experts=2, capacity=4)
    assert keep[:, 0].tolist() == [True, True, True, True, False]


def test_capacity_keep_mask_all_ties_keep_first_tokens():
    index = torch.tensor([[1], [1], [1], [1]])  # 4 x 1
    prob = torch.full((4, 1), 0.25)  # 4 x 1
    keep = capacity_keep_mask(index, prob, num_experts=3, capacity=2)
    assert keep[:, 0].tolist() == [True, True, False, False]


def test_capacity_keep_mask_capacity_zero_drops_everything():
    keep = capacity_keep_mask(HAND_INDEX, HAND_PROB, num_experts=3, capacity=0)
    assert keep.shape == (5, 2)
    assert not keep.any()


def test_capacity_keep_mask_large_capacity_keeps_everything():
    for capacity in (5, 6, 100):
        assert capacity_keep_mask(HAND_INDEX, HAND_PROB, 3, capacity).all()


def test_capacity_keep_mask_empty():
    keep = capacity_keep_mask(
        torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), num_experts=3, capacity=0
    )
    assert keep.shape == (0, 2) and keep.dtype == torch.bool


@pytest.mark.parametrize("seed", range(6))
def test_capacity_keep_mask_matches_naive_policy_on_random_routing(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_experts, k = 40, 5, 3
    logits = torch.randn(num_tokens, num_experts, generator=gen)  # N x E
    probs = torch.softmax(logits, dim=-1)
    probs = (probs * 8).round() / 8  # coarse values, so that many ties occur
    top_prob, top_index = torch.topk(probs, k, dim=-1)  # N x k
    for capacity in (0, 1, 3, 7, 12, 39, 40):
        keep = capacity_keep_mask(top_index, top_prob, num_experts, capacity)
        expected = naive_keep_mask(top_index, top_prob, num_experts, capacity)
        assert torch.equal(keep, expected), capacity
        # every expert keeps exactly min(routed, capacity) assignments
        routed = torch.bincount(top_index.reshape(-1), minlength=num_experts)
        kept = torch.bincount(top_index[keep], minlength=num_experts)
        assert torch.equal(kept, routed.clamp(max=capacity))


# --------------------------------------------------------------------------------------------
# load_balance_loss
# --------------------------------------------------------------------------------------------


def test_balance_loss_uniform_routing_is_one():
    probs = torch.full((4, 2), 0.5)  # 4 x 2
    index = torch.tensor([[0], [1], [0], [1]])  # 4 x 1
    assert load_balance_loss(probs, index).item() == pytest.approx(1.0, abs=1e-7)
    # k = 2 over E = 4, every expert chosen twice out of 8 choices.
    probs = torch.full((4, 4), 0.25)  # 4 x 4
    index = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])  # 4 x 2
    assert load_balance_loss(probs, index).item() == pytest.approx(1.0, abs=1e-7)


def test_balance_loss_hand_computed_k1():
    # N = 4, E = 2, k = 1; choices = argmax = [0, 0, 0, 1].
    # f = [3/4, 1/4]; P = [(.9+.8+.6+.3)/4, (.1+.2+.4+.7)/4] = [.65, .35]
    # loss = E * sum f*P = 2 * (.75*.65 + .25*.35) = 2 * (.4875 + .0875) = 1.15
    probs = torch.tensor(
        [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64, requires_grad=True
    )  # 4 x 2
    index = torch.tensor([[0], [0], [0], [1]])  # 4 x 1
    loss = load_balance_loss(probs, index)
    assert loss.item() == pytest.approx(1.15, abs=1e-12)
    # The gradient flows through P only: d loss / d probs[t, i] = E * f_i / N = [.375, .125].
    loss.backward()
    expected = torch.tensor([[0.375, 0.125]], dtype=torch.float64).expand(4, 2)
    torch.testing.assert_close(probs.grad, expected)


def test_balance_loss_counts_all_k_choices_divided_by_k():
    # N = 2, E = 3, k = 2; choices [[0, 1], [0, 2]] -> counts [2, 1, 1] out of N*k = 4
    # f = [.5, .25, .25]; P = [(.5+.6)/2, (.3+.1)/2, (.2+.3)/2] = [.55, .2, .25]
    # loss = 3 * (.5*.55 + .25*.2 + .25*.25) = 3 * (.275 + .05 + .0625) = 1.1625
    # (dividing the counts by N only would give 2.325; counting 1st choices only, 3*.55 = 1.65)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]], dtype=torch.float64)  # 2 x 3
    index = torch.tensor([[0, 1], [0, 2]])  # 2 x 2
    assert load_balance_loss(probs, index).item() == pytest.approx(1.1625, abs=1e-12)


def test_balance_loss_no_tokens_is_zero():
    probs = torch.zeros(0, 4, requires_grad=True)  # 0 x 4
    loss = load_balance_loss(probs, torch.zeros(0, 2, dtype=torch.long))
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()  # still a graph node


# --------------------------------------------------------------------------------------------
# router_z_loss and routing_entropy
# --------------------------------------------------------------------------------------------


def test_z_loss_hand_computed():
    # logits [[0, 0], [ln 3, 0]]: logsumexp = [ln 2, ln 4 = 2 ln 2]
    # z = mean([ln2^2, 4 ln2^2]) = 2.5 ln2^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)  # 2 x 2
    logits.requires_grad_(True)
    z = router_z_loss(logits)
    assert z.item() == pytest.approx(2.5 * LN2**2, rel=1e-12)
    # d z / d logits[t] = 2 * lse_t * softmax_t / N: row 0 = ln2 * [.5, .5], row 1 = 2 ln2 [.75, .25]
    z.backward()
    expected = torch.tensor([[0.5 * LN2, 0.5 * LN2], [1.5 * LN2, 0.5 * LN2]], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_matches_formula_on_random_logits():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))  # 7 x 5
    expected = torch.logsumexp(logits, dim=-1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_z_loss_no_tokens_is_zero():
    z = router_z_loss(torch.zeros(0, 3))
    assert z.shape == () and z.item() == 0.0


def test_routing_entropy_values():
    probs = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    )  # 3 x 4
    entropy = routing_entropy(probs)
    assert entropy.shape == (3,)
    # ln 4; 0 (no NaN from 0 log 0); .5 ln2 + 2 * .25 * 2 ln2 = 1.5 ln2
    torch.testing.assert_close(entropy, torch.tensor([2 * LN2, 0.0, 1.5 * LN2]))


# --------------------------------------------------------------------------------------------
# TopKGate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gate_outputs_match_definitions(k, normalize):
    torch.manual_seed(0)
    gate = TopKGate(d_model=6, num_experts=4, k=k, normalize_top_k=normalize, capacity_factor=0)
    gate.train()
    x = torch.randn(9, 6)  # N x C
    out = gate(x)
    logits = x @ gate.wg.weight.t()  # N x E
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.probs, torch.softmax(logits, dim=-1))
    assert out.expert_index.shape == (9, k) and out.expert_weight.shape == (9, k)
    # best first, and no unchosen expert beats a chosen one
    chosen = out.probs.gather(1, out.expert_index)  # N x k
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    unchosen = out.probs.scatter(1, out.expert_index, -1.0)  # N x E
    assert torch.all(chosen.min(dim=-1).values >= unchosen.max(dim=-1).values)
    ordered = out.expert_index.sort(dim=-1).values  # N x k, distinct experts per token
    assert torch.all(ordered[:, 1:] != ordered[:, :-1])
    # dropless in training with capacity_factor 0
    assert out.capacity == 9 and out.keep.all()
    expected_w = chosen / chosen.sum(-1, keepdim=True) if normalize else chosen
    torch.testing.assert_close(out.expert_weight, expected_w)
    if normalize:
        torch.testing.assert_close(out.expert_weight.sum(-1), torch.ones(9))
    torch.testing.assert_close(out.balance_loss, load_balance_loss(out.probs, out.expert_index))
    torch.testing.assert_close(out.z_loss, router_z_loss(out.logits))


def test_gate_hand_case_keep_mask_in_training():
    gate, x = _hand_gate(capacity_factor=0.5, normalize_top_k=True)  # capacity 2
    gate.train()
    out = gate(x)
    torch.testing.assert_close(out.probs, torch.tensor(_DISTINCT_PROBS)[_TOKEN_PATTERN])
    assert torch.equal(out.expert_index, HAND_INDEX)
    assert out.capacity == 2
    assert torch.equal(out.keep, HAND_KEEP_CAP2)
    assert out.dropped_token_mask.tolist() == [False, False, True, False, False]
    # normalised over the k choices, then zeroed where dropped
    expected = HAND_PROB / HAND_PROB.sum(-1, keepdim=True) * HAND_KEEP_CAP2
    torch.testing.assert_close(out.expert_weight, expected)
    assert out.expert_weight[0].tolist() == pytest.approx([0.40 / 0.75, 0.35 / 0.75], rel=1e-5)
    assert out.expert_weight[1].tolist() == pytest.approx([0.50 / 0.95, 0.0], rel=1e-5)

    gate.capacity_factor = 0.25  # capacity ceil(.25 * 2 * 5 / 3) = 1
    out = gate(x)
    assert out.capacity == 1
    assert torch.equal(out.keep, HAND_KEEP_CAP1)
    assert out.dropped_token_mask.tolist() == [True, False, True, False, False]


def test_gate_raw_weights_without_normalisation():
    gate, x = _hand_gate(capacity_factor=0.5, normalize_top_k=False)
    gate.train()
    out = gate(x)
    torch.testing.assert_close(out.expert_weight, HAND_PROB * HAND_KEEP_CAP2)


def test_gate_eval_uses_eval_capacity_factor_default_dropless():
    gate, x = _hand_gate(capacity_factor=0.25)
    assert gate.eval_capacity_factor == 0.0
    gate.train()
    assert not gate(x).keep.all()
    gate.eval()
    out = gate(x)
    assert out.capacity == 5 and out.keep.all()
    assert not out.dropped_token_mask.any()


def test_gate_eval_capacity_factor_applies_in_eval_only():
    gate, x = _hand_gate(capacity_factor=0.0, eval_capacity_factor=0.5)
    gate.eval()
    out = gate(x)
    assert out.capacity == 2 and torch.equal(out.keep, HAND_KEEP_CAP2)
    gate.train()  # training uses capacity_factor = 0: dropless
    out = gate(x)
    assert out.capacity == 5 and out.keep.all()


def test_gate_weights_match_naive_combine_weights_under_capacity():
    torch.manual_seed(3)
    for normalize in (True, False):
        gate = TopKGate(8, 6, k=3, normalize_top_k=normalize, capacity_factor=0.5).train()
        out = gate(torch.randn(30, 8))
        assert not out.keep.all()  # capacity binds
        expected_keep = naive_keep_mask(
            out.expert_index, out.probs.gather(1, out.expert_index), 6, out.capacity
        )
        assert torch.equal(out.keep, expected_keep)
        expected = naive_combine_weights(out.probs, out.expert_index, out.keep, normalize)
        torch.testing.assert_close(out.expert_weight, expected)


def test_gate_router_gradient_flows():
    torch.manual_seed(0)
    gate = TopKGate(5, 4, k=2, capacity_factor=0).train()
    x = torch.randn(6, 5, requires_grad=True)
    out = gate(x)
    ((out.expert_weight[:, 0] ** 2).sum() + out.z_loss).backward()
    assert gate.wg.weight.grad is not None and gate.wg.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gate_single_expert():
    gate = TopKGate(3, 1, k=1, normalize_top_k=False, capacity_factor=1.0).train()
    out = gate(torch.randn(4, 3))
    assert torch.equal(out.expert_index, torch.zeros(4, 1, dtype=torch.long))
    torch.testing.assert_close(out.expert_weight, torch.ones(4, 1))
    assert out.keep.all()
    assert out.balance_loss.item() == pytest.approx(1.0)


def test_gate_no_tokens():
    gate = TopKGate(3, 4, k=2, capacity_factor=1.0).train()
    out = gate(torch.zeros(0, 3))
    assert out.expert_index.shape == (0, 2) and out.keep.shape == (0, 2)
    assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert out.dropped_token_mask.shape == (0,)


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------


def test_gate_computes_in_fp32_for_bf16_module_and_input():
    torch.manual_seed(0)
    gate = TopKGate(16, 4, k=2, capacity_factor=0).to(torch.bfloat16)
    x = torch.randn(12, 16).to(torch.bfloat16)  # N x C
    out = gate(x)
    for name in ("logits", "probs", "expert_weight", "balance_loss", "z_loss"):
        assert getattr(out, name).dtype == torch.float32, name
    # identical to an fp32 gate holding the same (bf16-representable) values: the routing was
    # computed in fp32, not in bf16 and then cast
    gate32 = TopKGate(16, 4, k=2, capacity_factor=0)
    gate32.load_state_dict({"wg.weight": gate.wg.weight.float()})
    ref = gate32(x.float())
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.expert_index, ref.expert_index)
    bf16_logits = (x @ gate.wg.weight.t()).float()
    assert not torch.equal(out.logits, bf16_logits)  # sanity: bf16 math would differ
    # gradient reaches the bf16 router weight in its own dtype
    out.z_loss.backward()
    assert gate.wg.weight.grad.dtype == torch.bfloat16


def test_gate_fp32_under_autocast():
    torch.manual_seed(0)
    gate = TopKGate(16, 4, k=2, capacity_factor=0)
    x = torch.randn(12, 16)
    ref = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(x)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, ref.logits)


# --------------------------------------------------------------------------------------------
# jitter
# --------------------------------------------------------------------------------------------


def test_jitter_perturbs_routing_input_in_training_only():
    torch.manual_seed(0)
    gate = TopKGate(8, 4, k=1, jitter_eps=0.1)
    x = torch.randn(10, 8)  # N x C
    clean = x @ gate.wg.weight.t()  # N x E
    gate.train()
    torch.manual_seed(1)
    a = gate(x).logits
    torch.manual_seed(2)
    b = gate(x).logits
    torch.manual_seed(1)
    a_again = gate(x).logits
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, clean)
    assert torch.equal(a, a_again)  # the noise comes from the global RNG
    # multiplicative noise in [1 - eps, 1 + eps] on each input feature
    bound = 0.1 * (x.abs() @ gate.wg.weight.abs().t())  # N x E
    assert torch.all((a - clean).abs() <= bound + 1e-5)
    # ... drawn per feature, not one scale per token (which would only rescale each logit row)
    ratio = a / clean  # N x E
    assert (ratio.max(dim=-1).values - ratio.min(dim=-1).values).max() > 1e-3
    x_before = x.clone()
    gate.train()(x)
    assert torch.equal(x, x_before)  # the caller's tensor is not jittered in place

    gate.eval()
    torch.manual_seed(1)
    c = gate(x).logits
    torch.manual_seed(2)
    d = gate(x).logits
    torch.testing.assert_close(c, clean)
    assert torch.equal(c, d)


def test_no_jitter_when_eps_zero_in_training():
    torch.manual_seed(0)
    gate = TopKGate(8, 4, k=1, jitter_eps=0.0).train()
    x = torch.randn(10, 8)
    torch.testing.assert_close(gate(x).logits, x @ gate.wg.weight.t())


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=4, k=5), "top-k"),
        (dict(num_experts=4, k=0), "top-k"),
        (dict(num_experts=4, k=-1), "top-k"),
        (dict(num_experts=0, k=1), "num_experts"),
        (dict(num_experts=-2, k=1), "num_experts"),
        (dict(num_experts=4, k=1, jitter_eps=-0.1), "jitter_eps"),
        (dict(num_experts=4, k=1, jitter_eps=1.0), "jitter_eps"),
    ],
)
def test_gate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKGate(d_model=8, **kwargs)
