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

Shared experts (``--moe-shared-experts N``, ``modules/shared_experts.py``) are copies of the
dense FFN too: their fc1 is the dense fc1 repeated N times (their N hidden layers side by side),
their fc2 the dense fc2 repeated N times. So that the upcycled model with
``--moe-normalize-top-k`` starts as the dense model, the routed and the shared part each give half
of the dense output: every routed copy's fc2 (weight and bias) is scaled by 1/2, the shared
experts' fc2 weight by 1/(2N) (summed over the N copies: 1/2) and its bias by 1/2; with the
shared-expert gate, which starts at zero (sigmoid(0) = 1/2), the shared fc2 by 1/N and its bias
by 1. Every factor depends on the tensor's own name and shape only, so an adapter-only checkpoint
(``adapter_checkpoint.py``) rebuilds the same values from the base. Identical copies stay
identical in training unless something breaks their symmetry: ``--moe-upcycle-noise`` adds noise
to the shared copies as to the routed ones. The gates new to the MoE model start at zero: the
shared-expert gate and, with ``--moe-cmr``, the CMR gate (every token mixes the dense FFN, which
keeps its fairseq names ``fc1``/``fc2`` and is copied, and the MoE output half and half: both
are the dense output at first). The router's bias-balancing buffers start at zero, as built.
Expert-choice routing upcycles as top-k does (a token no expert takes gets only the shared part).

Sources: a dense ``transformer`` checkpoint (for ``moe_transformer``, or its encoder for
``moe_roberta``) or a RoBERTa-style ``roberta`` checkpoint (for ``moe_roberta``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..modules.expert_kinds import EXPERT_KINDS
from .provenance import record_base, record_upcycling

logger = logging.getLogger(__name__)

# Each expert kind's ``UPCYCLE`` rule (``modules/expert_protocol.UpcycleRule``): MoE parameter
# suffix -> the dense FFN parameter it is copied from, into every expert (FFN experts' stacks) or
# once (LoRA experts' shared frozen FFN).
EXPERT_SOURCES = {
    f"moe.experts.{tensor}": dense
    for kind in EXPERT_KINDS.values()
    if kind.UPCYCLE.into_every_expert
    for tensor, dense in kind.UPCYCLE.sources.items()
}
KIND_BASE_SOURCES = {
    f"moe.experts.{tensor}": dense
    for kind in EXPERT_KINDS.values()
    if not kind.UPCYCLE.into_every_expert
    for tensor, dense in kind.UPCYCLE.sources.items()
}
_KIND_NEW = "".join(
    "|" + re.escape(f".moe.experts.{prefix}")
    for kind in EXPERT_KINDS.values()
    for prefix in kind.UPCYCLE.new
)
SHARED_SOURCES = {  # shared experts (one FFN of width N*F) -> the dense FFN, tiled along dim
    "moe.shared.fc1.weight": ("fc1.weight", 0),
    "moe.shared.fc1.bias": ("fc1.bias", 0),
    "moe.shared.fc2.weight": ("fc2.weight", 1),
    "moe.shared.fc2.bias": ("fc2.bias", None),
}
# Gates new to the MoE model that start at zero (see the module doc), never from dense.
ZERO_INIT = re.compile(r"\.(moe\.shared\.gate\.weight|cmr_gate\.weight|cmr_gate\.bias)$")
# The router (weights, bias, usage EMA, schedule count, bias-balancing buffers) starts as
# configured, never from dense.
ROUTER = re.compile(
    r"\.moe\.gate\.(wg\.weight|wg\.bias|usage_ema|routing_updates|balance_bias|balance_load)$"
)
# Parameters a dense source may lack: new heads, an LM head when the source is a translation
# encoder, and the expert kinds' new tensors (``UpcycleRule.new``: LoRA deltas).
MAY_BE_NEW = re.compile(
    r"^(classification_heads\.|encoder\.lm_head\.)|\.version$|_float_tensor$" + _KIND_NEW
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


def _mapping(name: str, names: set[str]) -> tuple[str | None, str, float]:
    """How the model's tensor ``name`` comes from a dense checkpoint: ``(dense name or None,
    how, scale)``, ``how`` one of ``copy``, ``stack`` (into every expert), ``tile0``/``tile1``
    (repeated along that dim, shared experts; fc2 weight further divided by the number of
    copies), ``sum`` (the shared fc2 bias: the sum of the copies' biases); the value is
    multiplied by ``scale`` (module doc). None: not from the dense model."""
    if ROUTER.search(name) or ZERO_INIT.search(name):
        return None, "copy", 1.0
    for suffix, source in EXPERT_SOURCES.items():
        if name.endswith(suffix):
            layer = name[: -len(suffix)]
            parallel = layer + "fc1.weight" in names and layer + "cmr_gate.weight" not in names
            if parallel:  # --moe-expert-placement parallel: the experts start as initialised
                return None, "copy", 1.0
            shared = layer + "moe.shared.fc1.weight" in names
            return layer + source, "stack", 0.5 if shared and "fc2" in suffix else 1.0
    for suffix, (source, dim) in SHARED_SOURCES.items():
        if name.endswith(suffix):
            layer = name[: -len(suffix)]
            gated = layer + "moe.shared.gate.weight" in names
            scale = 1.0 if "fc1" in suffix else (1.0 if gated else 0.5)
            return layer + source, "sum" if dim is None else f"tile{dim}", scale
    for suffix, source in KIND_BASE_SOURCES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + source, "copy", 1.0
    return name, "copy", 1.0


def dense_source(name: str, names: set[str]) -> tuple[str | None, bool]:
    """Where the model's tensor ``name`` comes from in a dense checkpoint: the dense name to
    look up (None: not from the dense model: a router, a new gate, or stacked experts placed
    beside a dense FFN, which start as initialised) and whether it is copied into every expert.
    ``names``: all the model's state-dict names."""
    wanted, how, _ = _mapping(name, names)
    return wanted, how == "stack"


def dense_tensor(dense: dict, name: str, shape, names: set[str], source: str):
    """The value the model's tensor ``name`` (of ``shape``) takes from ``dense`` (expanded over
    the experts for stacked expert weights, tiled for shared experts, scaled as the module doc
    says; zeros for the gates that start at zero) and the dense name it came from (None for
    those zeros), or None when it does not come from it. Raises ValueError naming the parameter
    when the weight is missing (and may not be new) or has another shape."""
    if ZERO_INIT.search(name):
        return torch.zeros(shape), None
    wanted, how, scale = _mapping(name, names)
    if wanted is None:
        return None
    found = _find(dense, wanted)
    if found is None:
        if MAY_BE_NEW.search(name):
            return None
        what = "dense FFN weight" if wanted != name else "weight"
        raise ValueError(f"{source} has no {what} for {name} (looked for {wanted})")
    value = dense[found]
    if how == "stack":
        _check_shape(name, tuple(shape[1:]), found, value, source)
        value = value.unsqueeze(0).expand(shape)
    elif how.startswith("tile"):
        dim = int(how[-1])
        copies = shape[dim] // value.shape[dim] if value.dim() == len(shape) else 0
        tiled = tuple(value.shape[d] * (copies if d == dim else 1) for d in range(value.dim()))
        if copies < 1 or tiled != tuple(shape):
            _check_shape(name, tuple(shape), found, value, source)  # raises, naming both
        value = torch.cat([value] * copies, dim=dim)
        if dim == 1:  # the fc2 of N copies sums them: each gets 1/N of the shared part
            scale = scale / copies
    else:
        _check_shape(name, tuple(shape), found, value, source)
    return (value * scale if scale != 1.0 else value), found


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
            if dense_name is None:  # a gate that starts at zero
                continue
            used.add(dense_name)
            _, how, scale = _mapping(name, names)
            if how == "copy":
                copied += 1
                continue
            experts += 1
            if noise > 0 and name.endswith("weight"):
                std = noise * scale * float(dense[dense_name].float().std())
                if how == "stack":
                    suffix = next(s for s in EXPERT_SOURCES if name.endswith(s))
                    stack = model.get_submodule(name[: -len(suffix)] + "moe.experts")
                    stack.upcycle_noise_(suffix.rsplit(".", 1)[1], std)
                else:  # shared experts: one draw of the global RNG per weight
                    target.add_(torch.randn(target.shape).mul_(std).to(target.dtype))
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
    record_upcycling(args, path, report["new"])
    if getattr(args, "moe_save_trainable_only", False):
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
