"""fairseq-moe-benchmark-ep: its cost model on hand-computed cases, and the measurement."""

import dataclasses
import json

import pytest

from fairseq_moe_cli import ep_cost_model as cost
from fairseq_moe_cli.benchmark_expert_parallel import main

HW = cost.Hardware("test", nvlink_gb_s=100.0, ib_gb_s=10.0, gpus_per_node=4, achieved_tflops=50.0,
                   alpha_us=0.0)  # fmt: skip
MODEL = cost.MoEModel("test", d_model=1024, d_ff=4096, layers=4, moe_every=2, k=2, vocab=1000,
                      tokens_per_gpu=1000)  # fmt: skip


def test_bytes_and_time_per_token_by_hand():
    assert cost.bytes_per_token(MODEL) == 4 * 2 * 1024 * 2  # dispatch + combine, fwd + bwd
    assert (
        cost.bytes_per_token(dataclasses.replace(MODEL, checkpoint_activations=True))
        == 6 * 2 * 1024 * 2
    )
    # active: attention 4 d^2 x 4 layers, FFN 2 d d_ff x (2 dense + 2 x 2 experts), embedding
    active = 4 * 1024**2 * 4 + 2 * 1024 * 4096 * (2 + 2 * 2) + 1000 * 1024
    assert MODEL.active_params() == active
    t = cost.step_time_per_token(MODEL, HW, 8)
    assert t["compute"] == pytest.approx(6 * active / 50e12)
    # 8 GPUs, 4 per node: 7/8 of the bytes leave; 3 of 7 peers over NVLink, 4 over IB (slower)
    leaving = 16384 * 7 / 8
    assert t["comm"] == pytest.approx(2 * max(leaving * 3 / 7 / 100e9, leaving * 4 / 7 / 10e9))
    assert cost.step_time_per_token(MODEL, HW, 1)["comm"] == 0.0


def test_crossover_is_where_expert_compute_equals_communication():
    d_ff = cost.crossover_ffn_dim(HW, 2)
    assert d_ff == pytest.approx(2 * 50e12 / (3 * 10e9))
    expert_seconds = 12 * 2 * 1024 * d_ff / 50e12  # fwd+bwd of k experts for one token
    comm_seconds = cost.bytes_per_token(MODEL) / 10e9  # all of it over IB
    assert expert_seconds == pytest.approx(comm_seconds)


def test_calibration_reproduces_the_published_point_and_two_levels_help_small_messages():
    hw = cost.calibrate_tflops(cost.FAIRSEQ_README_MOE, cost.A100_HDR, 32, 33_000)
    assert cost.words_per_second(cost.FAIRSEQ_README_MOE, hw, 32) == pytest.approx(33_000, rel=1e-6)
    small = cost.hierarchical_speedup(2**18, cost.A100_HDR, 2048)
    large = cost.hierarchical_speedup(2**30, cost.A100_HDR, 2048)
    assert small > large > 0.9  # latency-bound messages gain most


def test_measures_two_processes_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "ep.json"
    argv = ["--worlds", "1", "2", "--tokens", "64", "--experts", "4", "--d-model", "16",
            "--d-ff", "32", "--warmup", "1", "--repeats", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    one, two = report["measured"]
    assert (one["world"], one["experts_per_process"], one["exchange_share"]) == (1, 4, 0.0)
    assert two["experts_per_process"] == 2 and 0 < two["exchange_share"] < 1
    assert two["scaling_efficiency"] == pytest.approx(
        two["tokens_per_s_per_process"] / one["tokens_per_s_per_process"]
    )
    assert [r["gpus"] for r in report["model"]["fairseq_readme_moe"]] == [32, 64, 128, 512]
    assert "| 2 | 2 |" in capsys.readouterr().out


def test_bad_worlds_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--worlds", "3", "--experts", "8"])
    assert "every W must be >= 1 and divide --experts 8" in capsys.readouterr().err
