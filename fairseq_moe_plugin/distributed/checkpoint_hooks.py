"""Sharded checkpoints in fairseq's own save and load paths (applied when the plugin is imported;
they act only on models trained with ``--moe-checkpoint-format sharded`` and on the files such a
model saved, so every other checkpoint is saved and loaded exactly as fairseq does).

- ``Trainer.state_dict`` (which fairseq calls on every process when a save needs them, see
  ``always_call_state_dict_during_save_checkpoint``): the state is taken with each process's own
  expert rows (no gather), its tensors go into a new shard folder, every process writing its own
  (``sharded_checkpoint.save_shards``), and the skeleton that names the folder is returned:
  fairseq's rank 0 then writes it under fairseq's file names, atomically, and copies it.
- ``checkpoint_utils.save_checkpoint``: after fairseq's save and rotation, rank 0 deletes the
  shard folders no checkpoint file names any more.
- ``checkpoint_utils.load_checkpoint_to_cpu`` (the one loader of fairseq-train's resume,
  fairseq-generate, fairseq-interactive and the hub): a sharded file is read with the rows this
  process's layout holds (``sharded_checkpoint.read_shards``). It also records, in the training
  iterator's state of a checkpoint that lacks it, the world size the checkpoint was saved at
  (``iterator_position.py``).
- ``Trainer.load_checkpoint``: a sharded file is compared with the model first (another model is
  an error naming the file and the tensor), and read by every process (fairseq's default reads
  it on rank 0 and broadcasts it; each process needs its own rows), with the rows of the
  trainer's model's layout.
"""

from __future__ import annotations

import contextvars
import functools
from pathlib import Path

import torch

from ..modules.expert_parallel import local_expert_state
from .checkpoint_layout import MARKER, expert_rows, is_marker
from .dcp_storage import ShardedCheckpointError, tensor_spec
from .iterator_position import note_saved_world_size
from .sharded_checkpoint import (
    is_sharded,
    open_folder,
    process_layout,
    read_shards,
    read_skeleton,
    remove_unreferenced_folders,
    save_shards,
)

CHECKPOINT_FORMATS = ("consolidated", "sharded")
# The model's layout while ``Trainer.load_checkpoint`` runs: the rows its processes read.
_LOADING_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("moe_loading_layout", default=None)


def model_layout(model) -> tuple[int, int]:
    """(rank in the expert-parallel group, P) of the experts ``model`` holds; (0, 1) for all."""
    for layout in expert_rows(model).values():
        if layout.count:
            return layout.first // layout.count, layout.total // layout.count
    return 0, 1


def writes_sharded_checkpoints(trainer) -> bool:
    """Whether ``trainer``'s model was configured with ``--moe-checkpoint-format sharded``."""
    model_cfg = getattr(trainer.cfg, "model", None)
    return str(getattr(model_cfg, "moe_checkpoint_format", "consolidated")) == "sharded"


def trained_parameter_names(trainer) -> list[str]:
    """The names of the optimizer's parameters in its order: fairseq's trainer builds it from
    the model's and then the criterion's parameters that require a gradient."""
    names = [n for n, p in trainer.get_model().named_parameters() if p.requires_grad]
    criterion = trainer.get_criterion()
    names += [f"criterion.{n}" for n, p in criterion.named_parameters() if p.requires_grad]
    return names


def sharded_skeleton(path) -> dict | None:
    """The skeleton of the sharded checkpoint ``path``; None when ``path`` is not a file or not
    a sharded checkpoint."""
    if not Path(path).is_file():
        return None
    try:
        skeleton = read_skeleton(path)
    except Exception:
        return None  # fairseq's own loader reports what is wrong with it
    return skeleton if is_sharded(skeleton) else None


def check_same_model(path, skeleton: dict, model: torch.nn.Module) -> None:
    """Raise ShardedCheckpointError naming ``path`` and the first differences when the sharded
    checkpoint's model state does not match ``model``'s (names, shapes, number of experts)."""
    saved = skeleton.get("model") or {}
    with local_expert_state():
        here = model.state_dict(keep_vars=True)
    rows = expert_rows(model)
    missing = sorted(set(here) - set(saved))
    unexpected = sorted(set(saved) - set(here))
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} of this model's tensors ({', '.join(missing[:3])}"
                        + (", ..." if len(missing) > 3 else "") + ")")  # fmt: skip
    if unexpected:
        problems.append(f"it has {len(unexpected)} tensors this model has not ("
                        + ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
                        + ")")  # fmt: skip
    metadata = None
    for name in sorted(set(here) & set(saved)):
        marker = saved[name]
        if not is_marker(marker):
            continue
        layout = rows.get(name)
        if bool(marker["experts"]) != (layout is not None):
            problems.append(f"{name} is {'an expert stack' if marker['experts'] else 'dense'} "
                            "there, not here")  # fmt: skip
            continue
        if layout is not None and int(marker["experts"]) != layout.total:
            problems.append(f"{name} holds {marker['experts']} experts there, {layout.total} in "
                            "this model (--moe-expert-count)")  # fmt: skip
            continue
        if metadata is None:
            metadata = open_folder(path, skeleton)[1]
        key = marker[MARKER] + ("/e0" if layout is not None else "")
        try:
            size, _ = tensor_spec(metadata, key)
        except KeyError:
            problems.append(f"its shard folder lacks {key}")
            continue
        shape = tuple(here[name].shape[1:] if layout is not None else here[name].shape)
        if tuple(size) != shape:
            problems.append(f"{name} is {tuple(size)} there, {shape} here")
    if problems:
        raise ShardedCheckpointError(
            f"{path} is a checkpoint of another model: " + "; ".join(problems[:4])
        )


def _patched(method, replacement):
    replacement = functools.wraps(method)(replacement)
    replacement.__fairseq_moe_patched__ = True
    return replacement


def save_and_load_sharded_checkpoints_with_fairseq() -> None:
    """Apply the module doc to fairseq's trainer and checkpoint functions (idempotent)."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    if getattr(Trainer.state_dict, "__fairseq_moe_patched__", False):
        return
    state_dict = Trainer.state_dict
    load_checkpoint = Trainer.load_checkpoint
    always_call = Trainer.always_call_state_dict_during_save_checkpoint
    load_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
    save_checkpoint = checkpoint_utils.save_checkpoint

    def new_state_dict(self):
        if not writes_sharded_checkpoints(self):
            return state_dict(self)
        with local_expert_state():
            state = state_dict(self)
        return save_shards(state, self.get_model(), trained_parameter_names(self),
                           self.cfg.checkpoint.save_dir, self.get_num_updates())  # fmt: skip

    def new_load_checkpoint(self, filename, *args, **kwargs):
        skeleton = sharded_skeleton(filename)
        if skeleton is None:
            return load_checkpoint(self, filename, *args, **kwargs)
        check_same_model(filename, skeleton, self.get_model())
        checkpoint_cfg = self.cfg.checkpoint
        previous = checkpoint_cfg.load_checkpoint_on_all_dp_ranks
        checkpoint_cfg.load_checkpoint_on_all_dp_ranks = True  # every process reads its rows
        token = _LOADING_LAYOUT.set(model_layout(self.get_model()))
        try:
            return load_checkpoint(self, filename, *args, **kwargs)
        finally:
            _LOADING_LAYOUT.reset(token)
            checkpoint_cfg.load_checkpoint_on_all_dp_ranks = previous

    def new_load_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        state = load_to_cpu(path, arg_overrides, load_on_all_ranks)
        if is_sharded(state):  # the trainer's model's rows, else the layout to build
            layout = _LOADING_LAYOUT.get() or process_layout(state, arg_overrides)
            state = read_shards(path, state, layout)
        note_saved_world_size(state)
        return state

    def new_save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        saved = save_checkpoint(cfg, trainer, epoch_itr, val_loss)
        if writes_sharded_checkpoints(trainer) and trainer.is_data_parallel_master:
            if not cfg.no_save:
                remove_unreferenced_folders(cfg.save_dir)
        return saved

    Trainer.state_dict = _patched(state_dict, new_state_dict)
    Trainer.load_checkpoint = _patched(load_checkpoint, new_load_checkpoint)

    def new_always_call(self):
        return always_call.fget(self) or writes_sharded_checkpoints(self)

    new_always_call.__fairseq_moe_patched__ = True
    Trainer.always_call_state_dict_during_save_checkpoint = property(new_always_call)
    checkpoint_utils.load_checkpoint_to_cpu = _patched(load_to_cpu, new_load_to_cpu)
    checkpoint_utils.save_checkpoint = _patched(save_checkpoint, new_save_checkpoint)
