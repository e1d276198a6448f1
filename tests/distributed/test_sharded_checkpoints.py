"""Sharded checkpoints (``--moe-checkpoint-format sharded``): each process writes its own experts
and their Adam moments through torch.distributed.checkpoint, dense tensors once; loading
reshards to any W and P; fairseq's rotation, atomic saves, the consolidate tool, weights-only
reading of DCP's metadata, and clear errors for damaged checkpoints."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from distributed_helpers import _free_port, run_in_processes
from fairseq_runs import E, assert_same_checkpoints, assert_same_updates, copy_checkpoint, train
from unsafe_pickle import RunsCode

from fairseq_moe_plugin.distributed.checkpoint_layout import ExpertRows, expert_rows
from fairseq_moe_plugin.distributed.dcp_storage import (
    ShardedCheckpointError,
    check_folder,
    load_into,
    read_metadata,
    save_folder,
)
from fairseq_moe_plugin.distributed.sharded_checkpoint import (
    SHARD_ROOT,
    read_shards,
    read_skeleton,
    referenced_folders,
    shard_folder,
    write_shards,
)
from fairseq_moe_plugin.modules.expert_parallel import ExpertParallelGroups, local_expert_state
from fairseq_moe_plugin.modules.experts import StackedExperts

# -- the DCP folder: weights-only metadata, checks before reading ----------------------------------


def _folder(tmp_path):
    folder = tmp_path / "dcp"
    save_folder(
        folder, {"a": torch.arange(6.0), "b/e0": torch.ones(2, 3), "b/e1": torch.zeros(2, 3)}
    )
    return folder


def test_metadata_is_read_without_unpickling_arbitrary_objects(tmp_path):
    folder = _folder(tmp_path)
    metadata = read_metadata(folder)
    assert sorted(metadata.state_dict_metadata) == ["a", "b/e0", "b/e1"]
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ShardedCheckpointError, match=r"\.metadata: the checkpoint metadata names "
                       r"posix\.system, which is not one of the classes"):  # fmt: skip
        read_metadata(folder)
    assert not marker.exists()  # nothing ran
    (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ShardedCheckpointError, match=r"is not DCP checkpoint metadata"):
        read_metadata(folder)


def test_missing_and_truncated_files_are_named_before_reading(tmp_path):
    folder = _folder(tmp_path)
    data = folder / "__0_0.distcp"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    with pytest.raises(ShardedCheckpointError, match=rf"shard file .*__0_0\.distcp is truncated: it "
                       rf"has {size // 2} bytes, the checkpoint's metadata places {size} in it"):  # fmt: skip
        check_folder(folder)
    data.unlink()
    with pytest.raises(ShardedCheckpointError, match=r"__0_0\.distcp is missing"):
        check_folder(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(ShardedCheckpointError, match=r"has no \.metadata: the save that wrote it "
                       "did not finish"):  # fmt: skip
        check_folder(folder)
    with pytest.raises(ShardedCheckpointError, match=r"shard folder .*nowhere does not exist"):
        check_folder(tmp_path / "nowhere")


def test_loading_checks_keys_shapes_and_dtypes(tmp_path):
    folder = _folder(tmp_path)
    b1 = torch.full((2, 3), 5.0)
    load_into(folder, {"b/e1": b1})
    assert not b1.any()  # filled in place
    with pytest.raises(ShardedCheckpointError, match=r"holds no tensor 'c'"):
        load_into(folder, {"c": torch.empty(1)})
    with pytest.raises(ShardedCheckpointError, match=r"'a' is \(6,\) torch.float32 there, \(5,\)"):
        load_into(folder, {"a": torch.empty(5)})


# -- resharding: saved at W=4, P=4; read at any layout ---------------------------------------------

D, F = 3, 5


def _state(experts):
    adam = {"exp_avg": experts.fc1_weight.detach() * 2, "step": 7}
    return {
        "model": {"dense": torch.arange(4.0), **{f"experts.{k}": v.detach()
                                                  for k, v in experts.state_dict().items()}},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(4), "step": 7}, 1: adam},
                                 "param_groups": [{"params": [0, 1], "lr": 0.1}]},
        "extra_state": {"train_iterator": {"epoch": 2}},
    }  # fmt: skip


def _write_in_processes(rank, world, root):
    torch.manual_seed(0)
    groups = ExpertParallelGroups(world, rank, world, None, None)
    experts = StackedExperts(E, D, F, expert_parallel=groups)  # expert e's rows: e's weights
    with local_expert_state():  # the rows this process holds, as a sharded save takes them
        state = _state(experts)
    skeleton = write_shards(state, {f"experts.{k}": ExpertRows(rank * 2, 2, E) for k in
                            StackedExperts._STACKED}, ["dense", "experts.fc1_weight"], root, 3)  # fmt: skip
    if rank == 0:
        torch.save(skeleton, os.path.join(root, "checkpoint.pt"))
    return skeleton["moe_sharded"]["folder"]


@pytest.mark.distributed
def test_four_writers_read_back_at_every_layout(tmp_path):
    folders = run_in_processes(_write_in_processes, 4, str(tmp_path))
    assert len(set(folders)) == 1  # one folder, its name agreed by all
    path = tmp_path / "checkpoint.pt"
    skeleton = read_skeleton(path)
    assert os.path.getsize(path) < 20_000  # the skeleton holds no tensor
    files = sorted(p.name for p in shard_folder(path, skeleton).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    torch.manual_seed(0)
    full = StackedExperts(E, D, F)
    for rank, size in [(0, 1), (1, 2), (3, 4), (0, 8)]:
        state = read_shards(path, skeleton, layout=(rank, size))
        rows = slice(rank * E // size, (rank + 1) * E // size)
        torch.testing.assert_close(state["model"]["experts.fc2_weight"], full.fc2_weight[rows],
                                   rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(state["model"]["dense"], torch.arange(4.0))
        moments = state["last_optimizer_state"]["state"]
        torch.testing.assert_close(moments[1]["exp_avg"], full.fc1_weight[rows].detach() * 2)
        assert moments[1]["step"] == 7 and moments[0]["exp_avg"].tolist() == [1.0] * 4
        assert state["extra_state"] == {"train_iterator": {"epoch": 2}}
    with pytest.raises(ShardedCheckpointError, match=r"8 experts, which --moe-expert-parallel-size "
                       "3 does not divide"):  # fmt: skip
        read_shards(path, skeleton, layout=(0, 3))


def test_expert_rows_come_from_the_modules():
    groups = ExpertParallelGroups(4, 2, 4, None, None)
    model = torch.nn.ModuleDict({"moe": torch.nn.ModuleDict(
        {"experts": StackedExperts(E, D, F, expert_parallel=groups), "gate": torch.nn.Linear(D, E)})})  # fmt: skip
    rows = expert_rows(model)
    assert sorted(rows) == [f"moe.experts.{k}" for k in sorted(StackedExperts._STACKED)]
    assert set(rows.values()) == {ExpertRows(4, 2, E)}  # the router (E x D) is dense


# -- fairseq-train (slow) -------------------------------------------------------------------------

SHARDED = ["--moe-checkpoint-format", "sharded"]


@pytest.fixture(scope="module")
def sharded_run(toy_data, tmp_path_factory):
    """W=4, P=4, sharded: epoch 1 is 4 updates; a mid-epoch checkpoint after update 2
    (checkpoint_1_2.pt) and the end-of-epoch one (checkpoint1.pt, = checkpoint_best.pt)."""
    root = tmp_path_factory.mktemp("sharded")
    updates, _ = train(toy_data, root / "w4p4", 4, "--moe-expert-parallel-size", 4, *SHARDED,
                       "--save-interval-updates", 2, "--max-update", 4)  # fmt: skip
    return {"root": root, "updates": updates, "dir": root / "w4p4"}


CHECKPOINTS = {"mid": ("checkpoint_1_2.pt", 4, [3, 4]), "end": ("checkpoint1.pt", 6, [5, 6])}
LAYOUTS = {
    "w4p4": (4, ["--moe-expert-parallel-size", 4]),
    "w2p2": (2, ["--moe-expert-parallel-size", 2, "--update-freq", 2]),
    "w2p1": (2, ["--update-freq", 2]),
    "w1": (1, ["--update-freq", 4]),
}


def _resume(toy_data, run, which, layout, tmp_path, how):
    """Resume ``which`` checkpoint at ``layout``: as the checkpoint_last fairseq finds in its
    save directory, or named by --restore-file (the file itself, or checkpoint_best.pt)."""
    name, max_update, _ = CHECKPOINTS[which]
    world, flags = LAYOUTS[layout]
    save_dir = tmp_path / f"{which}_{layout}"
    restore = []
    if how == "last":
        copy_checkpoint(run["dir"] / name, save_dir)
    else:
        source = run["dir"] / ("checkpoint_best.pt" if how == "best" else name)
        restore = ["--restore-file", source]
    updates, _ = train(toy_data, save_dir, world, *flags, *SHARDED, *restore,
                       "--max-update", max_update)  # fmt: skip
    return updates, save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def references(toy_data, sharded_run, tmp_path_factory):
    """The W=4, P=4 resumes of both checkpoints."""
    root = tmp_path_factory.mktemp("references")
    return {w: _resume(toy_data, sharded_run, w, "w4p4", root, "last") for w in CHECKPOINTS}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("which", list(CHECKPOINTS))
@pytest.mark.parametrize("layout, how", [("w2p2", "restore"), ("w2p1", "best"), ("w1", "last")])
def test_resume_at_another_layout_gives_the_same_next_updates(
    toy_data, sharded_run, references, tmp_path, which, layout, how
):
    """Loss, gradient norm, every routing metric, the weights and Adam's moments of the next two
    updates equal the W=4, P=4 resume's; the mid-epoch resume continues on the data the
    uninterrupted run took next (its updates 3 and 4)."""
    if how == "best" and which == "mid":
        how = "restore"  # checkpoint_best is the end-of-epoch one
    updates, last = _resume(toy_data, sharded_run, which, layout, tmp_path, how)
    reference, reference_last = references[which]
    expected = CHECKPOINTS[which][2]
    assert sorted(updates) == sorted(reference) == expected
    assert_same_updates(updates, reference, expected)
    assert_same_checkpoints(last, reference_last)
    if which == "mid":
        assert_same_updates(updates, sharded_run["updates"], expected)


@pytest.mark.slow
@pytest.mark.distributed
def test_consolidate_round_trip_equals_a_consolidated_save(toy_data, sharded_run, tmp_path):
    """The same W=4, P=4 training saved consolidated is, tensor for tensor, what
    fairseq-moe-consolidate makes of the sharded save; --to sharded gives it back."""
    from conftest import BIN, run_cli

    train(toy_data, tmp_path / "consolidated", 4, "--moe-expert-parallel-size", 4,
          "--save-interval-updates", 2, "--max-update", 4)  # fmt: skip
    made = tmp_path / "made.pt"
    run_cli([BIN / "fairseq-moe-consolidate", sharded_run["dir"] / "checkpoint1.pt", made],
            cwd=tmp_path)  # fmt: skip
    a, b = torch.load(made), torch.load(tmp_path / "consolidated" / "checkpoint1.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, entry in b["last_optimizer_state"]["state"].items():
        for key, value in entry.items():
            other = a["last_optimizer_state"]["state"][index][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    back = tmp_path / "back" / "sharded.pt"
    run_cli([BIN / "fairseq-moe-consolidate", made, back], cwd=tmp_path)
    assert_same_checkpoints(back, made)
    out = run_cli([BIN / "fairseq-moe-consolidate", made, back], cwd=tmp_path, expect_fail=True)
    assert "exists (use --force to overwrite)" in out


def _damaged_copy(run, tmp_path):
    target = tmp_path / "damaged"
    for name in ("checkpoint1.pt", "checkpoint_1_2.pt"):
        copy_checkpoint(run["dir"] / name, target, name)
    return target, shard_folder(target / "checkpoint1.pt", read_skeleton(target / "checkpoint1.pt"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("damage, message", [
    ("missing", r"__2_0\.distcp is missing: the checkpoint's metadata places \d+ bytes"),
    ("truncated", r"__2_0\.distcp is truncated: it has 100 bytes"),
    ("no_folder", r"is a sharded checkpoint whose shard folder .* does not exist"),
])  # fmt: skip
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one_loads(
    toy_data, sharded_run, tmp_path, damage, message
):
    from conftest import BIN, PLUGIN_DIR, run_cli
    from fairseq_runs import TRAIN

    target, folder = _damaged_copy(sharded_run, tmp_path)
    data = folder / "__2_0.distcp"
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    else:
        shutil.rmtree(folder)
    resume = [BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(),
              BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR, *TRAIN, *SHARDED,
              "--moe-expert-parallel-size", 2, "--update-freq", 2, "--max-update", 6,
              "--save-dir", tmp_path / "resumed"]  # fmt: skip
    out = run_cli([*resume, "--restore-file", target / "checkpoint1.pt"], cwd=tmp_path,
                  expect_fail=True)  # fmt: skip
    assert "checkpoint1.pt" in out
    assert len(__import__("re").findall(message, out)) >= 1, out[-3000:]
    # the mid-epoch checkpoint's own folder is intact: it still loads
    out = run_cli([*resume[:-2], "--save-dir", tmp_path / "resumed_mid", "--max-update", 4,
                   "--restore-file", target / "checkpoint_1_2.pt"], cwd=tmp_path)  # fmt: skip
    assert "Loaded checkpoint" in out and "(epoch 1 @ 2 updates)" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_of_another_model_is_refused_naming_the_file_and_the_tensor(
    toy_data, sharded_run, tmp_path
):
    from conftest import BIN, PLUGIN_DIR, run_cli
    from fairseq_runs import TRAIN

    flags = [a if a != E else 4 for a in TRAIN]  # --moe-expert-count 4
    out = run_cli([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(),
                   BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR, *flags,
                   *SHARDED, "--moe-expert-parallel-size", 2, "--max-update", 6,
                   "--save-dir", tmp_path / "other", "--restore-file",
                   sharded_run["dir"] / "checkpoint1.pt"], cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert "checkpoint1.pt is a checkpoint of another model" in out
    assert "holds 8 experts there, 4 in this model (--moe-expert-count)" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(toy_data, tmp_path):
    """Rank 1 dies while writing its shards of the save after update 4: checkpoint_last.pt
    still names the complete folder of update 2 and resumes; the next save removes the half
    written folder."""
    from conftest import BIN, HELPERS, PLUGIN_DIR, run_cli
    from fairseq_runs import TRAIN

    save_dir = tmp_path / "crash"
    args = [toy_data["bin"], "--user-dir", PLUGIN_DIR, *TRAIN, *SHARDED,
            "--moe-expert-parallel-size", 2, "--save-interval-updates", 2,
            "--save-dir", save_dir]  # fmt: skip
    out = run_cli([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(),
                   HELPERS / "crash_during_save.py", 4, *args, "--max-update", 6],
                  cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert "Saved checkpoint" in out  # the save after update 2 completed
    skeleton = read_skeleton(save_dir / "checkpoint_last.pt")
    assert skeleton["moe_sharded"]["folder"].startswith(f"{SHARD_ROOT}/u2-")
    partial = [f for f in (save_dir / SHARD_ROOT).iterdir() if f.name.startswith("u4-")]
    assert len(partial) == 1 and not (partial[0] / ".metadata").exists()
    with pytest.raises(ShardedCheckpointError, match="the save that wrote it did not finish"):
        check_folder(partial[0])
    updates, _ = train(toy_data, save_dir, 2, "--moe-expert-parallel-size", 2, *SHARDED,
                       "--max-update", 4)  # fmt: skip
    assert sorted(updates) == [3, 4]  # resumed after update 2
    assert not partial[0].exists()  # the next save removed it


@pytest.mark.slow
@pytest.mark.distributed
def test_fairseq_rotation_keeps_exactly_the_folders_its_checkpoints_name(toy_data, tmp_path):
    save_dir = tmp_path / "rotation"
    _, _, out = train(toy_data, save_dir, 2, "--moe-expert-parallel-size", 2, *SHARDED,
                      "--max-epoch", 2, "--save-interval-updates", 3, "--keep-interval-updates", 1,
                      "--keep-last-epochs", 1, "--keep-best-checkpoints", 1, output=True)  # fmt: skip
    saves = out.count("Finished saving checkpoint")
    files = sorted(p.name for p in save_dir.glob("*.pt"))
    folders = sorted((save_dir / SHARD_ROOT).iterdir())
    assert saves > len(folders) >= 2  # rotation deleted some, their folders went with them
    assert set(folders) == referenced_folders(save_dir)  # no folder left that no file names
    assert "checkpoint2.pt" in files and "checkpoint1.pt" not in files
    for name in files:  # every remaining checkpoint loads
        state = read_shards(save_dir / name, read_skeleton(save_dir / name), layout=(0, 1))
        assert state["model"]["encoder.layers.0.moe.experts.fc1_weight"].shape[0] == E


@pytest.mark.slow
@pytest.mark.distributed
def test_the_save_benchmark_measures_both_formats(tmp_path):
    import json

    from fairseq_moe_cli import benchmark_checkpoint

    out = tmp_path / "bench.json"
    assert benchmark_checkpoint.main(["--worlds", "2", "--experts", "4", "--expert-ffn-dim", "64",
                                      "--embed-dim", "32", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["format"]) for r in rows] == [(2, "consolidated"), (2, "sharded")]
    for row in rows:
        assert row["model_and_adam_mib"] > row["rank0_share_mib"] > 0
        assert row["save_seconds"] > 0 and row["disk_mib"] > 0
        assert row["rank0_save_peak_extra_mib"] is not None
