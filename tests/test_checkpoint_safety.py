"""Checkpoints load with torch's weights-only unpickler: fairseq's globals are allow-listed, code
in a crafted pickle is refused and never runs."""

import argparse
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from unsafe_pickle import RunsCode

from fairseq_moe_plugin.checkpoint_safety import SAFE_GLOBALS


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"args": None, "cfg": RunsCode(marker), "model": {}}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists(), "loading the checkpoint ran code"


def test_eval_bleu_style_checkpoint_loads(tmp_path):
    """--eval-bleu checkpoints carry numpy scalars/arrays and the Namespace config."""
    path = tmp_path / "ok.pt"
    state = {
        "args": None,
        "cfg": {"model": argparse.Namespace(arch="moe_transformer_tiny", moe_expert_count=4)},
        "model": {"w": torch.ones(2)},
        "optimizer_history": [
            {
                "criterion_name": "x",
                "optimizer_name": "y",
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "extra_state": {
            "best": np.float64(12.5),
            "bleu_counts": np.array([1, 2, 3]),
            "lens": np.array([0.5], dtype=np.float32),
        },
    }
    torch.save(state, path)
    loaded = torch.load(path)  # weights_only=True is torch's default
    assert loaded["cfg"]["model"].moe_expert_count == 4
    assert loaded["extra_state"]["best"] == 12.5
    assert loaded["extra_state"]["bleu_counts"].tolist() == [1, 2, 3]


def test_without_the_plugin_such_a_checkpoint_is_refused(tmp_path):
    """Control: it is the plugin's allow-list that makes the previous load work."""
    path = tmp_path / "ok.pt"
    torch.save({"cfg": argparse.Namespace(a=1), "best": np.float64(1.0)}, path)
    code = f"import torch; torch.load({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "Namespace" in proc.stderr


def test_allow_list_holds_no_callable_that_runs_code():
    names = {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', g)}" for g in SAFE_GLOBALS
    }
    assert "argparse.Namespace" in names
    for bad in ("os.", "posix.", "subprocess.", "builtins.eval", "builtins.exec"):
        assert not any(n.startswith(bad) for n in names), names


def test_importing_the_plugin_never_turns_weights_only_loading_off(tmp_path):
    """Whatever importing the plugin does (allow-list, fairseq fixes), a crafted checkpoint is
    still refused in a process that imported it, by torch.load and by fairseq's loader, and its
    code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"args": None, "cfg": RunsCode(marker), "model": {}}, path)
    code = f"""
import pickle, torch
import fairseq_moe_plugin
from fairseq import checkpoint_utils
for load in (torch.load, checkpoint_utils.load_checkpoint_to_cpu):
    try:
        load({str(path)!r})
    except pickle.UnpicklingError as err:
        assert "system" in str(err), err
    else:
        raise SystemExit(f"{{load.__name__}} loaded a crafted checkpoint")
print("refused twice")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "refused twice" in proc.stdout, proc.stderr[-2000:]
    assert not marker.exists(), "loading the checkpoint ran code"
