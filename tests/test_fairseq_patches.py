"""The registry of the plugin's changes to fairseq (fairseq_moe_plugin/fairseq_patches.py)."""

import logging
from pathlib import Path

import numpy as np
from fairseq.data import data_utils

import fairseq_moe_plugin
from fairseq_moe_plugin import fairseq_patches

TESTS = Path(__file__).resolve().parent
FIELDS = ("name", "target", "changes", "reason", "dense_runs", "test", "checked")


def test_every_patch_has_every_field_and_names_a_test_that_exists():
    names = [p.name for p in fairseq_patches.PATCHES]
    assert len(names) == len(set(names))
    sources = {p.name: p.read_text(encoding="utf-8") for p in TESTS.rglob("test_*.py")}
    for patch in fairseq_patches.PATCHES:
        for field in FIELDS:
            assert getattr(patch, field), f"{patch.name}: no {field}"
        assert patch.dense_runs.split(":")[0] in ("yes", "no"), patch.name
        assert ":" in patch.target and patch.target.startswith(("fairseq.", "fairseq_cli.")), (
            patch.name
        )
        assert callable(patch.install)
        file, _, function = patch.test.partition("::")
        assert f"def {function}(" in sources.get(file, ""), f"{patch.name}: no test {patch.test}"


def test_list_patches_says_what_is_applied():
    rows = fairseq_moe_plugin.list_patches()
    assert [r["name"] for r in rows] == [p.name for p in fairseq_patches.PATCHES]
    applied = {r["name"]: r["applied"] for r in rows}
    # This process imports fairseq's trainer, data and optimizers, not fairseq-generate.
    assert all(v for n, v in applied.items() if n != "generate_under_torchrun"), applied
    assert applied["generate_under_torchrun"] is False
    assert getattr(data_utils.batch_by_size, fairseq_patches.MARKER, False)
    assert {r["name"] for r in rows if r["changes_dense_runs"]} >= {"keep_last_partial_batch"}


def test_applying_twice_changes_nothing():
    from fairseq.trainer import Trainer

    before = (data_utils.batch_by_size, Trainer.state_dict, Trainer.load_checkpoint)
    fairseq_patches.apply_patches()
    assert (data_utils.batch_by_size, Trainer.state_dict, Trainer.load_checkpoint) == before


def test_the_version_guard_warns_naming_the_patch_on_another_fairseq(caplog):
    patch = fairseq_patches.PATCHES[0]
    caplog.set_level(logging.WARNING, logger=fairseq_patches.__name__)
    assert fairseq_patches.check_version(patch, patch.checked[0])
    assert caplog.records == []
    assert not fairseq_patches.check_version(patch, "0.13.0")
    assert not fairseq_patches.check_version(patch, "0.10.2")
    assert len(caplog.records) == 2
    assert patch.name in caplog.records[0].message and "0.13.0" in caplog.records[0].message


def test_the_installed_fairseq_is_the_checked_one(caplog):
    caplog.set_level(logging.WARNING, logger=fairseq_patches.__name__)
    assert all(fairseq_patches.check_version(p) for p in fairseq_patches.PATCHES)


def test_the_global_batching_fix_is_deliberate_and_keeps_full_batches():
    """keep_last_partial_batch is global (module doc): it changes a dense run only where
    fairseq dropped sentences; a set that fills its batches is batched as fairseq does."""
    patch = next(p for p in fairseq_patches.PATCHES if p.name == "keep_last_partial_batch")
    assert patch.changes_dense_runs
    original = data_utils.batch_by_size.__wrapped__
    indices = np.arange(64, dtype=np.int64)
    kwargs = dict(max_tokens=None, max_sentences=32, required_batch_size_multiple=8)
    ours = data_utils.batch_by_size(indices, lambda i: 10, **kwargs)
    theirs = original(indices, lambda i: 10, **kwargs)
    assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]


def test_the_docs_page_lists_every_patch():
    repo = TESTS
    while not (repo / "pyproject.toml").exists():
        repo = repo.parent
    page = (repo / "docs" / "reference" / "fairseq-patches.md").read_text(encoding="utf-8")
    assert fairseq_patches.markdown_table() in page, "regenerate the table (markdown_table())"


def test_the_readme_lists_every_patch_that_changes_dense_runs():
    """The README names each deliberate fix that a dense run sees, and the patch count."""
    readme = (TESTS.parent / "README.md").read_text()
    rows = fairseq_patches.list_patches()
    dense = [row["name"] for row in rows if row["changes_dense_runs"]]
    missing = [name for name in dense if f"`{name}`" not in readme]
    assert not missing, f"README.md does not list {missing}"
    assert f"patches fairseq in {len(rows)} places" in readme
