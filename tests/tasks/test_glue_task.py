"""The moe_glue task: GLUE directories train with fairseq-train (no preprocessing step), the
cache, bad input, and eval_glue.py's metrics against scikit-learn on the saved predictions."""

import json
import re

import numpy as np
import pytest
from conftest import BIN, PLUGIN_DIR, REPO, run_cli
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from glue_fixtures import write_separable_mnli, write_simple, write_sst2

from fairseq_moe_plugin.tasks.glue_data import GlueFormatError

TRAIN = ["--user-dir", PLUGIN_DIR, "--task", "moe_glue", "--arch", "moe_roberta_tiny",
         "--criterion", "sentence_prediction_moe", "--optimizer", "adam", "--lr", "1e-3",
         "--batch-size", 16, "--max-positions", 64, "--moe-glue-spm-vocab-size", 200,
         "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", 50,
         "--num-workers", 0, "--dropout", 0.1, "--seed", 1]  # fmt: skip


def _setup(data, *extra):
    from fairseq import options

    parser = options.get_training_parser()
    argv = [str(data), "--user-dir", str(PLUGIN_DIR), "--task", "moe_glue", "--arch",
            "moe_roberta_tiny", "--criterion", "sentence_prediction_moe",
            "--moe-glue-spm-vocab-size", "200", *map(str, extra)]  # fmt: skip
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    return tasks.setup_task(cfg.task), cfg


def test_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path):
    data = write_sst2(tmp_path, n_train=80, n_dev=10, n_test=5)
    task, _ = _setup(data)
    assert task.cfg.num_classes == 2 and task.cfg.init_token == 0
    done = task.cache / "done.json"
    stamp = done.stat().st_mtime_ns
    again, _ = _setup(data)
    assert again.cache == task.cache and done.stat().st_mtime_ns == stamp
    with open(data / "dev.tsv", "a") as f:
        f.write("word1 good word2\t1\n")
    changed, _ = _setup(data)
    assert changed.cache != task.cache
    assert json.loads((changed.cache / "done.json").read_text())["splits"]["dev"] == 11
    assert len(changed.load_dataset("valid")) == 11  # fairseq's default valid subset = dev
    assert changed.row_ids("test") == ["0", "1", "2", "3", "4"]
    # An interrupted build (no done.json) is built again, not read.
    (changed.cache / "done.json").unlink()
    (changed.cache / "input0" / "dict.txt").unlink()
    rebuilt, _ = _setup(data)
    assert rebuilt.cache == changed.cache and (rebuilt.cache / "input0" / "dict.txt").is_file()


def test_bad_directories_and_flags_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GLUE task directory .*nowhere does not exist"):
        _setup(tmp_path / "nowhere")
    d = write_simple(tmp_path, "STS-B", None, {"train": ["\t".join(["index", "genre", "filename",
                     "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]),
                     "0\tg\tf\t2012\t1\tn\tn\tA dog .\tA cat .\t1.5"]})  # fmt: skip
    with pytest.raises(GlueFormatError, match="STS-B is regression: pass --regression-target"):
        _setup(d)
    sst = write_simple(tmp_path, "SST-2", "sentence\tlabel", {"train": ["good\t1", "fine\t1"],
                                                              "dev": ["bad\t0"]})  # fmt: skip
    with pytest.raises(GlueFormatError, match=r"dev has labels \['0'\] that train.tsv never uses"):
        _setup(sst)
    (sst / "train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="train.tsv: missing SST-2 train file"):
        _setup(sst)


def test_official_validation_metrics_are_switched_on(tmp_path):
    d = write_simple(tmp_path, "MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                     {"train": ["1\t1\t2\ta b\ta c", "0\t3\t4\tx y\tz w"]})  # fmt: skip
    task, cfg = _setup(d)
    criterion = task.build_criterion(cfg.criterion)
    assert criterion.report_acc_and_f1 and criterion.keep_pred_and_targ
    assert not criterion.report_mcc and task.cfg.separator_token == 2


@pytest.mark.slow
def test_sst2_trains_to_high_accuracy_and_eval_matches_sklearn(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    data = write_sst2(tmp_path)
    log = run_cli([BIN / "fairseq-train", data, *TRAIN, "--max-update", 200, "--save-dir",
                   tmp_path / "ck", "--valid-subset", "dev", "--best-checkpoint-metric",
                   "accuracy", "--maximize-best-checkpoint-metric"], cwd=tmp_path)  # fmt: skip
    assert re.search(r"\| dev \|.*\| accuracy (9\d|100)", log), log[-3000:]
    out = tmp_path / "eval"
    run_cli([BIN / "python", REPO / "scripts" / "eval_glue.py", "--checkpoint",
             tmp_path / "ck" / "checkpoint_best.pt", "--glue-dir", data, "--out", out],
            cwd=tmp_path)  # fmt: skip
    (metrics,) = json.loads((out / "metrics.json").read_text())
    rows = [line.split("\t") for line in (out / "predictions.dev.tsv").read_text().splitlines()[1:]]
    pred, gold = [r[1] for r in rows], [r[2] for r in rows]
    assert metrics["task"] == "SST-2" and metrics["n"] == 60 == len(rows)
    assert (
        metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
        and metrics["accuracy"] >= 0.95
    )
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro"))
    submission = (out / "SST-2.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 41
    assert {line.split("\t")[1] for line in submission[1:]} <= {"0", "1"}


@pytest.mark.slow
def test_mnli_matched_and_mismatched_are_logged_and_submitted(tmp_path):
    root = tmp_path / "GLUE"
    data = write_separable_mnli(root)
    log = run_cli([BIN / "fairseq-train", data, *TRAIN, "--max-update", 120, "--save-dir",
                   tmp_path / "ck", "--valid-subset", "dev_matched,dev_mismatched"],
                  cwd=tmp_path)  # fmt: skip
    assert re.search(r"\| dev_matched \|.*accuracy", log) and re.search(
        r"\| dev_mismatched \|.*accuracy", log
    )
    out = tmp_path / "eval"
    run_cli([BIN / "python", REPO / "scripts" / "eval_glue.py", "--checkpoint",
             tmp_path / "ck" / "checkpoint_last.pt", "--glue-dir", data, "--out", out],
            cwd=tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["task"] for m in metrics] == ["MNLI-m", "MNLI-mm"] and all(
        m["n"] == 45 for m in metrics
    )
    for name in ("MNLI-m", "MNLI-mm"):
        lines = (out / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 21
        labels = {line.split("\t")[1] for line in lines[1:]}
        assert labels <= {"entailment", "neutral", "contradiction"}
    rows = [
        line.split("\t")
        for line in (out / "predictions.dev_matched.tsv").read_text().splitlines()[1:]
    ]
    accuracy = np.mean([p == g for _, p, g in rows])
    assert metrics[0]["accuracy"] == pytest.approx(accuracy)


def test_official_metrics_are_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    from fairseq_moe_cli.eval_glue import official_metrics
    from fairseq_moe_plugin.tasks.glue_data import glue_task

    pred, gold = np.array([1, 0, 1, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
    cola = official_metrics(glue_task("CoLA"), pred, gold)
    assert cola["mcc"] == pytest.approx(matthews_corrcoef(gold, pred))
    assert cola["accuracy"] == pytest.approx(4 / 6)
    mrpc = official_metrics(glue_task("MRPC"), pred, gold)
    assert mrpc["f1"] == pytest.approx(f1_score(gold, pred)) == pytest.approx(2 / 3)
    scores, truth = np.array([0.1, 2.0, 3.5, 4.9]), np.array([0.0, 2.5, 3.0, 5.0])
    sts = official_metrics(glue_task("STS-B"), scores, truth)
    assert sts == {"pearson": pytest.approx(pearsonr(scores, truth)[0]),
                   "spearman": pytest.approx(spearmanr(scores, truth)[0])}  # fmt: skip


@pytest.mark.slow
def test_stsb_regression_trains_and_reports_pearson_and_spearman(tmp_path):
    import random

    rng = random.Random(4)
    header = "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2",
                        "sentence1", "sentence2", "score"])  # fmt: skip

    def rows(n):
        out = []
        for i in range(n):
            score = rng.choice([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
            s1 = " ".join(f"word{rng.randint(0, 20)}" for _ in range(4))
            s2 = f"level{int(score)} " + " ".join(f"word{rng.randint(0, 20)}" for _ in range(3))
            out.append(f"{i}\tg\tf\t2012\t{i}\tn\tn\t{s1}\t{s2}\t{score:.3f}")
        return out

    test = [f"{i}\tg\tf\t2012\t{i}\tn\tn\ta b\tlevel3 c\t" for i in range(5)]
    data = write_simple(tmp_path, "STS-B", header, {"train": rows(300), "dev": rows(40)})
    (data / "test.tsv").write_text(
        "\n".join([header.rsplit("\t", 1)[0]] + [t[:-1] for t in test]) + "\n"
    )
    run_cli([BIN / "fairseq-train", data, *TRAIN, "--regression-target", "--max-update", 150,
             "--save-dir", tmp_path / "ck", "--valid-subset", "dev"], cwd=tmp_path)  # fmt: skip
    out = tmp_path / "eval"
    run_cli([BIN / "python", REPO / "scripts" / "eval_glue.py", "--checkpoint",
             tmp_path / "ck" / "checkpoint_last.pt", "--glue-dir", data, "--out", out],
            cwd=tmp_path)  # fmt: skip
    from scipy.stats import pearsonr, spearmanr

    (metrics,) = json.loads((out / "metrics.json").read_text())
    rows_ = [
        line.split("\t") for line in (out / "predictions.dev.tsv").read_text().splitlines()[1:]
    ]
    pred, gold = np.array([float(r[1]) for r in rows_]), np.array([float(r[2]) for r in rows_])
    assert metrics["pearson"] == pytest.approx(pearsonr(pred, gold)[0], abs=1e-5)
    assert metrics["spearman"] == pytest.approx(spearmanr(pred, gold)[0], abs=1e-5)
    assert metrics["pearson"] > 0.8, metrics
    assert len((out / "STS-B.tsv").read_text().splitlines()) == 6


@pytest.mark.slow
def test_mrpc_and_cola_validation_log_f1_and_mcc(tmp_path):
    import random

    rng = random.Random(9)

    def pair_rows(n):
        rows = []
        for i in range(n):
            label = rng.choice("01")
            cue = "same" if label == "1" else "other"
            rows.append(f"{label}\t{i}\t{i + 1}\tword{rng.randint(0, 9)} word{rng.randint(0, 9)}\t"
                        f"{cue} word{rng.randint(0, 9)}")  # fmt: skip
        return rows

    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    mrpc = write_simple(tmp_path, "MRPC", header, {"train": pair_rows(200), "dev": pair_rows(30)})
    log = run_cli([BIN / "fairseq-train", mrpc, *TRAIN, "--max-update", 40, "--save-dir",
                   tmp_path / "ck1", "--no-save"], cwd=tmp_path)  # fmt: skip
    assert re.search(r"\| valid \|.*\| f1 [\d.]+", log), log[-2000:]
    from glue_fixtures import separable_sentences, write_cola

    cola = write_cola(tmp_path, {"train": separable_sentences(200, 1),
                                 "dev": separable_sentences(30, 2)})  # fmt: skip
    log = run_cli([BIN / "fairseq-train", cola, *TRAIN, "--max-update", 40, "--save-dir",
                   tmp_path / "ck2", "--no-save"], cwd=tmp_path)  # fmt: skip
    assert re.search(r"\| valid \|.*\| mcc [-\d.]+", log), log[-2000:]
