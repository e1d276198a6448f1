"""The router options of issue 14 on hand-computed cases: the MSE balance loss, the temperature,
dense routing, the router bias, the usage EMA (and that the criterion, not the forward, updates
it: a recomputed forward must not count a batch twice)."""

import math

import pytest
import torch
from moe_factories import make_gate

from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.moe_layer import MoELayer
from fairseq_moe_plugin.modules.routing.losses import mse_balance_loss


def test_mse_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    # mean probs (0.4, 0.3, 0.15, 0.15); minus 1/4: (0.15, 0.05, -0.1, -0.1)
    expected = (0.15**2 + 0.05**2 + 0.1**2 + 0.1**2) / 4
    assert mse_balance_loss(probs).item() == pytest.approx(expected)
    assert mse_balance_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0)
    assert mse_balance_loss(torch.zeros(0, 4)).item() == 0.0
    # = CV^2 / E^2 of the importance (Shazeer et al. 2017, eq. 6)
    importance = probs.sum(0)
    cv2 = importance.var(unbiased=False) / importance.mean() ** 2
    assert mse_balance_loss(probs).item() == pytest.approx(cv2.item() / 16)


def _gate(**kw):
    gate = make_gate(2, 3, seed=None, **kw)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    return gate


def test_temperature_divides_the_logits_before_the_softmax():
    x = torch.tensor([[2.0, 1.0]])
    out = _gate(temperature=2.0, k=1)(x)
    torch.testing.assert_close(out.logits, torch.tensor([[1.0, 0.5, 0.0]]))
    z = math.exp(1.0) + math.exp(0.5) + 1.0
    torch.testing.assert_close(
        out.probs, torch.tensor([[math.exp(1.0) / z, math.exp(0.5) / z, 1 / z]])
    )
    assert out.z_loss.item() == pytest.approx(math.log(z) ** 2)


def test_mse_is_the_record_balance_loss_when_asked():
    x = torch.randn(5, 2)
    out = _gate(balance_loss="mse", k=2)(x)
    assert out.balance_loss.item() == pytest.approx(mse_balance_loss(out.probs).item())


def test_dense_routing_weights_every_expert_by_its_probability():
    gate = _gate(routing="dense", k=1, capacity_factor=0.1)  # capacity does not apply
    x = torch.randn(4, 2)
    out = gate(x)
    assert out.dense and out.all_kept and out.keep.all()
    assert out.expert_index.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(out.expert_weight, out.probs)
    # Through a layer: sum_e p_e * expert_e(x), per token.
    experts = StackedExperts(3, 2, 4)
    layer = MoELayer(gate, experts)
    y, record = layer(x)
    expected = sum(out.probs[:, e : e + 1] * experts.expert_forward(e, x) for e in range(3))
    torch.testing.assert_close(y, expected)
    assert record.dense and record.k == 3
    torch.testing.assert_close(record.expert_load, out.probs.sum(0))  # probability mass


def test_router_bias_is_added_to_the_logits():
    gate = _gate(router_bias=True, k=1)
    assert not gate.wg.bias.any()  # starts at zero: routing as without it
    with torch.no_grad():
        gate.wg.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    out = gate(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(out.logits, torch.tensor([[1.0, 1.0, 5.0]]))
    assert out.expert_index.tolist() == [[2]]


def test_usage_ema_hand_computed_and_saved():
    gate = _gate(usage_ema=0.5)
    torch.testing.assert_close(gate.usage_ema, torch.full((3,), 1 / 3))
    gate.update_usage_ema(torch.tensor([2.0, 0.0, 2.0]))
    torch.testing.assert_close(gate.usage_ema, torch.tensor([1 / 6 + 0.25, 1 / 6, 1 / 6 + 0.25]))
    gate.update_usage_ema(torch.zeros(3))  # no tokens: unchanged
    assert gate.usage_ema[1].item() == pytest.approx(1 / 6)
    fresh = _gate(usage_ema=0.5)
    fresh.load_state_dict(gate.state_dict())
    torch.testing.assert_close(fresh.usage_ema, gate.usage_ema)
    with pytest.raises(ValueError, match="usage_ema > 0"):
        _gate().update_usage_ema(torch.ones(3))


def test_the_forward_never_updates_the_ema():
    """A forward run twice (as activation checkpointing's recompute does) leaves the EMA as it
    was: only the criterion folds a batch in, once."""
    from fairseq_moe_plugin.criterions.moe_criterion import update_usage_emas

    layer = MoELayer(_gate(usage_ema=0.9, k=1), StackedExperts(3, 2, 4), name="encoder.layers.0")
    x = torch.randn(6, 2)
    before = layer.gate.usage_ema.clone()
    layer(x)
    _, record = layer(x)
    torch.testing.assert_close(layer.gate.usage_ema, before)
    emas = update_usage_emas(layer, [record])
    share = record.expert_counts_routed.float() / 6
    torch.testing.assert_close(emas["encoder.layers.0"], 0.9 * before + 0.1 * share)


def test_plan_from_dense_routing_covers_every_pair():
    index = torch.arange(3).expand(4, -1)
    plan = DispatchPlan.from_routing(index, None, 3)
    assert plan.counts.tolist() == [4, 4, 4] and plan.num_rows == 12
