"""Sharded checkpoints (``--moe-checkpoint-format sharded``): what a save writes, and how a load
reshards.

On disk, a sharded checkpoint is two things:

- the file fairseq names (``checkpoint_last.pt``, ``checkpoint3.pt``, ``checkpoint_best.pt``,
  ...): fairseq's checkpoint state with every tensor replaced by a marker (the *skeleton*,
  ``checkpoint_layout.py``): the config, ``extra_state`` (iterator position, meters, best
  score), the optimizer history and its non-tensor state, and ``moe_sharded``, which names the
  shard folder. It is small, and weights-only ``torch.load`` reads it;
- the shard folder, ``checkpoint_shards/u<updates>-<id>/`` beside it: a DCP checkpoint
  (``dcp_storage.py``) in which every process wrote the experts it holds and their optimizer
  state, and each replicated (dense) tensor was written once.

**Saving** (``save_shards``, every process, inside fairseq's ``Trainer.state_dict``) writes a new
shard folder, then fairseq's rank 0 writes the skeleton through fairseq's atomic
``torch_persistent_save`` (a temporary file, then a rename). The skeleton is written only once
every process's shards and DCP's ``.metadata`` are on disk, so a crash at any moment of a save
leaves the previous skeleton, and the folder it names, as they were: the previous checkpoint
still loads. fairseq's copies (``checkpoint_best.pt``, ``checkpoint<epoch>.pt``) copy the small
skeleton and share the folder; after fairseq's rotation (``--keep-last-epochs``,
``--keep-best-checkpoints``, ``--keep-interval-updates``) deletes skeletons,
``remove_unreferenced_folders`` deletes the folders no skeleton in the save directory names
(and those of saves that crashed).

**Loading** (``read_shards``) reshards: a process reads the dense tensors and the rows of every
expert stack that its layout holds (``rows_for``: E/P experts at P > 1, all of them on one
process or at P = 1), whatever the W and P that saved them, optimizer state included, and
returns fairseq's ordinary state; fairseq then loads it as it loads any checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint_fields import saved_option
from ..modules.expert_parallel import active_expert_parallel_groups, expert_parallel_groups
from .checkpoint_layout import assemble_state, expert_rows, split_state
from .dcp_storage import ShardedCheckpointError, check_folder, load_into, save_folder

logger = logging.getLogger(__name__)

SHARD_ROOT = "checkpoint_shards"
FORMAT_KEY = "moe_sharded"
FORMAT_VERSION = 1


def is_sharded(state) -> bool:
    """Whether a loaded checkpoint state is a sharded checkpoint's skeleton."""
    return isinstance(state, dict) and FORMAT_KEY in state


def read_skeleton(path) -> dict:
    """The checkpoint file ``path`` as ``torch.load`` (weights-only) reads it, memory-mapped so
    that a large consolidated file costs nothing to look at."""
    from .. import checkpoint_safety

    checkpoint_safety.allow_fairseq_checkpoint_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def shard_folder(path, skeleton: dict) -> Path:
    """The shard folder a skeleton read from ``path`` names (relative to the file's folder)."""
    return Path(path).resolve().parent / skeleton[FORMAT_KEY]["folder"]


def _new_folder_name(updates: int) -> str:
    """``u<updates>-<id>``, the same on every process (rank 0 draws the id)."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return f"u{updates}-{token[0]}"


def save_shards(state: dict, model, param_names: list[str], save_dir, updates: int) -> dict:
    """Write ``state``'s tensors (fairseq's checkpoint state, expert stacks holding this
    process's rows of ``model``'s experts) into a new shard folder under ``save_dir``; a
    collective. Returns the skeleton, which names the folder."""
    return write_shards(state, expert_rows(model), param_names, save_dir, updates)


def write_shards(state: dict, rows, param_names: list[str], save_dir, updates: int) -> dict:
    """``save_shards`` with the expert rows given (``checkpoint_layout.expert_rows``)."""
    skeleton, tensors = split_state(state, rows, param_names)
    name = f"{SHARD_ROOT}/{_new_folder_name(updates)}"
    folder = Path(save_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_folder(folder, tensors)
    groups = active_expert_parallel_groups()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    skeleton[FORMAT_KEY] = {
        "version": FORMAT_VERSION,
        "folder": name,
        "param_names": list(param_names),
        "world_size": world,
        "expert_parallel_size": 1 if groups is None else groups.size,
    }
    return skeleton


def _model_option(skeleton: dict, name: str, default, arg_overrides: dict | None = None):
    """A model option of the checkpoint's config (after ``arg_overrides``)."""
    if arg_overrides and name in arg_overrides:
        return arg_overrides[name]
    return saved_option(skeleton, "model", name, default)


def process_layout(skeleton: dict, arg_overrides: dict | None = None) -> tuple[int, int]:
    """(rank in its expert-parallel group, P) of this process for loading ``skeleton``: the
    layout built in this process (training builds it with the model), else, in a distributed
    process, the checkpoint's ``--moe-expert-parallel-size`` (or its override), else (one
    process) (0, 1): every expert."""
    groups = active_expert_parallel_groups()
    if groups is None and dist.is_available() and dist.is_initialized():
        size = int(_model_option(skeleton, "moe_expert_parallel_size", 1, arg_overrides))
        groups = expert_parallel_groups(size)
    return (0, 1) if groups is None else (groups.rank, groups.size)


def open_folder(path, skeleton: dict):
    """(shard folder, its checked DCP metadata) of the sharded checkpoint ``path``; errors name
    ``path`` and what is wrong."""
    folder = shard_folder(path, skeleton)
    if not folder.is_dir():
        raise ShardedCheckpointError(
            f"{path} is a sharded checkpoint whose shard folder {folder} does not exist (copy "
            "the folder with the file, or make one file with fairseq-moe-consolidate)"
        )
    try:
        return folder, check_folder(folder)
    except ShardedCheckpointError as err:
        raise ShardedCheckpointError(f"{path}: {err}") from err


def read_shards(path, skeleton: dict, layout: tuple[int, int] | None = None) -> dict:
    """Fairseq's checkpoint state of the sharded checkpoint ``path`` (whose skeleton is given),
    with this process's rows of every expert stack (``layout``: (rank, P); default
    ``process_layout``) and every dense tensor. Raises ShardedCheckpointError naming the file
    and the problem."""
    info = skeleton[FORMAT_KEY]
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise ShardedCheckpointError(
            f"{path}: sharded checkpoint format {info.get('version')} is newer than this "
            f"plugin's ({FORMAT_VERSION})"
        )
    folder, metadata = open_folder(path, skeleton)
    rank, size = layout if layout is not None else process_layout(skeleton)
    configured = int(_model_option(skeleton, "moe_expert_count", 0))

    def rows_for(num_experts: int) -> tuple[int, int]:
        if configured and num_experts != configured:
            raise ShardedCheckpointError(
                f"{path}: its MoE layers have {num_experts} experts, but the model is "
                f"configured with --moe-expert-count {configured} (an override?)"
            )
        if num_experts % size:
            raise ShardedCheckpointError(
                f"{path}: its MoE layers have {num_experts} experts, which "
                f"--moe-expert-parallel-size {size} does not divide"
            )
        local = num_experts // size
        return rank * local, local

    state, requests = assemble_state(skeleton, metadata, rows_for, folder)
    try:
        load_into(folder, requests, metadata)
    except ShardedCheckpointError as err:
        raise ShardedCheckpointError(f"{path}: {err}") from err
    state.pop(FORMAT_KEY, None)
    return state


def referenced_folders(save_dir) -> set[Path]:
    """The shard folders that the checkpoint files in ``save_dir`` name."""
    found = set()
    for path in Path(save_dir).glob("*.pt"):
        try:
            skeleton = read_skeleton(path)
        except Exception:  # a file being written, or not a checkpoint: keep everything
            logger.warning(f"cannot read {path}; keeping every shard folder")
            return {p.resolve() for p in (Path(save_dir) / SHARD_ROOT).glob("*")}
        if is_sharded(skeleton):
            found.add(shard_folder(path, skeleton))
    return found


def remove_unreferenced_folders(save_dir) -> list[Path]:
    """Delete the shard folders under ``save_dir`` that no checkpoint file there names (those of
    checkpoints fairseq's rotation deleted, and of saves that did not finish)."""
    root = Path(save_dir) / SHARD_ROOT
    if not root.is_dir():
        return []
    keep = referenced_folders(save_dir)
    removed = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder.resolve() not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        logger.info(f"removed {len(removed)} shard folder(s) no checkpoint names: {removed}")
    return removed
