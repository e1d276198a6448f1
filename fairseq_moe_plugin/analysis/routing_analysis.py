"""Routing statistics from a token-level routing log (numpy and scipy; no torch or fairseq).

The log is what ``routing_log.record_split`` builds and ``fairseq-moe-usage`` writes
(``routing.npz``): one row per (non-padding token, MoE layer), with arrays

- ``layer`` (R, int): index into ``layer_names``; ``sentence``, ``batch``, ``position``,
  ``token`` (R, int); ``lang``, ``pair`` (R, int): indices into ``langs`` and ``pairs``;
- ``experts`` (R x k, int) best first, ``weights`` (R x k, float), ``entropy`` (R, float, nats);
  -1 (weight 0) in a slot means no expert: under expert choice a token has as many experts as
  took it (0 to E; the log is then E wide), and a log mixing such layers with top-k ones pads
  the top-k rows;
- metadata: ``layer_names`` (module names, ``naming.py``), ``langs``, ``pairs``, ``vocab`` (str
  arrays), ``num_experts``, ``k``; optional (older logs lack them): per layer ``layer_routing``
  (``topk``, ``dense``, ``expert_choice``), ``shared_experts`` and ``shared_gated``, and
  ``max_tokens``, ``max_sentences`` (-1: none), ``expert_capacity_factor``.

Every function returns plain lists/dicts (JSON-ready): these are the data behind the figures and
the ``summary.json``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from scipy.spatial.distance import jensenshannon

from ..naming import SIDES, layer_side

REQUIRED = ("layer", "sentence", "batch", "position", "token", "lang", "pair", "experts",
            "weights", "entropy", "layer_names", "langs", "pairs", "vocab", "num_experts", "k")  # fmt: skip


def load_log(path) -> dict[str, np.ndarray]:
    """Read a routing log, checking that it has every array (error names the file and key)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in REQUIRED if key not in data.files]
        if missing:
            raise ValueError(f"{path}: not a routing log, missing arrays {missing}")
        return {key: data[key] for key in data.files}


def expert_counts(log, rows=None) -> np.ndarray:
    """Assignments (all k choices; under expert choice the tokens each expert took) per expert
    over ``rows`` (a bool mask; default all): E."""
    experts = log["experts"] if rows is None else log["experts"][rows]
    experts = experts[experts >= 0]  # -1: an empty slot
    return np.bincount(experts.reshape(-1), minlength=int(log["num_experts"])).astype(np.int64)


# The log's per-layer routing names are ``RoutingMode`` values (``modules/routing/output.py``);
# this module reads logs without torch, so it names the one whose columns are what each expert
# took (expert choice) here, and asks ``experts_choose`` rather than comparing names.
EXPERTS_CHOOSE_MODE = "expert_choice"


def experts_choose(kind: str) -> bool:
    """Whether a layer of the log routed by expert choice (each expert took its tokens)."""
    return str(kind) == EXPERTS_CHOOSE_MODE


def layer_routing(log) -> list[str]:
    """Per layer ``topk``, ``dense`` or ``expert_choice`` (``topk`` for a log without it)."""
    if "layer_routing" in log:
        return [str(r) for r in log["layer_routing"].tolist()]
    return ["topk"] * len(log["layer_names"])


def expert_choice_stats(log) -> dict[str, dict]:
    """Per expert-choice layer: the share of tokens no expert took (they pass through the
    residual alone), the mean number of experts per token, and the share of tokens with
    0, 1, ..., E experts."""
    out = {}
    num_experts = int(log["num_experts"])
    for i, (name, kind) in enumerate(zip(log["layer_names"].tolist(), layer_routing(log),
                                         strict=True)):  # fmt: skip
        if not experts_choose(kind):
            continue
        per_token = (log["experts"][log["layer"] == i] >= 0).sum(axis=1)  # experts of each token
        n = max(len(per_token), 1)
        out[name] = {
            "unchosen_share": float((per_token == 0).sum() / n),
            "experts_per_token": float(per_token.sum() / n),
            "experts_per_token_shares": (
                np.bincount(per_token, minlength=num_experts + 1) / n
            ).tolist(),
        }
    return out


def notes(log) -> list[str]:
    """What a reader of the figures must know about this model's routing: expert choice depends
    on the batch; shared experts are not routed."""
    out = []
    kinds = layer_routing(log)
    names = log["layer_names"].tolist()
    chosen = [n for n, k in zip(names, kinds, strict=True) if experts_choose(k)]
    if chosen:
        batching = ", ".join(f"--{key.replace('_', '-')} {int(log[key])}" for key in
                             ("max_tokens", "max_sentences") if int(log.get(key, -1)) >= 0)  # fmt: skip
        factor = float(log.get("expert_capacity_factor", 0.0))
        out.append(
            f"expert-choice routing ({', '.join(chosen)}) depends on the batch: each expert takes "
            f"the top C = ceil({factor:g} * N / E) of the N tokens of a batch, so which tokens it "
            f"takes, the unchosen share and the experts per token hold for the batches of this "
            f"log ({batching or 'the batching it was recorded with'}); another batch size or "
            "another mix of sentences routes differently, in training and at inference"
        )
    shared = log.get("shared_experts")
    if shared is not None and int(np.max(shared, initial=0)) > 0:
        gated = bool(np.any(log.get("shared_gated", False)))
        out.append(
            f"every token also passes through {int(np.max(shared))} shared expert(s) per MoE layer"
            f"{' (scaled by a learned sigmoid gate)' if gated else ''}: they are not routed, so no "
            "load, share or specialisation figure counts them"
        )
    return out


def shares(counts) -> list[float]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return (counts / total).tolist() if total > 0 else [0.0] * len(counts)


def layer_loads(log) -> dict[str, dict]:
    """Per layer: assignment counts and shares per expert (the heatmap layers x experts)."""
    out = {}
    for i, name in enumerate(log["layer_names"].tolist()):
        counts = expert_counts(log, log["layer"] == i)
        out[name] = {"counts": counts.tolist(), "shares": shares(counts)}
    return out


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, (n-1)/n = one takes all."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def entropy_and_gini(log) -> dict[str, dict]:
    """Per layer: mean router entropy per token (nats), the entropy of the layer's load
    distribution normalised by log E (1 = uniform), and the Gini coefficient of the loads."""
    out = {}
    num_experts = int(log["num_experts"])
    for i, name in enumerate(log["layer_names"].tolist()):
        rows = log["layer"] == i
        p = np.asarray(shares(expert_counts(log, rows)))
        nz = p[p > 0]
        load_entropy = (
            float(-(nz * np.log(nz)).sum() / math.log(num_experts)) if num_experts > 1 else 1.0
        )
        out[name] = {
            "token_entropy": float(log["entropy"][rows].mean()) if rows.any() else 0.0,
            "load_entropy_normalised": load_entropy,
            "gini": gini(p),
        }
    return out


def capacity_overflow(log, capacity_factor: float) -> dict[str, dict]:
    """Per layer and expert: the assignments that exceed ``ceil(factor * k * N / E)`` in each
    batch (N: the layer's tokens in that batch), summed, and as a share of the expert's
    assignments. factor <= 0 is dropless: no overflow; an expert-choice layer has none either
    (each expert takes exactly its capacity)."""
    num_experts, k = int(log["num_experts"]), int(log["k"])
    out = {}
    kinds = layer_routing(log)
    for i, name in enumerate(log["layer_names"].tolist()):
        rows = log["layer"] == i
        overflow = np.zeros(num_experts, dtype=np.int64)
        if capacity_factor > 0 and not experts_choose(kinds[i]):
            for b in np.unique(log["batch"][rows]):
                in_batch = rows & (log["batch"] == b)
                counts = expert_counts(log, in_batch)
                capacity = math.ceil(capacity_factor * k * int(in_batch.sum()) / num_experts)
                overflow += np.maximum(counts - capacity, 0)
        counts = expert_counts(log, rows)
        frac = [float(o / c) if c else 0.0 for o, c in zip(overflow, counts, strict=True)]
        out[name] = {"overflow": overflow.tolist(), "overflow_share": frac}
    return out


def language_groups(log, side: str) -> tuple[str, list[str], np.ndarray] | tuple[None, str, None]:
    """How to group ``side``'s tokens by language: by the token's language (source language in
    the encoder, target language in the decoder) when there are several; else by translation
    direction when there are several; else None and the reason."""
    layer_rows = np.isin(log["layer"], [i for i, n in enumerate(log["layer_names"].tolist())
                                        if layer_side(n) == side])  # fmt: skip
    langs = np.unique(log["lang"][layer_rows])
    if len(langs) >= 2:
        names = [str(log["langs"][j]) for j in langs]
        return "language", names, log["lang"]
    pairs = np.unique(log["pair"][layer_rows])
    if len(pairs) >= 2:
        names = [str(log["pairs"][j]) for j in pairs]
        return "direction", names, log["pair"]
    return None, f"the {side} sees one language and one direction", None


def per_language(log) -> tuple[dict, dict]:
    """Per side with several languages (or directions): per layer the groups x experts shares,
    and the group similarity 1 - JSD (base 2) of routing distributions, averaged over the
    side's layers (1 = the groups use the experts identically). Returns (data, skipped)."""
    data, skipped = {}, {}
    names = log["layer_names"].tolist()
    for side in SIDES:
        layers = [i for i, n in enumerate(names) if layer_side(n) == side]
        if not layers:
            continue
        by, groups, column = language_groups(log, side)
        if by is None:
            skipped[side] = groups
            continue
        table = log["langs"] if by == "language" else log["pairs"]
        index = {str(table[j]): j for j in range(len(table))}
        per_layer, sims = {}, []
        for i in layers:
            dists = [
                shares(expert_counts(log, (log["layer"] == i) & (column == index[g])))
                for g in groups
            ]
            per_layer[names[i]] = dists
            sims.append([[1 - jsd(p, q) for q in dists] for p in dists])
        data[side] = {
            "grouped_by": by,
            "groups": groups,
            "shares": per_layer,
            "similarity": np.mean(np.asarray(sims), axis=0).tolist(),
        }
    return data, skipped


def jsd(p, q) -> float:
    """Jensen-Shannon divergence in bits (0 = equal, 1 = disjoint) of two count or share vectors.

    scipy's ``jensenshannon`` returns the JS *distance*, the square root of the divergence: the
    divergence is its square (base 2). Added here: a vector that sums to 0 (a group with no
    tokens, where scipy would give NaN) counts as disjoint (1), and rounding is clipped to
    [0, 1]."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 1.0
    return float(min(1.0, max(0.0, jensenshannon(p, q, base=2) ** 2)))


def specialisation(log, top: int = 10, min_count: int = 5) -> dict[str, dict]:
    """Per layer and expert: the token types it receives most often relative to their frequency
    (lift = P(token | expert) / P(token), over all k choices, types seen >= ``min_count`` times in
    the layer), and how much of the top-1 routing token identity decides: the share of tokens
    (of types seen >= 2 times) routed to their type's most common top-1 expert, against the
    share of the layer's most common expert (what ignoring the token would give)."""
    vocab = log["vocab"]
    out = {}
    for i, name in enumerate(log["layer_names"].tolist()):
        rows = log["layer"] == i
        tokens, experts = log["token"][rows], log["experts"][rows]
        type_count = Counter(tokens.tolist())
        total = len(tokens)
        experts_table = {}
        for e in range(int(log["num_experts"])):
            hit = (experts == e).any(axis=1)
            n_e = int(hit.sum())
            if n_e == 0:
                experts_table[str(e)] = []
                continue
            rows_e = []
            for tok, c in Counter(tokens[hit].tolist()).items():
                if type_count[tok] >= min_count:
                    lift = (c / n_e) / (type_count[tok] / total)
                    rows_e.append({"token": str(vocab[tok]), "count": c, "lift": round(lift, 3)})
            rows_e.sort(key=lambda r: (-r["lift"], -r["count"], r["token"]))
            experts_table[str(e)] = rows_e[:top]
        routed = experts[:, 0] >= 0  # a token no expert took (expert choice) has no top-1
        out[name] = {
            "top_tokens": experts_table,
            **token_identity_share(tokens[routed], experts[routed, 0]),
        }
    return out


def token_identity_share(tokens: np.ndarray, top1: np.ndarray) -> dict[str, float]:
    repeated = np.isin(tokens, [t for t, c in Counter(tokens.tolist()).items() if c >= 2])
    n = int(repeated.sum())
    if n == 0:
        return {"token_decided": 0.0, "context_decided": 0.0, "majority_expert_share": 0.0}
    pairs = Counter(zip(tokens[repeated].tolist(), top1[repeated].tolist(), strict=True))
    best: dict[int, int] = {}
    for (tok, _), c in pairs.items():
        best[tok] = max(best.get(tok, 0), c)
    decided = sum(best.values()) / n
    majority = max(Counter(top1[repeated].tolist()).values()) / n
    return {
        "token_decided": decided,
        "context_decided": 1 - decided,
        "majority_expert_share": majority,
    }
