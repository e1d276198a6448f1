"""Expert pruning: keep E' of the E experts of every MoE layer of a trained model's state dict.

The inverse of expert growth (``grow.py``, whose key naming and checks this reuses). Which
experts stay is chosen from a routing log (``analysis/routing_log.py``: per (token, layer) the
experts and combine weights) recorded on a data set, by one of ``CRITERIA``:

- ``load``: the experts that received the most assignments (all k choices of every token);
- ``weighted-load``: the experts with the largest summed combine weight (the router-weighted
  load; Koishekenov et al. 2023's "importance");
- ``language``: one plan per language pair (``language_plans``): encoder layers keep the experts
  the pair's *source* language uses most, decoder layers those its *target* language uses most
  (Koishekenov et al. 2023, "Memory-efficient NLLB-200: Language-specific Expert Pruning of a
  Massively Multilingual Machine Translation Model", sec. 3), scored by ``load`` or
  ``weighted-load``.

Ties go to the lower expert id. The kept experts stay in their old order (new id i is the i-th
smallest kept old id), so ``prune_state_dict`` is a gather along the expert dimension of every
per-expert tensor: the router rows ``P.gate.wg.weight`` (E x C) and ``P.gate.wg.bias`` (E), the
gate's buffers ``usage_ema`` (renormalised to sum to 1 over the kept experts), ``balance_bias``
and ``balance_load``, and the stacked expert tensors of the layer's kind (``STACKED``; a LoRA
layer's frozen FFN, ``SHARED_STATE``, is kept). A pruned expert has no router row, so no token
can be routed to it. Shared experts (``P.shared.*``), the CMR gate and ``routing_updates`` do
not depend on E and are kept.

When is the pruned model exact? When the pruned experts never win a token's top-k, every kept
expert receives the same tokens. The combine weights are then unchanged (up to rounding) with
renormalised top-k (``--moe-normalize-top-k``: p_i / sum_{j in top-k} p_j does not read the
other experts), and with raw softmax top-k when the pruned experts' probabilities are 0 (their
logits ~1e4 below the others', as a grown expert starts): softmax over E' then has the same sum.
Otherwise the raw top-k weights grow by the pruned experts' share of the softmax mass, and
dense routing spreads that mass over the kept experts.

Config (``config_updates``): ``moe_expert_count`` = E'; ``moe_top_k`` must be <= E' (refused
otherwise); ``moe_fallback_expert`` f is remapped to f's new id when every layer keeps f at the
same new id, else the caller must name one (``fallback``); ``moe_expert_parallel_size`` P
becomes gcd(P, E') when P does not divide E'; the capacity factors are relative to E (capacity
ceil(factor k T / E')) and are kept; the checkpoint written is consolidated. Refused: expert
choice (each expert takes ceil(c T / E) tokens: pruning changes what the kept ones take), int8
checkpoints (prune the fp32 model, then ``fairseq-moe-quantize``), adapter-only checkpoints
(their frozen base lives in another file).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..modules.routing import routing_method
from ..naming import layer_side
from .grow import config_value, layer_keys, moe_layer_prefixes
from .grow import expert_count as grow_expert_count

SCORES = ("load", "weighted-load")
CRITERIA = (*SCORES, "language")
PER_EXPERT_GATE = ("wg.weight", "wg.bias", "usage_ema", "balance_bias", "balance_load")  # E x ...


def layer_prefix(name: str) -> str:
    """A routing log's layer name (``encoder.layers.1``) -> its state-dict prefix."""
    return f"{name}.moe"


# -- choosing ----------------------------------------------------------------------------------


def layer_scores(log: dict, score: str, rows=None) -> np.ndarray:
    """L x E: per layer of the log and expert, the ``score`` (``load``: assignments;
    ``weighted-load``: summed combine weights) over ``rows`` (a bool mask over the log's rows;
    default all). Empty slots (-1) count for nothing."""
    if score not in SCORES:
        raise ValueError(f"the expert score must be one of {SCORES}, got {score!r}")
    num_layers, num_experts = len(log["layer_names"]), int(log["num_experts"])
    layer, experts, weights = log["layer"], log["experts"], log["weights"]  # R; R x k; R x k
    if rows is not None:
        layer, experts, weights = layer[rows], experts[rows], weights[rows]
    filled = experts >= 0  # R x k
    flat = (np.repeat(layer[:, None], experts.shape[1], axis=1) * num_experts + experts)[filled]
    values = None if score == "load" else weights[filled].astype(np.float64)
    counts = np.bincount(flat.astype(np.int64), weights=values, minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts)


def choose_experts(scores: np.ndarray, keep: int) -> list[list[int]]:
    """Per layer (row of ``scores``, L x E), the ``keep`` best-scored experts, ties to the lower
    id, returned in increasing id order (their order in the pruned model)."""
    num_experts = scores.shape[1]
    if not 1 <= keep <= num_experts:
        raise ValueError(f"--keep must be between 1 and the {num_experts} experts, got {keep}")
    kept = []
    for row in scores:
        order = sorted(range(num_experts), key=lambda e: (-float(row[e]), e))
        kept.append(sorted(order[:keep]))
    return kept


def check_log(log: dict, prefixes: list[str], num_experts: int, path="the routing log") -> None:
    """ValueError unless the log was recorded from a model with these MoE layers and E."""
    names = [layer_prefix(str(n)) for n in log["layer_names"].tolist()]
    if sorted(names) != sorted(prefixes):
        raise ValueError(
            f"{path} was recorded from another model: its MoE layers are {sorted(names)}, the "
            f"checkpoint's are {sorted(prefixes)}"
        )
    logged = int(log["num_experts"])
    if logged != num_experts:
        raise ValueError(
            f"{path} was recorded from another model: it has {logged} experts per layer, the "
            f"checkpoint {num_experts}"
        )
    routing = log.get("layer_routing")
    if routing is not None:
        for name, kind in zip(log["layer_names"].tolist(), routing.tolist(), strict=True):
            if not routing_method(str(kind)).growable:
                raise ValueError(f"{path}: layer {name} routed by {kind}, which cannot be pruned")


def plan(log: dict, criterion: str, keep: int) -> dict:
    """The kept experts of the ``load`` / ``weighted-load`` criterion: ``{"kept": {prefix:
    [ids]}, "scores": {prefix: [E scores]}}``."""
    if criterion not in SCORES:
        raise ValueError(f"criterion must be one of {SCORES} here, got {criterion!r}")
    scores = layer_scores(log, criterion)
    return _plan(log, scores, keep)


def _plan(log, scores: np.ndarray, keep: int) -> dict:
    prefixes = [layer_prefix(str(n)) for n in log["layer_names"].tolist()]
    kept = choose_experts(scores, keep)
    return {
        "kept": dict(zip(prefixes, kept, strict=True)),
        "scores": {p: [float(s) for s in row] for p, row in zip(prefixes, scores, strict=True)},
    }


def language_plans(log: dict, keep: int, score: str = "load") -> dict[str, dict]:
    """Per language pair ``src-tgt`` of the log, ``plan``'s dict (plus ``langs``: the language
    each layer was scored on): encoder layers scored on the rows of source-language tokens,
    decoder layers on those of target-language tokens (the log's ``lang`` is the source language
    for encoder rows and the target language for decoder rows, over every pair)."""
    pairs = [str(p) for p in log["pairs"].tolist()]
    if len(pairs) < 2:
        raise ValueError(
            f"--criterion language needs a multilingual model (several language pairs); the "
            f"routing log has {len(pairs)} ({', '.join(pairs) or 'none'}): use --criterion load "
            "or weighted-load"
        )
    langs = [str(lang) for lang in log["langs"].tolist()]
    names = [str(n) for n in log["layer_names"].tolist()]
    num_experts = int(log["num_experts"])
    plans = {}
    for pair in pairs:
        src, tgt = pair.split("-")
        scores = np.zeros((len(names), num_experts))
        used = []
        for i, name in enumerate(names):
            lang = src if layer_side(name) == "encoder" else tgt
            rows = (log["layer"] == i) & (log["lang"] == langs.index(lang))
            if not rows.any():
                raise ValueError(f"the routing log has no {lang} token in layer {name}")
            scores[i] = layer_scores(log, score, rows)[i]
            used.append(lang)
        plans[pair] = dict(_plan(log, scores, keep), langs=dict(zip(names, used, strict=True)))
    return plans


# -- the state dict and the config ----------------------------------------------------------------


def check_prunable(cfg) -> None:
    """ValueError naming the option for the checkpoints pruning refuses (module doc)."""
    for key in ("moe_routing", "moe_decoder_routing"):
        method = routing_method(config_value(cfg, key) or "topk")
        if not method.growable:
            raise ValueError(
                f"cannot prune {method.a_label} model: the number of experts sets which tokens "
                f"each expert takes ({method.reason('growable')})"
            )
    int8 = str(config_value(cfg, "moe_int8", "off"))
    if int8 != "off":
        raise ValueError(
            f"cannot prune an int8 checkpoint (moe_int8={int8}): prune the fp32 checkpoint, "
            "then quantise the pruned one with fairseq-moe-quantize"
        )
    if config_value(cfg, "moe_save_trainable_only", False):
        raise ValueError(
            "cannot prune an adapter-only checkpoint (--moe-save-trainable-only): its frozen "
            "base is another file; load it with its base and save the whole model first"
        )


def layer_stacks(state: dict, prefix: str) -> list[str]:
    """The layer's per-expert stack names (its expert kind's ``STACKED``); ValueError naming a
    key under ``P.gate.`` or ``P.experts.`` that pruning does not know how to slice
    (``grow.layer_keys``, growth's twin check)."""
    return layer_keys(state, prefix, "prune")[1]


def expert_count(state: dict, cfg=None) -> tuple[list[str], int]:
    """(the MoE layer prefixes, E), E checked to agree across every per-expert tensor and the
    config; ValueError for a state dict without MoE layers (a dense checkpoint)."""
    prefixes = moe_layer_prefixes(state)
    if not prefixes:
        raise ValueError("no MoE layer in the checkpoint (no key ends with .moe.gate.wg.weight): "
                         "a dense checkpoint has no experts to prune")  # fmt: skip
    return prefixes, grow_expert_count(state, prefixes, cfg, PER_EXPERT_GATE, "prune")


def prune_state_dict(state: dict, kept: dict[str, list[int]]) -> dict:
    """``state`` with every MoE layer ``P`` cut to the experts ``kept[P]`` (old ids, each layer
    the same number E'); not modified. ValueError for a layer without a plan, or ids out of
    range or repeated."""
    prefixes, num_experts = expert_count(state)
    if set(kept) != set(prefixes):
        raise ValueError(f"the plan names the MoE layers {sorted(kept)}, the checkpoint has "
                         f"{prefixes}")  # fmt: skip
    sizes = {len(ids) for ids in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"every MoE layer must keep as many experts, got {sorted(sizes)}")
    new = dict(state)
    for prefix in prefixes:
        ids = [int(i) for i in kept[prefix]]
        if len(set(ids)) != len(ids) or not all(0 <= i < num_experts for i in ids):
            raise ValueError(f"{prefix}: kept experts {ids} must be distinct ids in "
                             f"0..{num_experts - 1}")  # fmt: skip
        index = torch.tensor(ids, dtype=torch.long)
        keys = [f"{prefix}.gate.{g}" for g in PER_EXPERT_GATE]
        keys += [f"{prefix}.experts.{s}" for s in layer_stacks(state, prefix)]
        for key in keys:
            if key in state:
                new[key] = state[key].index_select(0, index.to(state[key].device)).clone()
        ema = new.get(f"{prefix}.gate.usage_ema")
        if ema is not None and float(ema.sum()) > 0:  # E': shares of the kept experts
            new[f"{prefix}.gate.usage_ema"] = ema / ema.sum()
    return new


def new_fallback(fallback: int, kept: dict[str, list[int]]) -> int | None:
    """The pruned model's id of the old fallback expert when every layer keeps it at the same
    new id; -1 stays -1; None when it cannot be remapped."""
    if fallback < 0:
        return -1
    new_ids = {ids.index(fallback) if fallback in ids else None for ids in kept.values()}
    return new_ids.pop() if len(new_ids) == 1 and None not in new_ids else None


def config_updates(cfg, kept: dict[str, list[int]], fallback: int | None = None) -> dict:
    """The model-config changes of a pruned model (module doc); ``fallback``: the new
    ``moe_fallback_expert`` (None: remap the old one, refused when impossible)."""
    check_prunable(cfg)
    keep = len(next(iter(kept.values())))
    top_k = int(config_value(cfg, "moe_top_k", 2))
    if keep < top_k:
        raise ValueError(f"--keep {keep} is below the model's top-k (--moe-top-k {top_k}): "
                         f"keep at least {top_k} experts")  # fmt: skip
    old = int(config_value(cfg, "moe_fallback_expert", 0))
    if fallback is None:
        fallback = new_fallback(old, kept)
        if fallback is None:
            dropped = [p for p, ids in kept.items() if old not in ids]
            where = f"pruned from {dropped}" if dropped else "given different new ids per layer"
            raise ValueError(
                f"the fallback expert (--moe-fallback-expert {old}) is {where}: give the pruned "
                f"model's --fallback-expert (an id in 0..{keep - 1}, or -1 for none)"
            )
    elif not -1 <= fallback < keep:
        raise ValueError(f"--fallback-expert must be -1 or an id in 0..{keep - 1}, got {fallback}")
    parts = int(config_value(cfg, "moe_expert_parallel_size", 1))
    return {
        "moe_expert_count": keep,
        "moe_fallback_expert": int(fallback),
        "moe_expert_parallel_size": math.gcd(parts, keep),
        "moe_checkpoint_format": "consolidated",
    }
