"""Loading checkpoints for inference: fairseq's loader, plus encrypted files and clear errors.

``read_checkpoint_state`` is ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (weights-only
``torch.load`` with the plugin's allow-list, ``arg_overrides``, fairseq's state upgrade) that also
reads checkpoints encrypted with ``deploy/encryption.py``: those are decrypted in memory, never
written in plain text to disk. ``load_model_ensemble_and_task`` builds the model from that state
with fairseq's own function. The plugin's tools (``fairseq-moe-serve``, ``-export-onnx``,
``-quantize``) load through here; fairseq's own commands (``fairseq-generate``, the hub) read plain
checkpoints, including the int8 ones ``fairseq-moe-quantize`` writes.

What this adds to fairseq's loader: decryption, and errors that name the file (missing, not a
checkpoint, encrypted without a key, a key for a plain file) instead of a pickle traceback. A
sharded checkpoint (``--moe-checkpoint-format sharded``) is read from its shard folder, as
fairseq's loader reads it with the plugin imported.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from . import checkpoint_safety
from .checkpoint_fields import CheckpointError, saved_option
from .deploy.encryption import DecryptionError, decrypt_file_bytes, is_encrypted
from .distributed.sharded_checkpoint import is_sharded, process_layout, read_shards


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")


def _finish_state(state: dict, arg_overrides: dict[str, Any] | None) -> dict:
    """What ``load_checkpoint_to_cpu`` does after ``torch.load``: apply the overrides to the
    saved args or config, and upgrade the state to the current fairseq layout."""
    from fairseq.checkpoint_utils import _upgrade_state_dict
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    if state.get("args") is not None and arg_overrides:
        for name, value in arg_overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    return _upgrade_state_dict(state)


def read_checkpoint_state(
    path: str | os.PathLike,
    key_file: str | os.PathLike | None = None,
    arg_overrides: dict[str, Any] | None = None,
) -> dict:
    """The checkpoint's state dict (``model``, ``cfg``/``args``, ...), as fairseq loads it.

    An encrypted file needs ``key_file``; a plain file with a ``key_file`` is refused (the
    caller expected an encrypted one: better to say so than to serve an unprotected model
    silently). Raises CheckpointError (or DecryptionError, a ValueError too) naming the file.
    """
    path = Path(path)
    _check_file(path)
    encrypted = is_encrypted(path)
    if encrypted and key_file is None:
        raise CheckpointError(
            f"{path} is an encrypted checkpoint: give its key file (--decrypt-key-file)"
        )
    if not encrypted and key_file is not None:
        raise CheckpointError(
            f"a key file was given but {path} is not encrypted (a plain checkpoint needs none)"
        )
    checkpoint_safety.allow_fairseq_checkpoint_globals()
    if encrypted:
        source = io.BytesIO(decrypt_file_bytes(path, key_file))
    else:
        source = open(path, "rb")  # noqa: SIM115  (closed below)
    try:
        with warnings.catch_warnings():  # torch's own notice when it rebuilds int8 tensors
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            state = torch.load(source, map_location=torch.device("cpu"), weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it, keep torch's reason
        raise CheckpointError(
            f"cannot read {path} as a fairseq checkpoint: {type(e).__name__}: {e}"
        ) from e
    finally:
        source.close()
    if is_sharded(state):  # the experts this process holds, from the shard folder
        state = read_shards(path, state, process_layout(state, arg_overrides))
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a fairseq checkpoint (it has no 'model' entry)")
    if state.get("cfg") is None and state.get("args") is None:
        raise CheckpointError(f"{path} is not a fairseq checkpoint (it has no 'cfg' or 'args')")
    return _finish_state(state, arg_overrides)


def load_model_ensemble_and_task(
    path: str | os.PathLike,
    key_file: str | os.PathLike | None = None,
    arg_overrides: dict[str, Any] | None = None,
    task=None,
    strict: bool = True,
):
    """``(models, cfg, task)`` of one checkpoint, with fairseq's own
    ``checkpoint_utils.load_model_ensemble_and_task`` on ``read_checkpoint_state``'s state."""
    from fairseq import checkpoint_utils

    state = read_checkpoint_state(path, key_file, arg_overrides)
    try:
        return checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides=arg_overrides, task=task, strict=strict, state=state
        )
    except FileNotFoundError as e:  # the task's dictionaries live in its data folder
        data = saved_option(state, "task", "data")
        raise CheckpointError(
            f"{path}: its task needs {e.filename}, which does not exist (the task's data "
            f"folder, saved as {data!r}, holds the dictionaries): give the folder that has "
            "them (--data)"
        ) from e


__all__ = [
    "CheckpointError",
    "saved_option",
    "DecryptionError",
    "load_model_ensemble_and_task",
    "read_checkpoint_state",
]
