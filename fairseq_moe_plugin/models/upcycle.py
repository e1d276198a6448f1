"""Sparse upcycling: start an MoE model from a dense fairseq checkpoint.

Komatsuzaki et al. (2023), "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints": every non-FFN weight is copied; the dense FFN of each layer that becomes MoE is
copied into every expert (optionally with small noise, so that experts can diverge); the router
starts at zero or at its usual random init. With top-1 routing whose weight is 1
(``--moe-normalize-top-k``) and no noise, the upcycled model computes what the dense one did.

Parameter-efficient variants: with ``--moe-expert-placement parallel`` the dense FFN is copied to
the layer's own ``fc1``/``fc2`` and the experts beside it start as initialised (output projection
zero); with ``--moe-expert-type lora`` the dense FFN becomes the LoRA experts' shared frozen FFN
and the low-rank deltas start as initialised (B zero). Either way the model first computes what
the dense one did.

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
LORA_BASE_SOURCES = {  # LoRA experts' shared frozen FFN (``LoRAExperts``) -> the dense FFN
    "moe.experts.fc1.weight": "fc1.weight",
    "moe.experts.fc1.bias": "fc1.bias",
    "moe.experts.fc2.weight": "fc2.weight",
    "moe.experts.fc2.bias": "fc2.bias",
}
# The router (weights, bias, usage EMA, schedule count) starts as configured, never from dense.
ROUTER = re.compile(r"\.moe\.gate\.(wg\.weight|wg\.bias|usage_ema|routing_updates)$")
# Parameters a dense source may lack: new heads, an LM head when the source is a translation
# encoder, and LoRA deltas.
MAY_BE_NEW = re.compile(
    r"^(classification_heads\.|encoder\.lm_head\.)|\.version$|_float_tensor$|\.moe\.experts\.lora_"
)


def load_dense_state(path, flag: str = "--moe-init-from-dense") -> dict[str, torch.Tensor]:
    """The model weights of a fairseq checkpoint (weights-only loading, plugin allow-list)."""
    from fairseq import checkpoint_utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: checkpoint {path} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    if "model" not in state:
        raise ValueError(f"{flag}: {path} has no 'model' weights")
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


def dense_source(name: str, names: set[str]) -> tuple[str | None, bool]:
    """Where the model's tensor ``name`` comes from in a dense checkpoint: the dense name to
    look up (None: not from the dense model: a router, or stacked experts placed beside a
    dense FFN, which start as initialised) and whether it is copied into every expert.
    ``names``: all the model's state-dict names."""
    if ROUTER.search(name):
        return None, False
    for suffix, source in EXPERT_SOURCES.items():
        if name.endswith(suffix):
            layer = name[: -len(suffix)]
            if layer + "fc1.weight" in names:  # --moe-expert-placement parallel
                return None, False
            return layer + source, True
    for suffix, source in LORA_BASE_SOURCES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + source, False
    return name, False


def dense_tensor(dense: dict, name: str, shape, names: set[str], source: str):
    """The value the model's tensor ``name`` (of ``shape``) takes from ``dense`` (expanded over
    the experts for stacked expert weights), or None when it does not come from it. Raises
    ValueError naming the parameter when the weight is missing (and may not be new) or has
    another shape."""
    wanted, stacked = dense_source(name, names)
    if wanted is None:
        return None
    found = _find(dense, wanted)
    if found is None:
        if MAY_BE_NEW.search(name):
            return None
        what = "dense FFN weight" if wanted != name else "weight"
        raise ValueError(f"{source} has no {what} for {name} (looked for {wanted})")
    value = dense[found]
    _check_shape(name, tuple(shape[1:] if stacked else shape), found, value, source)
    return (value.unsqueeze(0).expand(shape) if stacked else value), found


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
    names = set(params)
    with torch.no_grad():
        for name, target in params.items():
            if name.endswith(".moe.gate.wg.weight") and router_init == "zero":
                target.zero_()
            found = dense_tensor(dense, name, tuple(target.shape), names, source)
            if found is None:
                if not ROUTER.search(name):
                    new.append(name)
                continue
            value, dense_name = found
            target.copy_(value.to(target.dtype))
            used.add(dense_name)
            suffix = next((s for s in EXPERT_SOURCES if name.endswith(s)), None)
            if suffix is None:
                copied += 1
                continue
            experts += 1
            if noise > 0 and suffix.endswith("weight"):
                stack = model.get_submodule(name[: -len(suffix)] + "moe.experts")
                std = noise * float(dense[dense_name].float().std())
                stack.add_noise_(suffix.rsplit(".", 1)[1], std)
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
    report = upcycle(
        model,
        load_dense_state(path),
        noise=float(getattr(args, "moe_upcycle_noise", 0.0) or 0.0),
        router_init=str(getattr(args, "moe_upcycle_router_init", "random")),
        source=str(path),
    )
    args.moe_upcycled_from = str(path)
    args.moe_init_from_dense = None
    # What the dense checkpoint did not provide (new heads, LoRA deltas, ...): an adapter-only
    # checkpoint keeps these even when frozen, as no base can give them back.
    args.moe_base_new = list(report["new"])
    if getattr(args, "moe_save_trainable_only", False):
        from .adapter_checkpoint import record_base

        record_base(args, path)


def prepare_moe_model(model: torch.nn.Module, args) -> None:
    """What both MoE models do once built: upcycle (``--moe-init-from-dense``), then freeze the
    base (``--moe-freeze-base``); an int8 checkpoint's model (``--moe-int8``, written by
    fairseq-moe-quantize) takes its int8 form, into which its state dict then loads."""
    maybe_upcycle(model, args)
    if getattr(args, "moe_freeze_base", False):
        from .frozen_base import freeze_base

        freeze_base(model, train_heads=bool(getattr(args, "moe_train_heads", False)))
    int8 = str(getattr(args, "moe_int8", "off") or "off")
    if int8 != "off":
        from .quantize import quantize_model_

        quantize_model_(model, compute=int8)
