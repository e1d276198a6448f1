"""The translation recipe: input checks of prepare_data.py, a multilingual tiny run (two
target languages) through translation_multi_simple_epoch: train -> generate -> score, and run.py
end to end (a dense model, and an MoE run shorter than one log interval): both end with
metrics.json and its table, an analysis step that does not apply being skipped with its reason."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import BIN, PLUGIN_DIR, REPO, run_cli

from fairseq_moe_plugin import naming

RECIPE = REPO / "examples" / "translation"
PREPARE = RECIPE / "prepare_data.py"
# A tiny model for run.py's presets (--model-args comes after the preset's flags and wins).
TINY = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2")  # fmt: skip


def _prepare(*args):
    return subprocess.run([sys.executable, PREPARE, *map(str, args)], capture_output=True,
                          text=True)  # fmt: skip


@pytest.fixture(scope="module")
def multi_raw(tmp_path_factory):
    """en -> de and en -> fr toy corpora in the multi-pair layout."""
    from toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("multi")
    raw = root / "raw"
    raw.mkdir()
    for lang, seed in (("de", 1), ("fr", 2)):
        write_corpus(str(root / lang), n_train=1500, n_valid=60, n_test=60, seed=seed)
        for split in ("train", "valid", "test"):
            shutil.copy(root / lang / f"{split}.src", raw / f"{split}.en-{lang}.en")
            shutil.copy(root / lang / f"{split}.tgt", raw / f"{split}.en-{lang}.{lang}")
    return raw


def test_mismatched_line_counts_name_both_files(multi_raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(multi_raw, bad)
    target = bad / "valid.en-fr.fr"
    target.write_text("".join(target.read_text().splitlines(keepends=True)[:-3]))
    proc = _prepare("--raw", bad, "--pairs", "en-de,en-fr", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "valid.en-fr.en has 60 lines" in proc.stderr and "valid.en-fr.fr has 57" in proc.stderr
    assert not (tmp_path / "out" / "spm.model").exists(), "work started despite bad input"


def test_empty_file_unknown_language_and_missing_spm_model(multi_raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(multi_raw, bad)
    (bad / "test.en-de.de").write_text("")
    proc = _prepare("--raw", bad, "--pairs", "en-de", "--out", tmp_path / "o1")
    assert proc.returncode == 2 and "test.en-de.de: empty file" in proc.stderr

    proc = _prepare("--raw", multi_raw, "--pairs", "en-xx", "--out", tmp_path / "o2")
    assert proc.returncode == 2
    assert "unknown language code 'xx'" in proc.stderr and "de, en, fr" in proc.stderr

    proc = _prepare("--raw", multi_raw, "--pairs", "en-de", "--out", tmp_path / "o3",
                    "--spm-model", tmp_path / "nope.model")  # fmt: skip
    assert proc.returncode == 2 and "nope.model: no such sentencepiece model" in proc.stderr

    proc = _prepare("--raw", multi_raw, "--pairs", "en_de", "--out", tmp_path / "o4")
    assert proc.returncode == 2 and "not a language pair" in proc.stderr


def test_plain_single_pair_layout_is_accepted(toy_data, tmp_path):
    """Any parallel text: plain train/valid/test.{src,tgt} files."""
    proc = _prepare("--raw", toy_data["raw"], "--pairs", "src-tgt", "--out", tmp_path / "w",
                    "--vocab-size", 60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "w" / "prepare.json").read_text())
    assert summary["sentences"]["test.src-tgt"] == 100
    assert (tmp_path / "w" / "data-bin" / "test.src-tgt.tgt.bin").exists()


@pytest.mark.slow
def test_multilingual_train_generate_score(multi_raw, tmp_path):
    work = tmp_path / "work"
    proc = _prepare("--raw", multi_raw, "--pairs", "en-de,en-fr", "--out", work,
                    "--vocab-size", 100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    task = ["--task", "translation_multi_simple_epoch", "--lang-pairs", "en-de,en-fr",
            "--langs", "de,en,fr", "--encoder-langtok", "tgt", "--decoder-langtok"]  # fmt: skip
    log = run_cli(
        [BIN / "fairseq-train", work / "data-bin", "--user-dir", PLUGIN_DIR, *task,
         "--arch", "moe_transformer_tiny", "--encoder-moe-freq", 1, "--decoder-moe-freq", 1,
         "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy_moe",
         "--label-smoothing", 0.1, "--optimizer", "adam", "--lr", 0.003,
         "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 50, "--max-tokens", 2000,
         "--max-update", 250, "--save-dir", tmp_path / "ck", "--no-epoch-checkpoints",
         "--num-workers", 0, "--log-format", "simple", "--seed", 1],
        cwd=tmp_path, log_name="train.log",
    )  # fmt: skip
    assert re.search(r"\| valid .*moe_balance_loss", log)
    scores = []
    for lang in ("de", "fr"):
        out = run_cli(
            [BIN / "fairseq-generate", work / "data-bin", "--user-dir", PLUGIN_DIR, *task,
             "--source-lang", "en", "--target-lang", lang, "--gen-subset", "test",
             "--path", tmp_path / "ck" / "checkpoint_best.pt", "--beam", 5,
             "--post-process", "sentencepiece", "--batch-size", 32],
            cwd=tmp_path,
        )  # fmt: skip
        (tmp_path / f"gen.{lang}").write_text(out)
        assert len(re.findall(r"^D-\d+", out, flags=re.M)) == 60
        scores += ["--generate-output", f"{lang}={tmp_path / f'gen.{lang}'}"]
    run_cli([sys.executable, REPO / "scripts" / "score_bleu.py", *scores,
             "--json", tmp_path / "scores.json"], cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "scores.json").read_text())
    assert set(report["results"]) == {"de", "fr"}
    for lang in ("de", "fr"):
        assert report["results"][lang]["num_sentences"] == 60
        assert report["results"][lang]["chrf"]["score"] > 20, report["results"][lang]
    # Routing analysis of the multilingual model: per-language figures exist and match the log.
    import numpy as np

    from fairseq_moe_cli import expert_usage
    from fairseq_moe_plugin.analysis import routing_analysis as ra

    usage = tmp_path / "usage"
    assert expert_usage.main(["--checkpoint", str(tmp_path / "ck" / "checkpoint_best.pt"),
                              "--data", str(work / "data-bin"), "--split", "test",
                              "--out", str(usage), "--train-log", str(tmp_path / "train.log")]) == 0  # fmt: skip
    summary = json.loads((usage / "summary.json").read_text())
    log = ra.load_log(usage / "routing.npz")
    assert summary["languages"]["decoder"]["grouped_by"] == "language"
    assert summary["languages"]["decoder"]["groups"] == ["de", "fr"]
    # The encoder reads English only: grouped by direction (the target-language tag differs).
    assert summary["languages"]["encoder"]["groups"] == ["en-de", "en-fr"]
    figure = summary["figures"]["decoder_language_share_decoder_layers_1"]["data"]
    layer = log["layer_names"].tolist().index("decoder.layers.1")
    for row, lang in zip(figure["values"], ("de", "fr"), strict=True):
        rows = (log["layer"] == layer) & (log["lang"] == log["langs"].tolist().index(lang))
        counts = np.bincount(log["experts"][rows].ravel(), minlength=4)
        np.testing.assert_allclose(row, counts / counts.sum())
    assert (usage / summary["figures"]["decoder_language_similarity"]["png"]).stat().st_size > 1000
    sentences = {(int(p), int(s)) for p, s in zip(log["pair"], log["sentence"], strict=True)}
    assert len(sentences) == 120  # every test sentence of both directions


def _run_recipe(root, run, model, *extra, model_args=TINY):
    """run.py with a tiny model and a tiny budget; returns (metrics.json, console output)."""
    out = run_cli(
        [sys.executable, RECIPE / "run.py", "--results", root / "results", "--run", run,
         "--model", model, "--model-args", model_args, "--max-update", 3, "--budget-minutes", 2,
         "--vocab-size", 60, "--bench-sentences", 4, *extra],
        cwd=root, log_name=f"{run}.log",
    )  # fmt: skip
    return json.loads((root / "results" / run / "metrics.json").read_text()), out


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """run.py --raw on a small toy corpus with the dense_flops preset (what make compare runs)."""
    from toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("recipe")
    write_corpus(str(root / "raw"), n_train=300, n_valid=20, n_test=20)
    metrics, out = _run_recipe(root, "dense", "dense_flops", "--raw", root / "raw",
                               "--pairs", "src-tgt")  # fmt: skip
    return root, metrics, out


@pytest.mark.slow
def test_recipe_with_a_dense_model_skips_the_routing_step_and_ends_with_metrics(dense_run):
    root, metrics, out = dense_run
    reason = metrics["skipped"]["routing_analysis"]
    assert reason.startswith("the model has no MoE layer"), reason
    assert (
        f"routing analysis skipped: {reason}" in out
        and f"skipped: routing_analysis: {reason}" in out
    )
    assert metrics["failed"] == {} and metrics["routing_analysis"] is None
    assert not (root / "results" / "dense" / "usage").exists()
    assert (
        metrics["languages"] == ["src-tgt"]
        and metrics["scores"]["results"]["tgt"]["num_sentences"] == 20
    )
    assert metrics["params"]["params_total"] == metrics["params"]["params_active_per_token"]
    assert metrics["flops"]["report"]["parameters"]["moe_layers"] == []
    assert [r["batch_size"] for r in metrics["generation"]["runs"]] == [1, 32]
    assert metrics["train"]["updates"] == 3 and metrics["expert_load_valid"] == {}
    assert "| language | BLEU | chrF | sentences |" in out and "| tgt |" in out


@pytest.mark.slow
def test_recipe_shorter_than_one_log_interval_skips_its_training_figures(dense_run):
    """3 updates, --log-interval 100: the log has no train_inner record. The routing analysis
    still runs; its figures over updates are skipped with the reason; metrics.json is written."""
    root, _, _ = dense_run
    moe = TINY + " --encoder-moe-freq 1 --decoder-moe-freq 1 --moe-expert-count 4"
    data = root / "results" / "dense" / "data"  # prepared by the dense run
    metrics, out = _run_recipe(root, "moe_short", "moe", "--data", data, model_args=moe)
    assert metrics["failed"] == {} and metrics["skipped"] == {}
    routing = metrics["routing_analysis"]
    for name in ("train_expert_load", "train_balance_entropy"):
        assert "no train_inner records" in routing["skipped"][name], routing["skipped"]
        assert f"expert_usage: no {name}: " in out
    assert "layer_expert_share" in routing["figures"]
    summary = json.loads((root / "results" / "moe_short" / "usage" / "summary.json").read_text())
    assert summary["skipped"] == routing["skipped"] and summary["mode"] == "generate"
    assert metrics["train"]["updates"] == 3
    load = naming.load_metric("encoder.layers.0", 0)
    assert load in metrics["expert_load_valid"]  # the last validation's loads
    assert "| language | BLEU | chrF | sentences |" in out


def test_a_failed_analysis_step_is_recorded_and_the_compare_table_shows_a_dash():
    import compare_dense_moe
    import run

    status = {"skipped": {}, "failed": {}}

    def fails():
        raise run.StepFailed("step failed (exit 2): x ... see flops.log\nTraceback ...")

    assert run.optional("flops", status, fails) is None
    assert status == {
        "skipped": {},
        "failed": {"flops": "step failed (exit 2): x ... see flops.log"},
    }
    assert run.routing_skip_reason(None) is None  # unknown: the step runs (and may fail)
    assert run.routing_skip_reason({"parameters": {"moe_layers": [{"layer": "x"}]}}) is None
    assert "no MoE layer" in run.routing_skip_reason({"parameters": {"moe_layers": []}})
    metrics = {"bleu": {"de": 10.0}, "chrf": {"de": 30.0}, "flops": None, "params": None,
               "generation": None, "train": {"updates": 3, "words_per_s": None}}  # fmt: skip
    row = compare_dense_moe.table({"dense_flops": metrics}).splitlines()[-1]
    assert row == "| dense_flops | 10.0 | 10.0 | 30.0 | - | - | - | 3 | - | - | - | - | - |"


def test_compare_prints_the_speed_ratios_of_the_targets():
    import compare_dense_moe

    def metrics(words, tok1, tok32):
        runs = [{"batch_size": 1, "tokens_per_s": tok1}, {"batch_size": 32, "tokens_per_s": tok32}]
        return {"train": {"words_per_s": words}, "generation": {"runs": runs}}

    rows = {"moe": metrics(950, 85, 450), "dense_flops": metrics(1000, 100, 500)}
    assert compare_dense_moe.speed_ratios(rows) == [
        "moe / dense_flops, train words/s: 0.95",
        "moe / dense_flops, gen tok/s (bs 1): 0.85",
        "moe / dense_flops, gen tok/s (bs 32): 0.90",
    ]
    assert compare_dense_moe.speed_ratios({"moe": rows["moe"]}) == []
