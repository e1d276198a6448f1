"""Gate-level behaviour of the routing methods of ``modules/routing_methods.py``: expert choice,
aux-loss-free bias balancing and the random capacity priority (no fairseq model needed, except
the distributed test)."""

import math

import pytest
import torch
from distributed_helpers import run_in_processes
from moe_factories import make_gate

from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.gate import TopKGate, check_method_options
from fairseq_moe_plugin.modules.moe_layer import MoELayer
from fairseq_moe_plugin.modules.routing.balancing import bias_balancing_step
from fairseq_moe_plugin.modules.routing.capacity import random_keep_mask
from fairseq_moe_plugin.modules.routing.expert_choice import (
    expert_choice_capacity,
    expert_choice_keep,
)

D, E = 16, 4


# --- expert choice -------------------------------------------------------------------------


def test_expert_choice_hand_case():
    probs = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.6, 0.3, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25] * 4]
    )
    keep = expert_choice_keep(probs, capacity=2)
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool
    )  # expert 0 takes tokens 0, 1; expert 1 tokens 1, 3; expert 2 tokens 2, 3; expert 3 2, 3
    assert torch.equal(keep, expected)
    assert expert_choice_capacity(4, 4, 2.0) == 2
    assert expert_choice_capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert expert_choice_capacity(3, 4, 8.0) == 3  # at most N


@pytest.mark.parametrize("num_tokens, factor", [(37, 2.0), (10, 1.0), (5, 0.5), (3, 8.0)])
def test_each_expert_takes_exactly_c_tokens(num_tokens, factor):
    gate = make_gate(D, E, routing="expert_choice", expert_capacity_factor=factor)
    out = gate(torch.randn(num_tokens, D))
    c = min(num_tokens, math.ceil(factor * num_tokens / E))
    assert out.capacity == c
    assert out.keep.sum(dim=0).tolist() == [c] * E
    assert out.expert_choice and out.expert_index.shape == (num_tokens, E)
    # weights: the token's probability where the expert took it, 0 elsewhere
    assert torch.equal(out.expert_weight, out.probs * out.keep)
    # each expert took its C most probable tokens
    for e in range(E):
        taken = out.probs[out.keep[:, e], e]
        left = out.probs[~out.keep[:, e], e]
        if len(left):
            assert taken.min() >= left.max()


def test_expert_choice_layer_unchosen_tokens_get_zero_and_stats():
    torch.manual_seed(1)
    gate = TopKGate(D, E, routing="expert_choice", expert_capacity_factor=1.0)
    experts = StackedExperts(E, D, 32)
    layer = MoELayer(gate, experts).eval()
    x = torch.randn(4, 5, D)  # T x B x C
    y, record = layer(x)
    flat_y = y.reshape(-1, D)
    keep = record.keep
    unchosen = ~keep.any(dim=-1)
    assert torch.all(flat_y[unchosen] == 0)  # the residual alone carries them
    assert record.unchosen_tokens == unchosen.sum()
    assert record.dropped == 0  # experts choose: nothing is dropped
    assert record.computed_assignments == E * math.ceil(20 / E)
    assert record.expert_counts_routed.tolist() == [5] * E  # balanced by construction
    # a taken token's output is the weighted sum of its experts, by hand
    tokens = x.reshape(-1, D)
    n = int(keep.any(dim=-1).nonzero()[0])
    expected = sum(
        record.expert_weight[n, e] * experts.expert_forward(e, tokens[n : n + 1])[0]
        for e in range(E)
        if keep[n, e]
    )
    torch.testing.assert_close(flat_y[n], expected, rtol=1e-5, atol=1e-6)


def test_expert_choice_is_batch_dependent_by_design():
    """The documented price of expert choice: a token's routing depends on its batch mates."""
    gate = make_gate(D, E, routing="expert_choice", expert_capacity_factor=1.0).eval()
    x = torch.randn(16, D)
    alone = gate(x[:4]).keep
    together = gate(x).keep[:4]
    assert not torch.equal(alone, together)


# --- bias balancing ------------------------------------------------------------------------


def test_bias_step_hand_case():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 0.0, 5.0, 5.0])  # mean 5
    assert bias_balancing_step(bias, load, 0.1).tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    # an update without tokens changes nothing
    assert torch.equal(bias_balancing_step(bias + 1, torch.zeros(4), 0.1), bias + 1)


def test_rate_zero_is_todays_routing():
    x = torch.randn(50, D)
    plain = make_gate(D, E, k=2, capacity_factor=1.0)
    zero = make_gate(D, E, k=2, capacity_factor=1.0, bias_balancing_rate=0.0)
    assert "balance_bias" not in zero.state_dict()
    a, b = plain(x), zero(x)
    assert torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.expert_weight, b.expert_weight)
    # a fresh (zero) bias selects what plain top-k selects, in the same order
    fresh = make_gate(D, E, k=2, capacity_factor=1.0, bias_balancing_rate=0.01)
    c = fresh(x)
    assert torch.equal(a.expert_index, c.expert_index)
    assert torch.equal(a.expert_weight, c.expert_weight)


def test_combine_weights_ignore_the_bias():
    gate = make_gate(D, E, k=2, capacity_factor=0.0, bias_balancing_rate=0.01)
    x = torch.randn(30, D)
    gate.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # expert 3 always selected
    out = gate(x)
    assert torch.all(out.expert_index[:, 0] == 3)
    # weights are the unbiased softmax probabilities of the selected experts
    probs = torch.softmax(gate.wg(x), dim=-1)
    torch.testing.assert_close(out.expert_weight, probs.gather(1, out.expert_index))
    torch.testing.assert_close(out.probs, probs)


def _skewed_gate(rate: float) -> TopKGate:
    gate = make_gate(D, E, k=1, capacity_factor=0.0, bias_balancing_rate=rate)
    with torch.no_grad():
        gate.wg.weight.normal_(0, 0.1)
        gate.wg.weight[0] += 0.1  # expert 0 wins most tokens
    return gate.train()


def _loads(gate: TopKGate, x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(gate(x).expert_index[:, 0], minlength=E).float()


def test_bias_moves_toward_balance_on_a_skewed_router():
    torch.manual_seed(0)
    x = torch.randn(400, D) + 1.0
    gate = _skewed_gate(0.05)
    before = _loads(gate, x)
    assert before.max() / before.sum() > 0.6
    for update in range(60):  # the criterion's calls, without the criterion
        gate.set_num_updates(update)
        for half in x.chunk(2):  # two batches per update: loads are summed over the update
            gate.accumulate_balance_load(_loads(gate, half))
    gate.set_num_updates(60)
    after = _loads(gate, x)
    assert after.max() / after.sum() < 0.4
    assert after.min() > 0
    assert int(gate.balance_bias.argmin()) == 0  # the overloaded expert went down


def test_bias_step_waits_for_the_update_and_survives_a_checkpoint():
    gate = _skewed_gate(0.1)
    gate.set_num_updates(5)
    gate.accumulate_balance_load(torch.tensor([6.0, 2.0, 2.0, 2.0]))
    gate.set_num_updates(5)  # a second batch of the same update: no step yet
    assert torch.all(gate.balance_bias == 0)
    state = {k: v.clone() for k, v in gate.state_dict().items()}  # saved after update 5
    gate.set_num_updates(6)
    expected = torch.tensor([-0.1, 0.1, 0.1, 0.1])
    torch.testing.assert_close(gate.balance_bias, expected)
    assert torch.all(gate.balance_load == 0)
    # resuming from the checkpoint applies the pending step once, when training resumes
    resumed = _skewed_gate(0.1)
    resumed.set_num_updates(6)  # fairseq's load_checkpoint calls it before loading the weights
    resumed.load_state_dict(state)
    resumed.set_num_updates(6)  # train_step of the first resumed batch
    torch.testing.assert_close(resumed.balance_bias, expected)
    resumed.set_num_updates(6)
    torch.testing.assert_close(resumed.balance_bias, expected)


def _distributed_bias(rank, world_size):
    gate = _skewed_gate(0.1)
    gate.set_num_updates(0)
    local = [torch.tensor([4.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])][rank]
    gate.accumulate_balance_load(local)
    gate.set_num_updates(1)
    return gate.balance_bias.clone()


@pytest.mark.distributed
def test_bias_uses_the_loads_of_all_workers():
    """Summed loads [4, 0, 1, 1] (mean 1.5): only expert 0 is above the mean. Worker 1 alone
    would have moved expert 2 and 3 down, worker 0 alone experts 1-3 up."""
    biases = run_in_processes(_distributed_bias, 2)
    expected = torch.tensor([-0.1, 0.1, 0.1, 0.1])
    for bias in biases:
        torch.testing.assert_close(bias, expected)


# --- capacity priority ---------------------------------------------------------------------


def test_random_priority_keeps_capacity_and_differs_from_rank_prob():
    torch.manual_seed(0)
    index = torch.randint(0, E, (40, 2))
    keep = random_keep_mask(index, E, capacity=6)
    for e in range(E):
        routed = int((index == e).sum())
        assert int(keep[index == e].sum()) == min(routed, 6)
    other = random_keep_mask(index, E, capacity=6)
    assert not torch.equal(keep, other)  # a random draw each time
    assert random_keep_mask(index, E, capacity=40).all()


def test_random_priority_only_in_training():
    x = torch.randn(64, D)
    gate = make_gate(
        D, E, k=2, capacity_factor=0.5, eval_capacity_factor=0.5, capacity_priority="random"
    )
    ref = make_gate(D, E, k=2, capacity_factor=0.5, eval_capacity_factor=0.5)
    gate.eval(), ref.eval()
    assert torch.equal(gate(x).keep, ref(x).keep)  # eval: rank_prob, reproducible
    gate.train(), ref.train()
    a, b = gate(x), ref(x)
    assert torch.equal(a.expert_index, b.expert_index)
    assert not torch.equal(a.keep, b.keep)
    assert torch.equal(a.keep.sum(), b.keep.sum())  # the same number kept, other ones


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"capacity_priority": "first"}, "--moe-capacity-priority"),
        ({"expert_capacity_factor": 0.0}, "--moe-expert-capacity-factor"),
        ({"bias_balancing_rate": -1.0}, "--moe-bias-balancing-rate"),
        ({"routing": "expert_choice", "bias_balancing_rate": 0.1}, "does not apply"),
        ({"routing": "dense", "bias_balancing_rate": 0.1}, "does not apply"),
    ],
)
def test_bad_method_options_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_method_options(**kwargs)
    with pytest.raises(ValueError, match=message):
        TopKGate(D, E, **kwargs)
