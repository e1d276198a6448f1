"""fairseq-train runs of a tiny MoE model on the toy corpus, with one process or several under
torchrun (gloo, CPU), and the comparisons the expert-parallel and checkpoint tests make of them:
the same logged updates, the same weights and Adam state (either checkpoint format)."""

from __future__ import annotations

import shutil

import pytest
import torch

E = 8
TRAIN = ["--arch", "moe_transformer_tiny", "--encoder-moe-freq", 1, "--decoder-moe-freq", 1,
         "--moe-expert-count", E, "--moe-top-k", 2, "--moe-capacity-factor", 0, "--dropout", 0,
         "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", 0.1,
         "--optimizer", "adam", "--adam-eps", 1e-6, "--lr", 0.002, "--clip-norm", 0.5, "--max-tokens", 1000,
         "--cpu", "--distributed-backend", "gloo", "--num-workers", 0, "--seed", 7,
         "--log-format", "json", "--log-interval", 1,
         "--moe-monitor-interval", 2, "--moe-monitor-high-load", 1.0001]  # fmt: skip
# What a logged update must agree on: the loss, the gradient norm, every routing metric.
COMPARED = ("loss", "nll_loss", "gnorm")


def train(toy_data, save_dir, world, *flags, output=False):
    """fairseq-train with ``world`` processes (torchrun above 1); its train_inner records and
    routing warnings, by update (and its whole output with ``output``)."""
    from conftest import BIN, PLUGIN_DIR, run_cli
    from distributed_helpers import _free_port

    from fairseq_moe_plugin.analysis.training_log import TRAIN_INNER, parse_line

    launcher = [] if world == 1 else [BIN / "torchrun", "--nproc-per-node", world,
                                       "--master-port", _free_port()]  # fmt: skip
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    out = run_cli([*launcher, BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR,
                   *TRAIN, "--save-dir", save_dir, *flags], cwd=save_dir.parent)  # fmt: skip
    updates = {}
    for line in out.splitlines():
        parsed = parse_line(line)
        if parsed is not None and parsed[0] == TRAIN_INNER:
            updates[int(parsed[1]["num_updates"])] = parsed[1]
    # The training windows' warnings (global loads); a validation's also count the batch fairseq
    # repeats to pad a worker's share, so they are not compared.
    warnings = [line.split(" | ")[-1] for line in out.splitlines()
                if "MoE routing imbalance" in line and "(train, updates" in line]  # fmt: skip
    return (updates, warnings, out) if output else (updates, warnings)


def assert_same_updates(got, expected, updates):
    for u in updates:
        keys = [k for k in expected[u] if k in COMPARED or k.startswith("moe_")]
        assert len(keys) > 20, keys
        for key in keys:
            assert got[u][key] == pytest.approx(expected[u][key], rel=1e-3, abs=2e-3), (u, key)


def full_state(path) -> dict:
    """A checkpoint's state with every expert, whichever its format."""
    from fairseq_moe_plugin.distributed.sharded_checkpoint import (
        is_sharded,
        read_shards,
        read_skeleton,
    )

    state = read_skeleton(path)
    return read_shards(path, state, layout=(0, 1)) if is_sharded(state) else state


def assert_same_checkpoints(a_path, b_path):
    """Same weights and the same Adam state. Adam's moments are compared tightly: they carry the
    gradients' scale, which Adam's update does not (m / sqrt(v) is scale-free). The weights are
    compared to a quarter of one Adam step (lr 0.002): where a gradient is near zero, m / sqrt(v)
    turns its float rounding (1e-7 relative, from summing the workers in another order) into
    a visible share of a step; a wrong expert, a lost update or a wrong sign moves a weight by
    whole steps."""
    a, b = full_state(a_path), full_state(b_path)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=5e-4, msg=key)
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for key, value in sa[index].items():
            torch.testing.assert_close(value, sb[index][key], rtol=1e-3, atol=1e-6)


def copy_checkpoint(checkpoint, save_dir, name: str = "checkpoint_last.pt"):
    """Copy a checkpoint into ``save_dir`` as ``name``, its shard folder too (sharded)."""
    from pathlib import Path

    from fairseq_moe_plugin.distributed.sharded_checkpoint import (
        is_sharded,
        read_skeleton,
        shard_folder,
    )

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    skeleton = read_skeleton(checkpoint)
    if is_sharded(skeleton):
        folder = shard_folder(checkpoint, skeleton)
        target = save_dir / skeleton["moe_sharded"]["folder"]
        if not target.exists():
            shutil.copytree(folder, target)
    shutil.copy(checkpoint, save_dir / name)
    return save_dir / name
