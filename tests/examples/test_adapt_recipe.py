"""examples/translation/adapt_frozen_base.py: adapting a pretrained dense model to new target
languages, full fine-tuning against experts on the frozen model. End to end on a toy
three-language corpus with a tiny model (slow), and its parsing and accounting helpers."""

import json
import shutil
import sys

import pytest
import torch
from conftest import REPO, run_cli

RECIPE = REPO / "examples" / "translation" / "adapt_frozen_base.py"
TINY = ("--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2")  # fmt: skip
METHODS = ("full_ft", "parallel_experts", "lora_top1", "lora_dense", "upcycled")
FROZEN = ("parallel_experts", "lora_top1", "lora_dense")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """The recipe on en -> de, fr, es toy corpora: 5 updates per training run."""
    from toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("adapt")
    raw = root / "raw"
    raw.mkdir()
    for lang, seed in (("de", 1), ("fr", 2), ("es", 3)):
        write_corpus(str(root / lang), n_train=300, n_valid=20, n_test=20, seed=seed)
        for split in ("train", "valid", "test"):
            shutil.copy(root / lang / f"{split}.src", raw / f"{split}.en-{lang}.en")
            shutil.copy(root / lang / f"{split}.tgt", raw / f"{split}.en-{lang}.{lang}")
    args = [sys.executable, RECIPE, "--results", root / "results", "--run", "tiny",
            "--raw", raw, "--vocab-size", 80, "--shape", TINY, "--max-update", 5,
            "--pretrain-minutes", 2, "--adapt-minutes", 2, "--parallel-expert-ffn-dim", 16]  # fmt: skip
    out = run_cli(args, cwd=root, log_name="adapt.log")
    metrics = json.loads((root / "results" / "tiny" / "metrics.json").read_text())
    return root, args, metrics, out


@pytest.mark.slow
def test_every_way_is_trained_evaluated_and_reported(adapted):
    root, args, metrics, out = adapted
    assert list(metrics["models"]) == ["pretrained", *METHODS]
    assert list(metrics["methods"]) == list(METHODS)
    before = metrics["models"]["pretrained"]["bleu"]["de"]
    for name, m in metrics["models"].items():
        assert set(m["bleu"]) == set(m["chrf"]) == {"de", "fr", "es"}, name
        assert m["sentences"] == {"de": 20, "fr": 20, "es": 20}, name
        assert m["bleu_pretrain_lang_change"] == pytest.approx(m["bleu"]["de"] - before)
        assert m["train"]["updates"] == 5 and m["train"]["words_per_s"] > 0, name
        assert m["train"]["wall_s"] is not None, name
        assert 0 < m["params"]["trainable"] <= m["params"]["total"], name
        sizes = m["checkpoint"]
        assert 0 < sizes["model_bytes"] < sizes["file_bytes"], name
        assert sizes["adapter_only"] == (name in FROZEN), name
    dense = metrics["models"]["pretrained"]["params"]["total"]
    for name in ("pretrained", "full_ft", "upcycled"):
        assert metrics["models"][name]["params"]["share"] == 1.0
    assert metrics["models"]["full_ft"]["params"]["total"] == dense
    for name in FROZEN:  # the base is frozen: what trains is new, on top of the dense model
        m = metrics["models"][name]
        assert m["params"]["total"] - m["params"]["trainable"] == dense, name
        assert (
            m["checkpoint"]["file_bytes"]
            < metrics["models"]["upcycled"]["checkpoint"]["file_bytes"]
        )
        assert m["checkpoint"]["full_model_mib_logged"] > m["checkpoint"]["model_bytes"] / 2**20
    table = (root / "results" / "tiny" / "table.md").read_text()
    assert table.splitlines()[0].startswith("| model | trainable params | share |")
    assert all(f"| {name} |" in table and f"| {name} |" in out for name in METHODS)


@pytest.mark.slow
def test_a_second_run_redoes_nothing(adapted):
    root, args, metrics, _ = adapted
    out = run_cli(args, cwd=root)
    assert "training on" not in out and "fairseq-generate" not in out
    again = json.loads((root / "results" / "tiny" / "metrics.json").read_text())
    assert again["models"] == metrics["models"]


def test_parameter_counts_come_from_fairseq_train_log(tmp_path):
    from fairseq_moe_cli import adaptation_report as adapt_report

    log = tmp_path / "train.log"
    log.write_text(
        "2026 | INFO | fairseq_cli.train | num. shared model params: 6,021,376 "
        "(num. trained: 497,664)\n"
        "2026 | INFO | fairseq_cli.train | num. expert model params: 0 (num. trained: 0)\n"
    )
    assert adapt_report.trainable_parameters(log) == {
        "total": 6021376,
        "trainable": 497664,
        "share": 497664 / 6021376,
    }
    log.write_text("fairseq-train failed before building the model\n")
    with pytest.raises(ValueError, match="train.log: no 'num. shared model params' line"):
        adapt_report.trainable_parameters(log)


def test_checkpoint_sizes_count_a_tied_matrix_once_and_the_optimizer_apart(tmp_path):
    from fairseq_moe_cli import adaptation_report as adapt_report

    embed = torch.zeros(10, 4)  # 160 bytes, under two names as with --share-all-embeddings
    state = {
        "model": {"encoder.embed_tokens.weight": embed, "decoder.embed_tokens.weight": embed,
                  "fc.bias": torch.zeros(2, dtype=torch.float64)},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(8)}}},
        "cfg": {"model": {"moe_save_trainable_only": False}},
        "extra_state": {"previous_training_time": 42.5},
    }  # fmt: skip
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    sizes = adapt_report.checkpoint_sizes(path)
    assert sizes["model_bytes"] == 160 + 16 and sizes["optimizer_bytes"] == 32
    assert sizes["file_bytes"] == path.stat().st_size and not sizes["adapter_only"]
    assert adapt_report.previous_training_time(path) == 42.5


def test_full_fine_tuning_adds_the_restored_training_time_to_its_budget(tmp_path):
    """fairseq-train's --stop-time-hours clock includes the restored checkpoint's
    previous_training_time even with --reset-meters."""
    import adapt_frozen_base as adapt

    base = tmp_path / "pretrained.pt"
    torch.save({"model": {}, "extra_state": {"previous_training_time": 120.0}}, base)
    a = adapt.parse_args(["--adapt-minutes", "3"])
    flags, lr, minutes = adapt.method_args(a, "full_ft", base)
    assert minutes == 5.0 and lr == a.lr_full
    assert flags[:2] == ["--arch", "transformer"] and str(base.resolve()) in flags
    flags, lr, minutes = adapt.method_args(a, "lora_dense", base)
    assert minutes == 3.0 and lr == a.lr_adapter
    assert flags[flags.index("--moe-routing") + 1] == "dense"
    assert "--encoder-ffn-embed-dim" in flags  # the dense model's shape, for upcycling


def test_bad_method_and_overlapping_languages_are_refused(capsys):
    import adapt_frozen_base as adapt

    with pytest.raises(SystemExit):
        adapt.parse_args(["--methods", "full_ft,lora"])
    assert "--methods: unknown ['lora']; choose from full_ft, parallel_experts" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        adapt.parse_args(["--new-langs", "fr,de"])
    assert "--new-langs fr,de includes --pretrain-lang de" in capsys.readouterr().err
