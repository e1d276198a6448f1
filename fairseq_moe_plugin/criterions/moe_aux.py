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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

COUNT_PREFIX = "moe_count:"  # logging key ``moe_count:<layer>:<expert>``, raw token counts


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


def short_layer_name(name: str) -> str:
    """``encoder.layers.3`` -> ``enc3``, ``decoder.layers.1`` -> ``dec1``; others unchanged."""
    match = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)", name)
    if match is None:
        return name
    return ("enc" if match.group(1) == "encoder" else "dec") + match.group(2)


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


def moe_logging_output(records: Sequence[dict], aux_loss: torch.Tensor, sample_size) -> dict:
    """Flat summable scalars describing the routing of one batch."""
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
        "moe_assignments": sum(r["routed_tokens"] * r["k"] for r in records),
        "moe_entropy_sum": sum(r["entropy"] * r["routed_tokens"] for r in records),
        "moe_routed_tokens": sum(r["routed_tokens"] for r in records),
    }
    for record in records:
        layer = short_layer_name(record["layer"])
        for e, count in enumerate(record["expert_counts"]):
            out[f"{COUNT_PREFIX}{layer}:{e}"] = count
    return out


def _total(logging_outputs, key) -> float:
    value = sum(log.get(key, 0) for log in logging_outputs)
    return float(value.item()) if torch.is_tensor(value) else float(value)


def expert_counts_by_layer(logging_outputs) -> dict[str, list[float]]:
    """Summed per-expert token counts, ``{layer: [count of expert 0, 1, ...]}``."""
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


def reduce_moe_metrics(logging_outputs) -> None:
    """Log the routing metrics through ``fairseq.logging.metrics`` (console, json, tensorboard).

    Per-expert counts stay in the logging outputs (``moe_count:*``) without being printed; the
    console shows, per layer, the max/min expert share and the coefficient of variation."""
    sample_size = _total(logging_outputs, "sample_size")
    if not any("moe_balance_loss" in log for log in logging_outputs) or sample_size <= 0:
        return
    for key in ("moe_aux_loss", "moe_balance_loss", "moe_z_loss"):
        metrics.log_scalar(key, _total(logging_outputs, key) / sample_size, sample_size, round=4)
    assignments = _total(logging_outputs, "moe_assignments")
    if assignments > 0:
        dropped = _total(logging_outputs, "moe_dropped")
        metrics.log_scalar("moe_dropped_frac", dropped / assignments, assignments, round=4)
    routed = _total(logging_outputs, "moe_routed_tokens")
    if routed > 0:
        entropy = _total(logging_outputs, "moe_entropy_sum") / routed
        metrics.log_scalar("moe_entropy", entropy, routed, round=4)
    for layer, counts in expert_counts_by_layer(logging_outputs).items():
        summary = load_summary(counts)
        weight = sum(counts)
        for stat, value in summary.items():
            metrics.log_scalar(
                f"moe_{layer}_{stat}_load" if stat != "cv" else f"moe_{layer}_cv",
                value,
                weight,
                round=3,
            )
