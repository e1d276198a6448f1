"""MoE auxiliary loss and routing metrics, shared by every ``*_moe`` criterion.

Scaling. fairseq divides gradients by ``sample_size`` (target tokens, or sentences with
``--sentence-avg``), and a criterion's main loss is a *sum* over the sample. The aux losses are
means over tokens (Switch eq. 4-6, ST-MoE eq. 5), so they enter the summed loss multiplied by
``sample_size``; after fairseq's division the objective is
``main_loss / sample_size + sum_layers (w_balance * balance_l + w_z * z_l)``, independent of the
batch size, as in the papers.

Logging outputs hold flat, summable scalars only (``logging_outputs_can_be_summed`` stays True):
sums weighted by ``sample_size`` for the losses, raw counts for everything else; ratios are
derived in ``reduce_moe_metrics``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from .moe_monitor import short_layer_name

COUNT_PREFIX = "moe_count:"  # ``moe_count:<layer>:<expert>``: the router's assignments
LAYER_PREFIX = "moe_layer:"  # ``moe_layer:<layer>:<stat>``: per-layer sums


@dataclass
class MoELossConfig(FairseqDataclass):
    moe_balance_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "weight of the Switch Transformer load-balancing loss (eq. 4-6), summed "
            "over MoE layers; 0 disables it"
        },
    )
    moe_z_loss_weight: float = field(
        default=0.001,
        metadata={
            "help": "weight of the ST-MoE router z-loss (eq. 5), summed over MoE layers; "
            "0 disables it"
        },
    )


def moe_records_of(net_output) -> list[dict]:
    """The routing records a model put in its output (``net_output[1]["moe_records"]``)."""
    if isinstance(net_output, (tuple, list)) and len(net_output) > 1:
        extra = net_output[1]
        if isinstance(extra, dict):
            return list(extra.get("moe_records", []))
    return []


def moe_aux_loss(records: Sequence[dict], balance_weight: float, z_weight: float) -> torch.Tensor:
    """``sum_layers (balance_weight * balance_loss + z_weight * z_loss)``; a tensor 0 if none."""
    total = None
    for record in records:
        term = balance_weight * record["balance_loss"] + z_weight * record["z_loss"]
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _layer_key(layer: str, stat: str) -> str:
    return f"{LAYER_PREFIX}{layer}:{stat}"


def moe_logging_output(records: Sequence[dict], aux_loss: torch.Tensor, sample_size) -> dict:
    """Flat summable scalars describing the routing of one batch: totals over the MoE layers,
    and per layer (``moe_layer:<layer>:<stat>``) and per expert (``moe_count:<layer>:<expert>``,
    the router's assignments before capacity)."""
    if not records:
        return {}
    n_layers = len(records)
    out = {
        "moe_aux_loss": aux_loss.detach() * sample_size,
        "moe_balance_loss": sum(r["balance_loss"].detach() for r in records)
        / n_layers
        * sample_size,
        "moe_z_loss": sum(r["z_loss"].detach() for r in records) / n_layers * sample_size,
        "moe_dropped": sum(r["dropped"] for r in records),
        "moe_dropped_tokens": sum(r["dropped_tokens"] for r in records),
        "moe_assignments": sum(r["routed_tokens"] * r["k"] for r in records),
        "moe_entropy_sum": sum(r["entropy"] * r["routed_tokens"] for r in records),
        "moe_routed_tokens": sum(r["routed_tokens"] for r in records),
    }
    for record in records:
        layer = short_layer_name(record["layer"])
        out[_layer_key(layer, "balance")] = record["balance_loss"].detach() * sample_size
        out[_layer_key(layer, "z")] = record["z_loss"].detach() * sample_size
        out[_layer_key(layer, "dropped")] = record["dropped"]
        out[_layer_key(layer, "dropped_tokens")] = record["dropped_tokens"]
        out[_layer_key(layer, "assignments")] = record["routed_tokens"] * record["k"]
        out[_layer_key(layer, "entropy_sum")] = record["entropy"] * record["routed_tokens"]
        out[_layer_key(layer, "routed")] = record["routed_tokens"]
        for e, count in enumerate(record["expert_counts_routed"]):
            out[f"{COUNT_PREFIX}{layer}:{e}"] = count
    return out


def _total(logging_outputs, key) -> float:
    value = sum(log.get(key, 0) for log in logging_outputs)
    return float(value.item()) if torch.is_tensor(value) else float(value)


def expert_counts_by_layer(logging_outputs) -> dict[str, list[float]]:
    """Summed per-expert assignment counts (the router's choices, before capacity),
    ``{layer: [count of expert 0, 1, ...]}``."""
    keys = sorted(
        {k for log in logging_outputs for k in log if k.startswith(COUNT_PREFIX)},
        key=lambda k: (k.split(":")[1], int(k.split(":")[2])),
    )
    layers: dict[str, list[float]] = {}
    for key in keys:
        layer = key.split(":")[1]
        layers.setdefault(layer, []).append(_total(logging_outputs, key))
    return layers


def load_summary(counts: Sequence[float]) -> dict[str, float]:
    """Max and min expert share of the tokens, and the coefficient of variation of the counts."""
    total = float(sum(counts))
    if total <= 0:
        return {"max": 0.0, "min": 0.0, "cv": 0.0}
    mean = total / len(counts)
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    return {"max": max(counts) / total, "min": min(counts) / total, "cv": std / mean}


def expert_load_metric(layer: str, expert: int) -> str:
    """The logged name of an expert's share of its layer's assignments: ``moe_enc1_load_e3``."""
    return f"moe_{layer}_load_e{expert}"


def reduce_moe_metrics(logging_outputs) -> None:
    """Log the routing metrics through ``fairseq.logging.metrics`` (console, json, tensorboard).

    Totals over the MoE layers, then per layer: balance and z losses, dropped fraction, entropy,
    max/min expert share and coefficient of variation, and every expert's share (printed last)."""
    sample_size = _total(logging_outputs, "sample_size")
    if not any("moe_balance_loss" in log for log in logging_outputs) or sample_size <= 0:
        return
    for key in ("moe_aux_loss", "moe_balance_loss", "moe_z_loss"):
        metrics.log_scalar(key, _total(logging_outputs, key) / sample_size, sample_size, round=4)
    weight_sum = _total(logging_outputs, "moe_balance_weight_x_ss")
    if weight_sum > 0:
        metrics.log_scalar("moe_balance_weight", weight_sum / sample_size, sample_size, round=5)
    assignments = _total(logging_outputs, "moe_assignments")
    if assignments > 0:
        dropped = _total(logging_outputs, "moe_dropped")
        metrics.log_scalar("moe_dropped_frac", dropped / assignments, assignments, round=4)
    routed = _total(logging_outputs, "moe_routed_tokens")
    if routed > 0:
        entropy = _total(logging_outputs, "moe_entropy_sum") / routed
        metrics.log_scalar("moe_entropy", entropy, routed, round=4)
        dropped_tokens = _total(logging_outputs, "moe_dropped_tokens") / routed
        metrics.log_scalar("moe_dropped_token_frac", dropped_tokens, routed, round=4)
    for layer, counts in expert_counts_by_layer(logging_outputs).items():
        _reduce_layer(logging_outputs, layer, counts, sample_size)


def _reduce_layer(logging_outputs, layer: str, counts: list[float], sample_size: float) -> None:
    def total(stat):
        return _total(logging_outputs, _layer_key(layer, stat))

    metrics.log_scalar(f"moe_{layer}_balance", total("balance") / sample_size, sample_size, round=4)
    metrics.log_scalar(f"moe_{layer}_z_loss", total("z") / sample_size, sample_size, round=4)
    assignments, routed = total("assignments"), total("routed")
    if assignments > 0:
        dropped = total("dropped") / assignments
        metrics.log_scalar(f"moe_{layer}_dropped_frac", dropped, assignments, round=4)
    if routed > 0:
        entropy = total("entropy_sum") / routed
        metrics.log_scalar(f"moe_{layer}_entropy", entropy, routed, round=4)
        dropped_tokens = total("dropped_tokens") / routed
        metrics.log_scalar(f"moe_{layer}_dropped_token_frac", dropped_tokens, routed, round=4)
    summary = load_summary(counts)
    weight = sum(counts)
    metrics.log_scalar(f"moe_{layer}_max_load", summary["max"], weight, round=3)
    metrics.log_scalar(f"moe_{layer}_min_load", summary["min"], weight, round=3)
    metrics.log_scalar(f"moe_{layer}_cv", summary["cv"], weight, round=3)
    if weight > 0:
        for e, count in enumerate(counts):
            name = expert_load_metric(layer, e)
            metrics.log_scalar(name, count / weight, weight, round=4, priority=300)
