"""Sparse upcycling: start an MoE model from a dense fairseq checkpoint.

Komatsuzaki et al. (2023), "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints": every non-FFN weight is copied; the dense FFN of each layer that becomes MoE is
copied into every expert (optionally with small noise, so that experts can diverge); the router
starts at zero or at its usual random init. With top-1 routing whose weight is 1
(``--moe-normalize-top-k``) and no noise, the upcycled model computes what the dense one did.

Sources: a dense ``transformer`` checkpoint (for ``moe_transformer``, or its encoder for
``moe_roberta``) or a RoBERTa-style ``roberta`` checkpoint (for ``moe_roberta``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EXPERT_SOURCES = {  # MoE parameter suffix -> the dense FFN parameter it is copied from
    "moe.experts.fc1_weight": "fc1.weight",
    "moe.experts.fc1_bias": "fc1.bias",
    "moe.experts.fc2_weight": "fc2.weight",
    "moe.experts.fc2_bias": "fc2.bias",
}
ROUTER = "moe.gate.wg.weight"
# Parameters a dense source may lack: new heads, and an LM head when the source is a translation
# encoder.
MAY_BE_NEW = re.compile(r"^(classification_heads\.|encoder\.lm_head\.)|\.version$|_float_tensor$")


def load_dense_state(path) -> dict[str, torch.Tensor]:
    """The model weights of a fairseq checkpoint (weights-only loading, plugin allow-list)."""
    from fairseq import checkpoint_utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--moe-init-from-dense: checkpoint {path} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    if "model" not in state:
        raise ValueError(f"--moe-init-from-dense: {path} has no 'model' weights")
    return state["model"]


def _source_candidates(name: str) -> list[str]:
    """Names the dense checkpoint may use for the target parameter ``name``."""
    names = [name]
    if name.startswith("encoder.sentence_encoder."):  # moe_roberta from a translation encoder
        names.append("encoder." + name[len("encoder.sentence_encoder.") :])
    return names


def _find(dense: dict, name: str):
    for candidate in _source_candidates(name):
        if candidate in dense:
            return candidate
    return None


def upcycle(model: torch.nn.Module, dense: dict, noise: float = 0.0, router_init: str = "random",
            source: str = "the dense checkpoint") -> dict:  # fmt: skip
    """Copy ``dense`` into ``model`` as described above; returns what was copied and skipped.

    Raises ValueError naming the parameter when a needed weight is missing or has another
    shape."""
    if noise < 0:
        raise ValueError(f"--moe-upcycle-noise must be >= 0, got {noise}")
    if router_init not in ("zero", "random"):
        raise ValueError(f"--moe-upcycle-router-init must be zero or random, got {router_init!r}")
    used, copied, experts, new = set(), 0, 0, []
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, target in params.items():
            if name.endswith(ROUTER):
                if router_init == "zero":
                    target.zero_()
                continue
            suffix = next((s for s in EXPERT_SOURCES if name.endswith(s)), None)
            if suffix is not None:
                dense_name = _find(dense, name[: -len(suffix)] + EXPERT_SOURCES[suffix])
                if dense_name is None:
                    raise ValueError(
                        f"{source} has no dense FFN weight for {name} (looked for "
                        f"{name[: -len(suffix)] + EXPERT_SOURCES[suffix]})"
                    )
                weight = dense[dense_name].to(target.dtype)
                _check_shape(name, tuple(target.shape[1:]), dense_name, weight, source)
                target.copy_(weight.unsqueeze(0).expand_as(target))
                if noise > 0 and suffix.endswith("weight"):
                    stack = model.get_submodule(name[: -len(suffix)] + "moe.experts")
                    stack.add_noise_(suffix.rsplit(".", 1)[1], noise * float(weight.float().std()))
                used.add(dense_name)
                experts += 1
                continue
            dense_name = _find(dense, name)
            if dense_name is None:
                if MAY_BE_NEW.search(name):
                    new.append(name)
                    continue
                raise ValueError(f"{source} has no weight for {name}")
            _check_shape(name, tuple(target.shape), dense_name, dense[dense_name], source)
            target.copy_(dense[dense_name].to(target.dtype))
            used.add(dense_name)
            copied += 1
    unused = sorted(set(dense) - used)
    logger.info(
        f"upcycled from {source}: {copied} tensors copied, {experts} expert tensors from dense "
        f"FFNs, router {router_init}, noise {noise:g}; kept new: {new or 'none'}; "
        f"unused from the checkpoint: {len(unused)}"
    )
    return {"copied": copied, "experts": experts, "new": new, "unused": unused}


def _check_shape(name, shape, dense_name, weight, source) -> None:
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(
            f"{source}: {dense_name} has shape {tuple(weight.shape)} but {name} needs "
            f"{tuple(shape)} (do the model sizes match the dense checkpoint's?)"
        )


def maybe_upcycle(model: torch.nn.Module, args) -> None:
    """Upcycle ``model`` when ``--moe-init-from-dense`` is set, then clear the flag in ``args``
    (which fairseq saves in the checkpoint), so that loading the trained MoE model later does
    not read the dense checkpoint again; ``moe_upcycled_from`` keeps its path."""
    path = getattr(args, "moe_init_from_dense", None)
    if not path:
        return
    upcycle(
        model,
        load_dense_state(path),
        noise=float(getattr(args, "moe_upcycle_noise", 0.0) or 0.0),
        router_init=str(getattr(args, "moe_upcycle_router_init", "random")),
        source=str(path),
    )
    args.moe_upcycled_from = str(path)
    args.moe_init_from_dense = None
