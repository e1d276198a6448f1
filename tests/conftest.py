"""Shared fixtures: a toy parallel corpus binarised with fairseq-preprocess, tiny-model args,
seeding. Everything is generated here; nothing is downloaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "fairseq_moe_plugin"
# Helper modules (on pytest's pythonpath) and the scripts the tests run under torchrun.
HELPERS = REPO / "tests" / "helpers"
BIN = Path(sys.executable).parent  # the venv's console scripts (fairseq-train, ...)

import fairseq_moe_plugin  # noqa: E402,F401  (registers models/criteria before fairseq parses)


def run_cli(args, cwd, log_name=None, timeout=900, expect_fail=False):
    """Run a command, fail the test with its output if it fails (``expect_fail``: if it
    succeeds); return stdout+stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    if log_name:
        Path(cwd, log_name).write_text(out)
    if expect_fail and proc.returncode == 0:
        pytest.fail(f"command succeeded, expected a failure: {' '.join(map(str, args))}")
    if proc.returncode != 0 and not expect_fail:
        pytest.fail(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n{out[-4000:]}"
        )
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A toy src->tgt corpus (tests/helpers/toy_corpus.py) and its fairseq binarisation."""
    from toy_corpus import write_corpus

    root = tmp_path_factory.mktemp("toy")
    raw = root / "raw"
    write_corpus(str(raw), n_train=2000, n_valid=100, n_test=100)
    run_cli(
        [
            BIN / "fairseq-preprocess",
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            raw / "train",
            "--validpref",
            raw / "valid",
            "--testpref",
            raw / "test",
            "--destdir",
            root / "bin",
            "--joined-dictionary",
            "--workers",
            "1",
        ],
        cwd=root,
    )
    return {"root": root, "raw": raw, "bin": root / "bin"}


def tiny_args(data_bin, *extra, arch="moe_transformer_tiny"):
    """Parse fairseq training args for a tiny model on ``data_bin``."""
    from fairseq import options

    parser = options.get_training_parser()
    argv = [
        str(data_bin),
        "--user-dir",
        str(PLUGIN_DIR),
        "--arch",
        arch,
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--dropout",
        "0.0",
        *[str(e) for e in extra],
    ]
    return options.parse_args_and_arch(parser, input_args=argv)


def build_model_and_task(args):
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return model, task, cfg


def toy_batch(task, split="valid", n=8):
    """A real collated batch of ``n`` sentences (with padding) from ``split``."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(n)])


def save_trainer_style_checkpoint(model, cfg, path):
    """Write what fairseq's ``Trainer.state_dict()`` writes (cfg as plain containers, the model's
    Namespace inside), so ``checkpoint_utils`` loads it like a trained checkpoint."""
    from omegaconf import OmegaConf

    history = {
        "criterion_name": "LabelSmoothedCrossEntropyMoECriterion",
        "optimizer_name": "Adam",
        "lr_scheduler_state": {},
        "num_updates": 0,
    }
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "extra_state": {},
        "optimizer_history": [history],
    }
    torch.save(state, path)  # fmt: skip


@pytest.fixture(scope="module")
def dense_checkpoint(toy_data, tmp_path_factory):
    """A dense ``transformer_tiny`` (FFN 128) saved as a trained checkpoint, and the model."""
    torch.manual_seed(3)
    ffn = ["--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim", 128]
    model, _, cfg = build_model_and_task(tiny_args(toy_data["bin"], *ffn, arch="transformer_tiny"))
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path, model
