"""Adapter-only checkpoints (``--moe-save-trainable-only``): a frozen-base model's state dict
holds what was trained (routers, experts or LoRA deltas, trained heads) and its buffers (the
usage EMA, fairseq's version markers), and refers to the dense checkpoint the frozen rest came
from by path and sha256, both kept in the model config that fairseq saves with it
(``moe_base_checkpoint``, ``moe_base_sha256``).

Loading (``load_state_dict``, which fairseq-train's ``--restore-file``, fairseq-generate and the
hub interface all go through) completes the state dict from that base checkpoint, mapped onto
the model's names as upcycling maps it (``upcycle.dense_tensor``), after checking its sha256: a
base that differs from the one the adapters were trained on is refused. Where the base moved,
``--moe-base-checkpoint`` (at inference ``--model-overrides "{'moe_base_checkpoint': PATH}"``)
says where it is now.

What this adds to fairseq: fairseq's checkpoints always hold every weight; PEFT's adapter files
record the base model's name, not a hash of its weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .provenance import record_base, sha256_file
from .upcycle import dense_tensor, load_dense_state

__all__ = ["AdapterCheckpointMixin", "complete_from_base", "record_base", "sha256_file",
           "trim_state_dict"]  # fmt: skip

logger = logging.getLogger(__name__)


def adapter_only(args) -> bool:
    return bool(getattr(args, "moe_save_trainable_only", False))


def trim_state_dict(model: nn.Module, state: dict) -> dict:
    """``state`` (the model's full state dict, unprefixed) less its frozen parameters that the
    base checkpoint provides: not the ones upcycling found new (``args.moe_base_new``, e.g. the
    LM head of a translation encoder) nor classification heads (registered after upcycling),
    which no base could give back. Logs the sizes of both, once per model."""
    new = set(getattr(getattr(model, "args", None), "moe_base_new", None) or [])
    frozen = {
        name
        for name, p in model.named_parameters(remove_duplicate=False)  # tied: every name
        if not p.requires_grad and name not in new and not name.startswith("classification_heads.")
    }
    kept = {name: value for name, value in state.items() if name not in frozen}
    if not getattr(model, "_moe_adapter_size_logged", False):
        model._moe_adapter_size_logged = True
        full, adapter = _bytes(state.values()), _bytes(kept.values())
        logger.info(
            f"adapter-only checkpoint: {len(kept)} of {len(state)} tensors, "
            f"{adapter / 2**20:.2f} MiB of weights instead of {full / 2**20:.2f} MiB "
            f"({100.0 * adapter / max(full, 1):.1f}%)"
        )
    return kept


def _bytes(tensors) -> int:
    """Bytes of the tensors, a tensor stored under several names (tied embeddings) once."""
    unique = {t.data_ptr(): t for t in tensors if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def complete_from_base(model: nn.Module, state: dict, args) -> dict:
    """``state`` with the model's missing frozen tensors taken from the base checkpoint (after
    checking its sha256). A state dict that lacks nothing is returned as it is."""
    full = model.state_dict(keep_vars=True)  # keep_vars: the untrimmed names and shapes
    missing = [name for name in full if name not in state]
    if not missing:
        return state
    path = getattr(args, "moe_base_checkpoint", None)
    expected = getattr(args, "moe_base_sha256", None)
    if not path or not expected:
        raise ValueError(
            f"this checkpoint holds adapters only (it lacks {len(missing)} tensors, e.g. "
            f"{missing[0]}) but records no base checkpoint to take them from"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"the base checkpoint of this adapter-only checkpoint, {path}, does not exist; pass "
            "where it is now with --moe-base-checkpoint (at inference: --model-overrides "
            "\"{'moe_base_checkpoint': 'PATH'}\")"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"base checkpoint {path} has sha256 {actual}, but the adapters were trained on a "
            f"base with sha256 {expected}: it is another model, and the adapters would not fit it"
        )
    dense = load_dense_state(path, flag="--moe-base-checkpoint")
    names = set(full)
    completed = dict(state)
    for name in missing:
        found = dense_tensor(dense, name, tuple(full[name].shape), names, str(path))
        if found is None:
            raise ValueError(
                f"the adapter-only checkpoint lacks {name}, which the base checkpoint {path} "
                "does not provide either"
            )
        completed[name] = found[0].clone()
    logger.info(f"loaded {len(missing)} frozen tensors from the base checkpoint {path}")
    return completed


class AdapterCheckpointMixin:
    """For the MoE models: ``state_dict`` drops the frozen parameters and ``load_state_dict``
    takes them back from the base checkpoint when ``--moe-save-trainable-only`` is set. A call
    with ``keep_vars=True`` (the model's own tools, e.g. upcycling) sees every tensor."""

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix,
                                   keep_vars=keep_vars)  # fmt: skip
        if keep_vars or prefix or destination is not None or not adapter_only(self.args):
            return state
        return trim_state_dict(self, state)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if adapter_only(self.args):
            state_dict = complete_from_base(self, state_dict, self.args)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
