"""examples/translation/distill.py end to end on a toy corpus: a tiny MoE teacher trained with
fairseq-train, then the three students (baseline, word-level KD, sequence-level KD) with the same
budget, each scored, ending with distill.json and distill.md."""

import json
import shutil

import pytest
from conftest import BIN, PLUGIN_DIR, REPO, run_cli

RECIPE = REPO / "examples" / "translation"
TINY = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2")  # fmt: skip
TASK = ["--task", "translation_multi_simple_epoch", "--lang-pairs", "en-de", "--langs", "de,en",
        "--encoder-langtok", "tgt", "--decoder-langtok"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared en-de work folder (prepare_data.py) and a tiny MoE teacher trained on it."""
    from toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("distill")
    raw = root / "raw"
    write_corpus(str(root / "toy"), n_train=600, n_valid=40, n_test=30)
    raw.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(root / "toy" / f"{split}.src", raw / f"{split}.en-de.en")
        shutil.copy(root / "toy" / f"{split}.tgt", raw / f"{split}.en-de.de")
    work = root / "work"
    run_cli([BIN / "python", RECIPE / "prepare_data.py", "--raw", raw, "--pairs", "en-de",
             "--out", work, "--vocab-size", 60, "--workers", 1], cwd=root)  # fmt: skip
    teacher = root / "teacher"
    run_cli([BIN / "fairseq-train", work / "data-bin", "--user-dir", PLUGIN_DIR, *TASK,
             "--arch", "moe_transformer", *TINY.split(), "--moe-expert-count", 4,
             "--encoder-moe-freq", 1, "--decoder-moe-freq", 1,
             "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy_moe",
             "--optimizer", "adam", "--lr", 0.005, "--max-tokens", 1024, "--max-update", 20,
             "--save-dir", teacher, "--no-epoch-checkpoints", "--num-workers", 0,
             "--disable-validation", "--seed", 1], cwd=root)  # fmt: skip
    return work, teacher / "checkpoint_last.pt"


@pytest.mark.slow
def test_three_students_are_trained_scored_and_tabled(prepared, tmp_path):
    work, teacher = prepared
    out = run_cli([BIN / "python", RECIPE / "distill.py", "--teacher", teacher, "--data", work,
                   "--student", "dense_flops", "--student-args", TINY, "--max-update", 4,
                   "--train-subset-size", 100, "--teacher-beam", 2, "--max-tokens", 1024,
                   "--warmup-updates", 2, "--results", tmp_path, "--run", "d"], cwd=REPO)  # fmt: skip
    result = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert list(result["runs"]) == ["baseline", "word_kd", "seq_kd"]
    for name, row in result["runs"].items():
        assert row["updates"] == 4, name  # the same budget for every student
        assert row["test_sentences"] == {"de": 30}
        assert 0 <= row["bleu"]["de"] <= 100 and row["valid_nll_loss"] is not None
    assert result["runs"]["word_kd"]["valid_kd_loss"] is not None
    assert result["runs"]["baseline"]["valid_kd_loss"] is None
    stats = result["seq_kd_data"]["sentences"]["en-de"]
    assert stats["sources"] == stats["translated"] == 100 and stats["kept"] > 0
    # The seq-KD students train on the teacher's translations of the same 100 sources.
    seq = tmp_path / "d" / "seq_kd_data" / "spm"
    assert len((seq / "train.en-de.de").read_text().splitlines()) == stats["kept"]
    word_kd_log = (tmp_path / "d" / "word_kd" / "train.log").read_text()
    assert "label_smoothed_cross_entropy_distill" in word_kd_log and "kd_loss" in word_kd_log
    table = (tmp_path / "d" / "distill.md").read_text()
    assert "| baseline |" in table and "| seq_kd |" in table and "| word_kd |" in table
    assert "| student |" in out


@pytest.mark.slow
def test_bad_recipe_input_is_refused(prepared, tmp_path):
    work, teacher = prepared
    out = run_cli([BIN / "python", RECIPE / "distill.py", "--teacher", tmp_path / "nope.pt",
                   "--data", work, "--max-update", 2], cwd=REPO, expect_fail=True)  # fmt: skip
    assert "nope.pt: no such checkpoint" in out
    out = run_cli([BIN / "python", RECIPE / "distill.py", "--teacher", teacher, "--data", tmp_path,
                   "--max-update", 2, "--results", tmp_path], cwd=REPO, expect_fail=True)  # fmt: skip
    assert "no prepare.json" in out
    out = run_cli([BIN / "python", RECIPE / "distill.py", "--teacher", teacher, "--data", work,
                   "--max-update", 2, "--kd-alpha", 2], cwd=REPO, expect_fail=True)  # fmt: skip
    assert "--kd-alpha in [0, 1]" in out
