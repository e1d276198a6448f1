"""The routing monitor: thresholds on hand-computed loads, warnings on a collapsed router and
silence on a uniform one, check windows, validation checks, the balance-weight boost."""

import logging
import re
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model_and_task, tiny_args, toy_batch
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics
from moe_factories import make_layer

from fairseq_moe_plugin.criterions.moe_monitor import (
    HealthThresholds,
    RoutingMonitor,
    health_messages,
    layer_health,
)

E = 4
T = HealthThresholds()  # E=4: below 10% or above 50% warns; above 80% is a collapse


def test_layer_health_hand_computed():
    h = layer_health("enc1", [10, 50, 30, 10], T)  # 10% and 50% sit exactly on the bounds
    assert h.shares == [0.1, 0.5, 0.3, 0.1] and not h.imbalanced
    h = layer_health("enc1", [5, 60, 30, 5], T)
    assert (h.low, h.high, h.unused, h.collapsed_to) == ([0, 3], [1], [], None)
    assert h.imbalanced and not h.collapsed
    h = layer_health("enc1", [85, 5, 5, 5], T)
    assert h.collapsed_to == 0 and h.collapsed and h.low == [1, 2, 3]
    h = layer_health("dec1", [50, 50, 0, 0], T)
    assert h.unused == [2, 3] and h.collapsed and h.collapsed_to is None
    assert not layer_health("x", [7], T).imbalanced  # one expert: nothing to balance
    assert not layer_health("x", [0, 0], T).imbalanced  # no tokens: nothing to judge


def test_messages_name_layer_experts_and_thresholds():
    lines = health_messages(layer_health("enc1", [5, 60, 30, 5], T), "train, updates 1-100", T)
    assert lines == [
        "MoE routing imbalance in enc1 (train, updates 1-100): over-used (> 2/E = 50.0%): "
        "1 (60.0%); under-used (< 0.4/E = 10.0%): 0 (5.0%), 3 (5.0%)"
    ]
    lines = health_messages(layer_health("dec1", [90, 10, 0, 0], T), "valid", T)
    assert lines[0] == (
        "MoE routing collapse in dec1 (valid): expert 0 takes 90.0% of the tokens (> 80%); "
        "experts 2, 3 received no tokens"
    )


def _layer_and_tokens(router: str, n=400):
    """An MoE layer whose router is uniform (token i -> expert i mod E) or collapsed (all -> 0)."""
    layer = make_layer(E, 1, normalize_top_k=False, capacity_factor=0, d_model=E, d_ff=8,
                       name="encoder.layers.1", dtype=None, mode=None, seed=None)  # fmt: skip
    with torch.no_grad():
        if router == "uniform":
            layer.gate.wg.weight.copy_(5 * torch.eye(E))
        else:
            layer.gate.wg.weight.zero_()
            layer.gate.wg.weight[0] = 5.0
    x = torch.nn.functional.one_hot(torch.arange(n) % E, E).float()  # n x E, positive
    return layer, x


@pytest.mark.parametrize("router", ["uniform", "collapsed"])
def test_warnings_fire_on_a_collapsed_router_only(router):
    layer, x = _layer_and_tokens(router)
    lines = []
    monitor = RoutingMonitor(interval=2, emit=lines.append)
    checks = []
    for update in range(5):
        _, record = layer(x)
        checks += monitor.observe([record], training=True, num_updates=update)
    assert len(checks) == 2  # windows 1-2 and 3-4 closed at updates 2 and 4
    assert [c.where for c in checks] == ["train, updates 1-2", "train, updates 3-4"]
    if router == "uniform":
        assert lines == []
        assert [h.layer for h in checks[0].layers] == ["enc1"]
        assert checks[0].layers[0].shares == [0.25] * 4
    else:
        assert len(lines) == 2 * 2  # collapse + imbalance line per check
        assert lines[0].startswith("MoE routing collapse in enc1 (train, updates 1-2)")
        assert (
            "expert 0 takes 100.0%" in lines[0] and "experts 1, 2, 3 received no tokens" in lines[0]
        )


def test_validation_is_checked_when_training_resumes_and_at_flush():
    layer, x = _layer_and_tokens("collapsed")
    lines = []
    monitor = RoutingMonitor(interval=0, emit=lines.append)  # no training checks
    _, record = layer(x)
    monitor.observe([record], training=True, num_updates=0)
    for _ in range(3):
        monitor.observe([record], training=False, num_updates=0)
    assert lines == []
    monitor.observe([record], training=True, num_updates=1)
    assert len(lines) == 2 and "(valid after update 0, 3 batches)" in lines[0]
    monitor.observe([record], training=False, num_updates=0)
    RoutingMonitor._flush_at_exit(weakref.ref(monitor))  # what runs at interpreter exit
    assert len(lines) == 4 and "1 batches" in lines[2]


def test_boost_only_after_an_epoch_imbalanced_at_every_check():
    lines = []
    monitor = RoutingMonitor(interval=1, boost_factor=2.0, boost_max=0.05, emit=lines.append)
    bad = SimpleNamespace(layer="enc1", expert_load=torch.tensor([97, 1, 1, 1]))
    good = SimpleNamespace(layer="enc1", expert_load=torch.tensor([25, 25, 25, 25]))
    for update, record in enumerate([bad, bad, bad]):
        monitor.observe([record], training=True, num_updates=update)
    monitor.observe([good], training=True, num_updates=3)  # closes update 3's window (bad)
    assert monitor.end_epoch(0.01) == 0.02
    assert lines[-1] == (
        "MoE routing stayed imbalanced at all 3 checks of epoch 1: raising the balance-loss "
        "weight from 0.01 to 0.02"
    )
    for update, record in enumerate([good, bad, bad], start=4):
        monitor.observe([record], training=True, num_updates=update)
    monitor.observe([bad], training=True, num_updates=7)
    assert monitor.end_epoch(0.02) == 0.02  # two healthy checks of four: no boost
    for update in range(8, 12):
        monitor.observe([bad], training=True, num_updates=update)
    assert monitor.end_epoch(0.04) == 0.05  # capped by boost_max


def test_bad_monitor_settings_are_rejected():
    with pytest.raises(ValueError, match="--moe-monitor-interval"):
        RoutingMonitor(interval=-1)
    with pytest.raises(ValueError, match="--moe-monitor-high-load"):
        HealthThresholds(high=0.5)
    with pytest.raises(ValueError, match="--moe-monitor-collapse-share"):
        HealthThresholds(collapse=0)


def _criterion(toy_data, *extra):
    args = tiny_args(toy_data["bin"], "--criterion", "label_smoothed_cross_entropy_moe",
                     "--encoder-moe-freq", 1, "--decoder-moe-freq", 1, *extra)  # fmt: skip
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    return task.build_criterion(convert_namespace_to_omegaconf(args).criterion), args


def test_criterion_checks_on_update_boundaries_and_logs_warnings(toy_data, caplog):
    # A high-load threshold just above 1/E makes any real router "imbalanced": the test is about
    # when and where the criterion checks, the thresholds themselves are tested above.
    criterion, args = _criterion(toy_data, "--moe-monitor-interval", 2,
                                 "--moe-monitor-high-load", 1.0001)  # fmt: skip
    model, task, _ = build_model_and_task(args)
    sample = toy_batch(task, split="train", n=8)
    caplog.set_level(logging.WARNING, logger="fairseq_moe_plugin.criterions.moe_monitor")
    for update in range(3):
        model.train()
        model.set_num_updates(update)
        criterion(model, sample)
    # Every layer is "imbalanced" under this threshold, so every check warns for every layer.
    warned = {}  # where -> layers
    for message in (r.message for r in caplog.records):
        match = re.match(r"MoE routing imbalance in (\w+) \((.*?)\):", message)
        if match:
            warned.setdefault(match.group(2), set()).add(match.group(1))
    assert warned == {"train, updates 1-2": {"enc0", "enc1", "dec0", "dec1"}}
    caplog.clear()
    model.eval()
    with torch.no_grad():
        criterion(model, sample)
    assert caplog.records == []  # a validation is checked once it is over
    model.train()
    model.set_num_updates(3)
    criterion(model, sample)
    wheres = {re.search(r"\((.*?)\):", r.message).group(1) for r in caplog.records}
    assert wheres == {"valid after update 2, 1 batches"}


def test_criterion_boosts_the_balance_weight_at_the_epoch_fairseq_resets(toy_data):
    criterion, args = _criterion(toy_data, "--moe-monitor-interval", 1, "--moe-monitor-high-load",
                                 1.0001, "--moe-balance-boost-factor", 3, "--moe-balance-boost-max",
                                 1.0)  # fmt: skip
    model, task, _ = build_model_and_task(args)
    sample = toy_batch(task, split="train", n=8)
    model.train()
    update = 0
    with metrics.aggregate(new_root=True):
        for _ in range(2):  # two epochs, as fairseq_cli/train.py runs them
            with metrics.aggregate("train"):
                for _ in range(3):
                    model.set_num_updates(update)
                    _, _, log = criterion(model, sample)
                    criterion.__class__.reduce_metrics([log])
                    update += 1
            metrics.reset_meters("train")
        model.set_num_updates(update)
        _, _, log = criterion(model, sample)
    assert criterion.moe_balance_loss_weight == pytest.approx(0.01 * 3 * 3)
    assert log["moe_balance_weight_x_ss"] == pytest.approx(0.09 * log["sample_size"])


def test_boost_that_can_never_act_is_rejected(toy_data):
    with pytest.raises(ValueError, match="--moe-balance-boost-max"):
        _criterion(toy_data, "--moe-balance-boost-factor", 2, "--moe-balance-boost-max", 0.001)
