"""The routing metrics every ``*_moe`` criterion logs: flat, summable logging outputs from the
routing records of a batch, and their reduction through ``fairseq.logging.metrics``.

Logging outputs hold flat, summable scalars only (``logging_outputs_can_be_summed`` stays True):
sums weighted by ``sample_size`` for the losses, raw counts for everything else, under the keys
of ``naming.py``; ratios are derived in ``reduce_moe_metrics``, after fairseq has summed an
update's batches and workers.
"""

import math
from collections.abc import Sequence

import torch
from fairseq.logging import metrics

from ..modules.record import MoERecord
from ..naming import (
    count_key,
    layer_metric,
    layer_order,
    layer_stat_key,
    load_metric,
    parse_count_key,
)


def moe_logging_output(
    records: Sequence[MoERecord],
    aux_loss: torch.Tensor,
    sample_size,
    usage_emas: dict[str, torch.Tensor] | None = None,
    balance_biases: dict[str, torch.Tensor] | None = None,
    balance_losses: Sequence[torch.Tensor] | None = None,
) -> dict:
    """Flat summable scalars describing the routing of one batch: totals over the MoE layers,
    and per layer (``layer_stat_key``) and per expert (``count_key``: the router's assignments
    before capacity, or the probability mass under dense routing), and each layer's usage EMA
    (``usage_emas``, ``{layer: E}``; summed with a batch count, averaged when reduced), the
    selection bias of aux-loss-free balancing (``balance_biases``, the same way), and, for
    expert-choice layers, the tokens no expert took and the (token, expert) pairs computed.
    ``balance_losses``: each record's balance loss as the loss used it (default: the record's
    own, micro-batch, one). Every tensor is detached."""
    if not records:
        return {}
    if balance_losses is None:
        balance_losses = [r.balance_loss for r in records]
    balance = dict(zip((r.layer for r in records), balance_losses, strict=True))
    n_layers = len(records)
    chooser = [r for r in records if getattr(r, "expert_choice", False)]
    out = {
        "moe_aux_loss": aux_loss.detach() * sample_size,
        "moe_balance_loss": sum(b.detach() for b in balance_losses) / n_layers * sample_size,
        "moe_z_loss": sum(r.z_loss.detach() for r in records) / n_layers * sample_size,
        "moe_dropped": sum(r.dropped.detach() for r in records),
        "moe_dropped_tokens": sum(r.dropped_tokens.detach() for r in records),
        "moe_assignments": sum(_assignments(r) for r in records),
        "moe_entropy_sum": sum(r.entropy.detach() * r.routed_tokens.detach() for r in records),
        "moe_routed_tokens": sum(r.routed_tokens.detach() for r in records),
    }
    if chooser:  # expert choice: tokens no expert took, and experts per token
        out["moe_ec_routed"] = sum(r.routed_tokens.detach() for r in chooser)
        out["moe_ec_unchosen"] = sum(r.unchosen_tokens.detach() for r in chooser)
        out["moe_ec_computed"] = sum(r.computed_assignments.detach() for r in chooser)
    for r in records:
        routed = r.routed_tokens.detach()
        out[layer_stat_key(r.layer, "balance")] = balance[r.layer].detach() * sample_size
        out[layer_stat_key(r.layer, "z")] = r.z_loss.detach() * sample_size
        out[layer_stat_key(r.layer, "dropped")] = r.dropped.detach()
        out[layer_stat_key(r.layer, "dropped_tokens")] = r.dropped_tokens.detach()
        out[layer_stat_key(r.layer, "assignments")] = _assignments(r)
        out[layer_stat_key(r.layer, "entropy_sum")] = r.entropy.detach() * routed
        out[layer_stat_key(r.layer, "routed")] = routed
        if getattr(r, "expert_choice", False):
            out[layer_stat_key(r.layer, "unchosen")] = r.unchosen_tokens.detach()
            out[layer_stat_key(r.layer, "computed")] = r.computed_assignments.detach()
        for e, count in enumerate(r.expert_load.detach()):
            out[count_key(r.layer, e)] = count
    for stat, values in (("ema", usage_emas), ("bias", balance_biases)):
        for layer, vector in (values or {}).items():
            out[layer_stat_key(layer, f"{stat}_batches")] = 1
            for e, value in enumerate(vector):
                out[layer_stat_key(layer, f"{stat}_e{e}")] = value
    return out


def _assignments(record: MoERecord) -> torch.Tensor:
    """The assignments a layer's dropped fraction is over: N * k, or under expert choice the
    (token, expert) pairs the experts took."""
    if getattr(record, "expert_choice", False):
        return record.computed_assignments.detach()
    return record.routed_tokens.detach() * record.k


def _total(logging_outputs, key) -> float:
    value = sum(log.get(key, 0) for log in logging_outputs)
    return float(value.item()) if torch.is_tensor(value) else float(value)


def expert_counts_by_layer(logging_outputs) -> dict[str, list[float]]:
    """Summed per-expert assignment counts (the router's choices, before capacity),
    ``{short layer name: [count of expert 0, 1, ...]}``, layers in model order."""
    experts: dict[str, dict[int, str]] = {}  # layer -> expert -> key
    for key in {key for log in logging_outputs for key in log}:
        parsed = parse_count_key(key)
        if parsed is not None:
            layer, e = parsed
            experts.setdefault(layer, {})[e] = key
    return {
        layer: [_total(logging_outputs, experts[layer][e]) for e in sorted(experts[layer])]
        for layer in sorted(experts, key=layer_order)
    }


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
    ec_routed = _total(logging_outputs, "moe_ec_routed")
    if ec_routed > 0:
        unchosen = _total(logging_outputs, "moe_ec_unchosen") / ec_routed
        metrics.log_scalar("moe_unchosen_frac", unchosen, ec_routed, round=4)
        per_token = _total(logging_outputs, "moe_ec_computed") / ec_routed
        metrics.log_scalar("moe_experts_per_token", per_token, ec_routed, round=3)
    for layer, counts in expert_counts_by_layer(logging_outputs).items():
        _reduce_layer(logging_outputs, layer, counts, sample_size)


def _reduce_layer(logging_outputs, layer: str, counts: list[float], sample_size: float) -> None:
    def total(stat):
        return _total(logging_outputs, layer_stat_key(layer, stat))

    def log(stat, value, weight, round):
        metrics.log_scalar(layer_metric(layer, stat), value, weight, round=round)

    log("balance", total("balance") / sample_size, sample_size, 4)
    log("z_loss", total("z") / sample_size, sample_size, 4)
    assignments, routed = total("assignments"), total("routed")
    if assignments > 0:
        log("dropped_frac", total("dropped") / assignments, assignments, 4)
    if routed > 0:
        log("entropy", total("entropy_sum") / routed, routed, 4)
        log("dropped_token_frac", total("dropped_tokens") / routed, routed, 4)
    summary = load_summary(counts)
    weight = sum(counts)
    log("max_load", summary["max"], weight, 3)
    log("min_load", summary["min"], weight, 3)
    log("cv", summary["cv"], weight, 3)
    if weight > 0:
        for e, count in enumerate(counts):
            name = load_metric(layer, e)
            metrics.log_scalar(name, count / weight, weight, round=4, priority=300)
    if routed > 0 and total("computed") > 0:  # expert choice
        log("unchosen_frac", total("unchosen") / routed, routed, 4)
        log("experts_per_token", total("computed") / routed, routed, 3)
    for stat in ("ema", "bias"):  # the usage EMA and the selection bias, beside the loads
        batches = total(f"{stat}_batches")
        if batches > 0:
            for e in range(len(counts)):
                value = total(f"{stat}_e{e}") / batches
                metrics.log_scalar(layer_metric(layer, f"{stat}_e{e}"), value, batches,
                                   round=4, priority=300)  # fmt: skip
