"""label_smoothed_cross_entropy_moe: equivalence with fairseq's criterion, exact aux-loss
scaling, logged metrics."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model_and_task, tiny_args, toy_batch
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics

from fairseq_moe_plugin.criterions.moe_criterion import RouterLogitsError
from fairseq_moe_plugin.criterions.moe_metrics import (
    load_summary,
    moe_logging_output,
    reduce_moe_metrics,
)
from fairseq_moe_plugin.naming import count_key

MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-capacity-factor", 1.0]


def _criterion(args):
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task.build_criterion(cfg.criterion)


def _moe_criterion(toy_data, balance_weight, z_weight, *extra):
    argv = ["--criterion", "label_smoothed_cross_entropy_moe", "--moe-balance-loss-weight",
            balance_weight, "--moe-z-loss-weight", z_weight, *extra]  # fmt: skip
    return _criterion(tiny_args(toy_data["bin"], *MOE, *argv))


def _loss_and_grads(model, criterion, sample):
    model.zero_grad()
    loss, sample_size, logging_output = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, logging_output, grads


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_zero_weights_equal_fairseq_label_smoothed_cross_entropy(toy_data, sentence_avg):
    extra = ["--label-smoothing", 0.1] + (["--sentence-avg"] if sentence_avg else [])
    ours = _moe_criterion(toy_data, 0, 0, *extra)
    theirs = _criterion(
        tiny_args(toy_data["bin"], *MOE, *extra, "--criterion", "label_smoothed_cross_entropy")
    )
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    model.train()
    sample = toy_batch(task, split="train", n=16)
    loss_a, size_a, log_a, grads_a = _loss_and_grads(model, ours, sample)
    loss_b, size_b, log_b, grads_b = _loss_and_grads(model, theirs, sample)
    assert size_a == size_b
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(log_a["nll_loss"], log_b["nll_loss"])
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # The routing metrics are still reported.
    assert "moe_balance_loss" in log_a and "moe_dropped" in log_a


def test_aux_loss_is_weighted_sum_over_layers_times_sample_size(toy_data):
    w_b, w_z = 0.5, 0.25
    ours = _moe_criterion(toy_data, w_b, w_z, "--label-smoothing", 0.1)
    plain = _criterion(
        tiny_args(
            toy_data["bin"],
            *MOE,
            "--criterion",
            "label_smoothed_cross_entropy",
            "--label-smoothing",
            0.1,
        )
    )
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    model.eval()  # deterministic routing, so both calls see the same records
    sample = toy_batch(task, split="train", n=16)
    with torch.no_grad():
        loss, sample_size, log = ours(model, sample)
        ce, _, _ = plain(model, sample)
        _, extra = model(**sample["net_input"])
    records = extra["moe_records"]
    assert len(records) == 4
    aux = sum(w_b * r.balance_loss + w_z * r.z_loss for r in records)
    assert sample_size == sample["ntokens"]
    torch.testing.assert_close(loss, ce + aux * sample_size)
    torch.testing.assert_close(log["moe_aux_loss"], aux * sample_size)
    mean_balance = sum(r.balance_loss for r in records) / 4
    torch.testing.assert_close(log["moe_balance_loss"], mean_balance * sample_size)
    n_routed = sum(int(r.routed_tokens) for r in records)
    assert int(log["moe_routed_tokens"]) == n_routed
    assert int(log["moe_assignments"]) == 2 * n_routed  # tiny preset: top-2
    for r in records:
        assert log[count_key(r.layer, 0)] == r.expert_counts_routed[0]  # the router's choices


def test_aux_loss_gradient_reaches_the_router(toy_data):
    ours = _moe_criterion(toy_data, 1.0, 0)
    zero = _moe_criterion(toy_data, 0, 0)
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    model.eval()
    sample = toy_batch(task, split="train", n=8)
    *_, grads_aux = _loss_and_grads(model, ours, sample)
    *_, grads_plain = _loss_and_grads(model, zero, sample)
    name = "encoder.layers.0.moe.gate.wg.weight"
    assert not torch.allclose(grads_aux[name], grads_plain[name])


def test_load_summary_hand_computed():
    s = load_summary([3.0, 1.0])
    # shares 0.75 / 0.25; mean 2, std sqrt(((3-2)^2 + (1-2)^2) / 2) = 1 -> cv 0.5
    assert s == {"max": 0.75, "min": 0.25, "cv": 0.5}
    assert load_summary([5, 5, 5, 5])["cv"] == 0.0
    assert load_summary([0, 0]) == {"max": 0.0, "min": 0.0, "cv": 0.0}


def test_reduce_metrics_derives_ratios_from_summed_counts():
    worker = {
        "sample_size": 10,
        "moe_aux_loss": torch.tensor(0.2),
        "moe_balance_loss": torch.tensor(11.0),
        "moe_z_loss": torch.tensor(3.0),
        "moe_dropped": 1,
        "moe_assignments": 20,
        "moe_entropy_sum": torch.tensor(5.0),
        "moe_routed_tokens": 10,
        "moe_count:enc1:0": 6,
        "moe_count:enc1:1": 2,
    }
    other = dict(worker, **{"moe_dropped": 3, "moe_count:enc1:1": 6})
    with metrics.aggregate() as agg:
        reduce_moe_metrics([worker, other])
        values = agg.get_smoothed_values()
    assert values["moe_balance_loss"] == pytest.approx(22.0 / 20)
    assert values["moe_z_loss"] == pytest.approx(6.0 / 20)
    assert values["moe_dropped_frac"] == pytest.approx(4 / 40)
    assert values["moe_entropy"] == pytest.approx(10.0 / 20)
    # enc1 counts summed over workers: [12, 8] -> shares .6/.4, cv = 2/10
    assert values["moe_enc1_max_load"] == pytest.approx(0.6)
    assert values["moe_enc1_min_load"] == pytest.approx(0.4)
    assert values["moe_enc1_cv"] == pytest.approx(0.2)
    assert values["moe_enc1_load_e0"] == pytest.approx(0.6)
    assert values["moe_enc1_load_e1"] == pytest.approx(0.4)
    assert not any(k.startswith(("moe_count", "moe_layer:")) for k in values)


def test_per_layer_metrics_hand_computed(toy_data):
    """Two batches, one layer: every per-layer metric is derived from summed counts."""
    criterion = _moe_criterion(toy_data, 0.01, 0.001)
    records = [
        {"layer": "decoder.layers.1", "balance_loss": torch.tensor(1.5), "z_loss": torch.tensor(2.0),
         "dropped": torch.tensor(2), "dropped_tokens": torch.tensor(1),
         "routed_tokens": torch.tensor(10), "k": 2,
         "entropy": torch.tensor(0.5), "expert_load": torch.tensor([12, 4, 4, 0])},
        {"layer": "decoder.layers.1", "balance_loss": torch.tensor(1.0), "z_loss": torch.tensor(1.0),
         "dropped": torch.tensor(0), "dropped_tokens": torch.tensor(0),
         "routed_tokens": torch.tensor(30), "k": 2,
         "entropy": torch.tensor(1.0), "expert_load": torch.tensor([15, 15, 15, 15])},
    ]  # fmt: skip
    records = [SimpleNamespace(**r) for r in records]  # what moe_logging_output reads of a record
    logs = [
        dict(moe_logging_output([r], torch.tensor(0.0), size), sample_size=size, ntokens=size,
             loss=0.0, nll_loss=0.0)
        for r, size in zip(records, (10, 30), strict=True)
    ]  # fmt: skip
    with metrics.aggregate(new_root=True) as agg:
        criterion.__class__.reduce_metrics(logs)
        v = agg.get_smoothed_values()
    assert v["moe_dec1_balance"] == pytest.approx((1.5 * 10 + 1.0 * 30) / 40)
    assert v["moe_dec1_z_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert v["moe_dec1_dropped_frac"] == pytest.approx(2 / 80)
    assert v["moe_dec1_dropped_token_frac"] == pytest.approx(1 / 40)
    assert v["moe_dropped_token_frac"] == pytest.approx(1 / 40)
    assert v["moe_dec1_entropy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    # counts [27, 19, 19, 15] of 80
    assert [v[f"moe_dec1_load_e{e}"] for e in range(4)] == pytest.approx(
        [27 / 80, 19 / 80, 19 / 80, 15 / 80]
    )
    assert v["moe_dec1_max_load"] == pytest.approx(27 / 80, abs=1e-3)  # logged with 3 decimals
    assert v["moe_dec1_min_load"] == pytest.approx(15 / 80, abs=1e-3)
    mean = 20
    std = math.sqrt(((27 - mean) ** 2 + 2 * (19 - mean) ** 2 + (15 - mean) ** 2) / 4)
    assert v["moe_dec1_cv"] == pytest.approx(std / mean, abs=1e-3)


def test_negative_weight_is_rejected(toy_data):
    args = tiny_args(
        toy_data["bin"],
        "--criterion",
        "label_smoothed_cross_entropy_moe",
        "--moe-balance-loss-weight",
        -1,
    )
    with pytest.raises(ValueError, match="--moe-balance-loss-weight"):
        _criterion(args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_runs_in_fp32_in_a_half_precision_model(toy_data, dtype):
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    model = model.to(dtype).eval()
    sample = toy_batch(task, n=4)
    with torch.no_grad():
        x, extra = model(**sample["net_input"])
    assert x.dtype == dtype
    for record in extra["moe_records"]:
        assert record.balance_loss.dtype == torch.float32
        assert record.z_loss.dtype == torch.float32
        assert math.isfinite(float(record.z_loss))


def test_gate_runs_in_fp32_under_autocast(toy_data):
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    gate = model.encoder.layers[0].moe.gate
    seen = []
    gate.register_forward_hook(lambda m, i, out: seen.append(out.logits.dtype))
    sample = toy_batch(task, n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**sample["net_input"])
    assert seen == [torch.float32]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_router_logits_stop_training_naming_layer_and_update(toy_data, bad):
    criterion = _moe_criterion(toy_data, 0.01, 0.001)
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    sample = toy_batch(task, split="train", n=8)
    model.train()
    model.set_num_updates(41)
    criterion(model, sample)  # finite: no error
    with torch.no_grad():
        model.decoder.layers[1].moe.gate.wg.weight[2, 0] = bad
    with pytest.raises(RouterLogitsError, match=r"^MoE layer decoder\.layers\.1: router logits "
                       r"contain NaN or inf at update 41;"):  # fmt: skip
        criterion(model, sample)
    model.eval()
    with torch.no_grad(), pytest.raises(RouterLogitsError, match="at validation after update 41"):
        criterion(model, sample)
