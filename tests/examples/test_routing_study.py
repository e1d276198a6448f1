"""examples/translation/routing_study.py on a fake tree of run.py results (no training): the
routing figures come from the right metrics, seeds aggregate to mean ± half-range, the verdict
against the baseline follows the spread, and the study writes its json and tables (a failed run
listed, the study going on); run.py's training record feeds ``expert_load_train``."""

import json
import subprocess

import pytest
import routing_study as rs
import run
from presets import MODEL_PRESETS, ROUTING_VARIANTS

from fairseq_moe_plugin.naming import layer_metric, load_metric


def _loads(layer, shares):
    return {load_metric(layer, e): s for e, s in enumerate(shares)}


def fake_metrics(bleu, chrf, valid=None, train=None, words=3000.0, gen32=100.0, gen1=30.0):
    """What run.py's metrics.json holds, reduced to the keys the study reads."""
    runs = [
        {"batch_size": 1, "sentences_per_s": gen1},
        {"batch_size": 32, "sentences_per_s": gen32},
    ]
    return {"bleu": bleu, "chrf": chrf, "expert_load_valid": valid or {},
            "expert_load_train": train or {}, "train": {"words_per_s": words, "updates": 600},
            "generation": {"runs": runs}, "flops": {"gflops_per_target_token": 0.02}}  # fmt: skip


def test_routing_summary_reads_loads_entropy_training_drops_and_expert_choice_stats():
    valid = {**_loads("enc1", [0.4, 0.3, 0.2, 0.1]), **_loads("dec1", [0.25] * 4),
             "moe_entropy": 1.2, "moe_dropped_frac": 0.0,
             layer_metric("enc1", "unchosen_frac"): 0.1, layer_metric("enc3", "unchosen_frac"): 0.9,
             layer_metric("enc1", "experts_per_token"): 2.0}  # fmt: skip
    valid.update(_loads("enc3", [0.25] * 4))
    valid[layer_metric("enc3", "experts_per_token")] = 1.5
    summary = rs.routing_summary(valid, {"moe_dropped_frac": 0.07, "moe_entropy": 9.0})
    assert summary == {"max_load": 0.4, "min_load": 0.1, "entropy": 1.2, "dropped_frac": 0.07,
                       "unchosen_frac": 0.5, "experts_per_token": 1.75}  # fmt: skip
    dense = rs.routing_summary({}, {})
    assert set(dense.values()) == {None}


def test_stats_are_mean_and_half_range_and_the_verdict_follows_the_spread():
    assert rs.stat([10.0, 12.0, None]) == {"mean": 11.0, "spread": 1.0, "values": [10.0, 12.0]}
    assert rs.stat([None, None]) is None
    base = rs.stat([10.0, 12.0])  # 11 ± 1
    assert rs.versus(rs.stat([13.5, 13.5]), base) == {"diff": 2.5, "verdict": "beats"}
    assert rs.versus(rs.stat([11.5, 13.5]), base) == {"diff": 1.5, "verdict": "within spread"}
    assert rs.versus(rs.stat([8.0, 8.0]), base) == {"diff": -3.0, "verdict": "worse"}
    assert rs.versus(rs.stat([20.0]), base)["verdict"] == "1 seed"
    assert rs.versus(None, base) is None
    assert rs.cell(base) == "11.0 ± 1.0" and rs.cell(rs.stat([3.0]), ".2f") == "3.00"
    assert rs.cell(None) == "-"


def _tree(tmp_path, prefix, variants, skip=()):
    """results/<prefix>_<variant>_s<seed>/metrics.json for seeds 1 and 2."""
    figures = {}
    for i, variant in enumerate(variants):
        for seed in (1, 2):
            if (variant, seed) in skip:
                continue
            b = 10.0 + i + (seed - 1) * 0.5  # variant i: de 10+i / 10.5+i, fr one more
            valid = {} if variant == "dense_flops" else {
                **_loads("enc1", [0.5, 0.2, 0.2, 0.1]), "moe_entropy": 1.0 + seed / 10}  # fmt: skip
            train = {} if variant == "dense_flops" else {"moe_dropped_frac": 0.01 * seed}
            m = fake_metrics({"de": b, "fr": b + 1}, {"de": 30.0 + i, "fr": 31.0 + i}, valid,
                             train, words=1000.0 * seed)  # fmt: skip
            folder = tmp_path / f"{prefix}_{variant}_s{seed}"
            folder.mkdir()
            (folder / "metrics.json").write_text(json.dumps(m))
            figures[variant, seed] = m
    return figures


@pytest.fixture
def no_subprocess(monkeypatch):
    """The study's subprocesses replaced: data preparation succeeds, a started run fails."""
    started = []

    class FailingRun:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 3

    monkeypatch.setattr(rs.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(rs.subprocess, "Popen", FailingRun)
    return started


def test_study_reads_the_runs_and_writes_json_and_tables(tmp_path, no_subprocess):
    variants = ["top2", "top1", "dense_flops"]
    _tree(tmp_path, "st", variants, skip={("top1", 2)})
    rc = rs.main(["--prefix", "st", "--results", str(tmp_path), "--variants", ",".join(variants),
                  "--langs", "de,fr", "--parallel", "2", "--threads", "1"])  # fmt: skip
    assert rc == 1  # a run failed
    (cmd,) = no_subprocess  # only the missing run was started, with the variant's flags
    assert cmd[cmd.index("--run") + 1] == "st_top1_s2" and cmd[cmd.index("--seed") + 1] == "2"
    assert cmd[cmd.index("--model-args") + 1] == "--moe-top-k 1 --moe-expert-ffn-dim 2048"
    assert cmd[cmd.index("--threads") + 1] == "1" and "--no-routing-analysis" in cmd
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "st_data")

    study = json.loads((tmp_path / "st" / "routing_study.json").read_text())
    assert list(study["variants"]) == variants and study["baseline"] == "top2"
    assert list(study["failed"]) == ["st_top1_s2"]
    top2 = study["variants"]["top2"]["stats"]
    assert top2["bleu"]["de"] == {"mean": 10.25, "spread": 0.25, "values": [10.0, 10.5]}
    assert top2["bleu_mean"] == {"mean": 10.75, "spread": 0.25, "values": [10.5, 11.0]}
    assert top2["max_load"]["mean"] == 0.5 and top2["min_load"]["mean"] == 0.1
    assert top2["dropped_frac"]["mean"] == pytest.approx(0.015)
    assert top2["entropy"]["mean"] == pytest.approx(1.15) and top2["unchosen_frac"] is None
    assert top2["train_words_per_s"] == {
        "mean": 1500.0,
        "spread": 500.0,
        "values": [1000.0, 2000.0],
    }
    dense = study["variants"]["dense_flops"]
    assert dense["stats"]["max_load"] is None and dense["stats"]["chrf_mean"]["mean"] == 32.5
    assert dense["vs_baseline"] == {"diff": 2.0, "verdict": "beats"}  # 12.75 ± .25 vs 10.75 ± .25
    assert study["variants"]["top1"]["vs_baseline"]["verdict"] == "1 seed"
    assert study["variants"]["top1"]["seeds"] == [1]

    md = (tmp_path / "st" / "routing_study.md").read_text()
    assert "| variant | de | fr | mean | vs top2 |" in md
    assert "| top2 | 10.2 ± 0.2 | 11.2 ± 0.2 | 10.8 ± 0.2 | baseline |" in md
    assert "| top1 | 11.0 | 12.0 | 11.5 | +0.8 (1 seed) |" in md
    assert "| dense_flops | 12.2 ± 0.2 | 13.2 ± 0.2 | 12.8 ± 0.2 | +2.0 (beats) |" in md
    assert "| dense_flops | 32.0 ± 0.0 | 33.0 ± 0.0 | 32.5 ± 0.0 |" in md  # chrF
    assert (
        "| top2 | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.015 ± 0.005 | 1.150 ± 0.050 | - | - | 1500 ± 500 |"
        in md
    )
    assert "| dense_flops | - | - | - | - | - | - |" in md
    assert "st_top1_s2: run.py exited 3, see" in md
    assert "2 run(s) at a time with 1 torch thread(s) each" in md


def test_study_flags_are_checked():
    with pytest.raises(SystemExit):
        rs.parse_args(["--variants", "top2,nope"])
    with pytest.raises(SystemExit):
        rs.parse_args(["--seeds", "1,x"])
    a = rs.parse_args(["--parallel", "2"])
    assert a.threads >= 1 and a.seeds == [1, 2] and a.variants == list(ROUTING_VARIANTS)


def test_variants_build_on_presets_and_the_baseline_is_top2():
    assert rs.BASELINE == "top2" and ROUTING_VARIANTS["top2"] == ("moe", [])
    for name, (preset, args) in ROUTING_VARIANTS.items():
        assert preset in MODEL_PRESETS, name
        assert all(isinstance(x, str) for x in args) and len(args) % 2 == 0, name


def test_run_records_the_last_training_record_and_validation(tmp_path):
    log = tmp_path / "train.log"
    line = "2026-01-01 00:00:00 | INFO | {} | {}\n"
    log.write_text(
        line.format("train_inner", json.dumps({"num_updates": "100", "moe_dropped_frac": "0.2"}))
        + line.format(
            "valid",
            json.dumps({"valid_num_updates": "100", "valid_moe_entropy": "1.5", "valid_loss": "3"}),
        )  # fmt: skip
        + line.format(
            "train",
            json.dumps(
                {"train_num_updates": "120", "train_wps": "900", "train_moe_dropped_frac": "0.1"}
            ),
        )  # fmt: skip
    )
    train, valid, last_train = run.training_stats(log, 2.0)
    assert train == {"updates": 120, "epochs": 1, "words_per_s": 900.0, "budget_minutes": 2.0}
    assert valid == {"moe_entropy": 1.5} and last_train == {"moe_dropped_frac": 0.1}
    a = run.parse_args(["--seed", "7", "--threads", "1", "--prepare-only", "--no-routing-analysis"])
    assert (a.seed, a.threads, a.prepare_only, a.no_routing_analysis) == (7, 1, True, True)


def test_every_moe_variant_has_the_baselines_active_flops_per_token(toy_data):
    """Fair comparison: the same matrix-product MACs per token (analytic count, ``flops.py``)
    for every MoE variant as for top-2, on a batch whose 32 tokens make C = 2 * 32 / 8 exact."""
    from conftest import build_model_and_task, tiny_args

    from fairseq_moe_plugin.analysis.flops import BatchShape, ModelSpec, analytic_macs

    shape = BatchShape(src_lens=[8] * 4, tgt_lens=[8] * 4, src_width=8, tgt_width=8)
    macs = {}
    for name, (preset, args) in ROUTING_VARIANTS.items():
        if preset != "moe":
            continue
        flags = [*MODEL_PRESETS[preset], *args, "--criterion", "label_smoothed_cross_entropy_moe"]
        model, _, _ = build_model_and_task(tiny_args(toy_data["bin"], *flags))
        macs[name] = sum(analytic_macs(ModelSpec.from_model(model), shape).values())
    assert set(macs) == set(ROUTING_VARIANTS) - {"dense_flops"}
    assert macs == dict.fromkeys(macs, macs["top2"])
