"""End to end on a toy corpus: fairseq-train (--user-dir) -> fairseq-generate / interactive /
hub interface -> sacrebleu. Marked slow; runs in CI (`make test`)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import sacrebleu
from conftest import BIN, PLUGIN_DIR, REPO, run_cli

from fairseq_moe_plugin.analysis import training_log

pytestmark = pytest.mark.slow

TRAIN_FLAGS = [
    "--arch",
    "moe_transformer_tiny",
    "--encoder-moe-freq",
    1,
    "--decoder-moe-freq",
    1,
    "--moe-expert-count",
    4,
    "--moe-top-k",
    2,
    "--criterion",
    "label_smoothed_cross_entropy_moe",
    "--label-smoothing",
    0.1,
    "--optimizer",
    "adam",
    "--lr",
    0.003,
    "--lr-scheduler",
    "inverse_sqrt",
    "--warmup-updates",
    50,
    "--max-tokens",
    2000,
    "--max-update",
    300,
    "--seed",
    1,
    "--log-interval",
    25,
    "--log-format",
    "simple",
    "--no-epoch-checkpoints",
    "--eval-bleu",
    "--eval-bleu-args",
    '{"beam": 1}',
    "--best-checkpoint-metric",
    "bleu",
    "--maximize-best-checkpoint-metric",
    "--num-workers",
    0,
    "--moe-monitor-interval",
    50,
]


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    log = run_cli(
        [
            BIN / "fairseq-train",
            toy_data["bin"],
            "--user-dir",
            PLUGIN_DIR,
            *TRAIN_FLAGS,
            "--save-dir",
            work / "checkpoints",
            "--tensorboard-logdir",
            work / "tb",
        ],
        cwd=work,
        log_name="train.log",
    )
    return {"work": work, "log": log, "bin": toy_data["bin"], "raw": toy_data["raw"]}


def test_training_loss_goes_down_and_moe_metrics_are_logged(trained):
    losses = [float(m) for m in re.findall(r"train_inner \| .*?loss=([\d.]+)", trained["log"])]
    if not losses:  # simple log format: "| loss 3.2 |"
        losses = [
            float(m) for m in re.findall(r"\| train_inner .*?\| loss ([\d.]+)", trained["log"])
        ]
    assert len(losses) >= 8, trained["log"][-2000:]
    assert losses[-1] < 0.7 * losses[0], losses
    for name in (
        "moe_aux_loss",
        "moe_balance_loss",
        "moe_z_loss",
        "moe_dropped_frac",
        "moe_entropy",
        "moe_enc0_max_load",
        "moe_dec1_cv",
        "moe_enc1_load_e0",
        "moe_dec1_entropy",
        "moe_dec1_dropped_frac",
        "moe_dec1_dropped_token_frac",
        "moe_enc1_balance",
        "moe_enc1_z_loss",
    ):
        assert re.search(rf"\btrain_inner\b.*\b{name}[ =]", trained["log"]), name
        assert re.search(rf"\bvalid\b.*\b{name}[ =]", trained["log"]), name
    assert (trained["work"] / "checkpoints" / "checkpoint_best.pt").exists()


def test_tensorboard_shows_moe_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained["work"] / "tb" / "train_inner"
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"moe_balance_loss", "moe_z_loss", "moe_enc1_cv", "moe_dropped_frac"} <= tags, tags
    assert {"moe_enc1_load_e0", "moe_dec1_load_e3", "moe_dec1_entropy"} <= tags, tags
    # fairseq-moe-usage draws the loads over updates from this tensorboard directory.
    records = training_log.read_training_log(trained["work"] / "tb").train_inner
    series = training_log.training_series(records)
    assert len(series["loads"]["enc1"]) == 4 and len(series["updates"]) >= 8
    assert all(abs(sum(s[i] for s in series["loads"]["dec1"]) - 1) < 1e-3 for i in range(8))


def test_generate_with_beam_and_score_with_sacrebleu(trained):
    out = run_cli(
        [
            BIN / "fairseq-generate",
            trained["bin"],
            "--user-dir",
            PLUGIN_DIR,
            "--path",
            trained["work"] / "checkpoints" / "checkpoint_best.pt",
            "--beam",
            5,
            "--batch-size",
            32,
            "--scoring",
            "sacrebleu",
            "--gen-subset",
            "test",
        ],
        cwd=trained["work"],
        log_name="generate.log",
    )
    hyps, refs = {}, {}
    for line in out.splitlines():
        if line.startswith("H-"):
            i, _, text = line.split("\t", 2)
            hyps[int(i[2:])] = text
        elif line.startswith("T-"):
            i, text = line.split("\t", 1)
            refs[int(i[2:])] = text
    assert len(hyps) == 100 and hyps.keys() == refs.keys()
    ids = sorted(hyps)
    bleu = sacrebleu.corpus_bleu([hyps[i] for i in ids], [[refs[i] for i in ids]])
    reported = float(re.search(r"BLEU = ([\d.]+)", out).group(1))
    assert bleu.score == pytest.approx(reported, abs=0.01)
    assert bleu.score > 30, f"toy task should be learnt, BLEU {bleu.score:.1f}"


def test_user_dir_may_name_the_installed_package_folder(trained, tmp_path):
    """--user-dir as a relative path to the source folder and as the imported package's folder."""
    import fairseq_moe_plugin

    installed = Path(fairseq_moe_plugin.__file__).parent
    ckpt = trained["work"] / "checkpoints" / "checkpoint_best.pt"
    src = (trained["raw"] / "test.src").read_text().splitlines()[:5]
    for user_dir, cwd in ((installed, tmp_path), (Path("fairseq_moe_plugin"), REPO)):
        out = run_cli(
            [
                BIN / "fairseq-interactive",
                trained["bin"],
                "--user-dir",
                user_dir,
                "--path",
                ckpt,
                "--beam",
                5,
                "--source-lang",
                "src",
                "--target-lang",
                "tgt",
                "--input",
                trained["raw"] / "test.src",
                "--buffer-size",
                8,
                "--batch-size",
                8,
            ],
            cwd=cwd,
        )
        hyps = [line.split("\t")[2] for line in out.splitlines() if line.startswith("H-")]
        assert len(hyps) == 100 and all(h.strip() for h in hyps[:5]), src


def test_hub_interface_translates(trained, tmp_path):
    from fairseq_moe_plugin.models.moe_transformer import MoETransformerModel

    shutil.copy(trained["work"] / "checkpoints" / "checkpoint_best.pt", tmp_path / "model.pt")
    hub = MoETransformerModel.from_pretrained(
        str(tmp_path),
        checkpoint_file="model.pt",
        data_name_or_path=str(trained["bin"]),
        source_lang="src",
        target_lang="tgt",
    )
    src = (trained["raw"] / "test.src").read_text().splitlines()[:4]
    ref = (trained["raw"] / "test.tgt").read_text().splitlines()[:4]
    out = hub.translate(src, beam=5)
    assert len(out) == 4
    assert sacrebleu.corpus_bleu(out, [ref]).score > 20


def test_expert_usage_on_the_trained_model_with_beam_search(trained):
    from fairseq_moe_cli import expert_usage

    out = trained["work"] / "usage"
    code = expert_usage.main([
        "--checkpoint", str(trained["work"] / "checkpoints" / "checkpoint_best.pt"),
        "--split", "test", "--generate", "--beam", "3", "--out", str(out),
        "--train-log", str(trained["work"] / "train.log"),
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "generate"
    hypotheses = json.loads((out / "hypotheses.json").read_text())
    assert len(hypotheses) == 100  # every test sentence
    assert {"layer_expert_share", "entropy_gini", "capacity_overflow", "token_identity",
            "train_expert_load", "train_balance_entropy"} <= set(summary["figures"])  # fmt: skip
    for figure in summary["figures"].values():
        assert (out / figure["png"]).stat().st_size > 1000
    loads = summary["figures"]["train_expert_load"]["data"]["loads"]
    assert set(loads) == {"enc0", "enc1", "dec0", "dec1"}
