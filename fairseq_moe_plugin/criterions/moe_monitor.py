"""Routing health checks during training: warnings when experts are over- or under-used, an
explicit "routing collapse" warning, and (optional) a balance-loss weight that rises while
imbalance persists.

Plain Python and torch (no fairseq), so it is testable alone; the MoE criteria own one
``RoutingMonitor`` and feed it the routing records of every batch they see.

- Training: the router's per-expert assignment counts (before capacity) are summed over
  ``interval`` updates, then checked and reset. Update numbers come from the caller (the
  criterion reads the model's ``num_updates``).
- Validation: counts of the batches seen in eval mode are summed and checked once the
  validation is over, i.e. at the next training batch, or at ``flush_validation()`` /
  interpreter exit for a final validation.
- Thresholds, for a layer with E experts and shares s_e = count_e / sum(count):
  ``s_e < low / E`` or ``s_e > high / E`` is imbalance (a warning naming layer and experts);
  ``max_e s_e > collapse`` or any ``s_e == 0`` is a routing collapse.
- Distributed training: counts are summed over workers (``all_reduce``) at the check, which
  every worker reaches at the same update: a training window's at its last update, a
  validation's at the next training batch. Only rank 0 writes the warnings. A final validation,
  checked at exit where no collective can run, is checked on the worker's own share (its
  warning says so). fairseq pads a worker's share of the validation set with a repeated
  batch, whose routing is counted like any other (fairseq drops it from the metrics only).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..modules.record import MoERecord
from ..naming import layer_order, short_name

logger = logging.getLogger(__name__)


@dataclass
class HealthThresholds:
    low: float = 0.4  # an expert's share below low / E is a warning
    high: float = 2.0  # an expert's share above high / E is a warning
    collapse: float = 0.8  # one expert above this share of a layer is a routing collapse

    def __post_init__(self):
        if not 0 <= self.low < 1:
            raise ValueError(f"--moe-monitor-low-load must be in [0, 1), got {self.low}")
        if self.high <= 1:
            raise ValueError(f"--moe-monitor-high-load must be > 1, got {self.high}")
        if not 0 < self.collapse <= 1:
            raise ValueError(f"--moe-monitor-collapse-share must be in (0, 1], got {self.collapse}")


@dataclass
class LayerHealth:
    """The verdict on one layer's counts."""

    layer: str
    shares: list[float]
    low: list[int]  # experts below low / E
    high: list[int]  # experts above high / E
    unused: list[int]  # experts with no assignment
    collapsed_to: int | None  # the expert above the collapse share, if any

    @property
    def imbalanced(self) -> bool:
        return bool(self.low or self.high or self.unused or self.collapsed_to is not None)

    @property
    def collapsed(self) -> bool:
        return bool(self.unused) or self.collapsed_to is not None


@dataclass
class Check:
    """One health check: where (which updates, or which validation) and each layer's verdict."""

    where: str
    layers: list[LayerHealth]


def layer_health(layer: str, counts: Sequence[float], thresholds: HealthThresholds) -> LayerHealth:
    """Check one layer's per-expert counts against the thresholds (no counts: all empty)."""
    total = float(sum(counts))
    num_experts = len(counts)
    if total <= 0:
        return LayerHealth(layer, [0.0] * num_experts, [], [], [], None)
    shares = [c / total for c in counts]
    low = [e for e, s in enumerate(shares) if 0 < s < thresholds.low / num_experts]
    high = [e for e, s in enumerate(shares) if s > thresholds.high / num_experts]
    unused = [e for e, c in enumerate(counts) if c == 0] if num_experts > 1 else []
    top = max(range(num_experts), key=lambda e: shares[e])
    collapsed_to = top if num_experts > 1 and shares[top] > thresholds.collapse else None
    return LayerHealth(layer, shares, low, high, unused, collapsed_to)


def _experts(experts: Sequence[int], shares: Sequence[float]) -> str:
    return ", ".join(f"{e} ({100 * shares[e]:.1f}%)" for e in experts)


def health_messages(health: LayerHealth, where: str, thresholds: HealthThresholds) -> list[str]:
    """Log lines for one layer: a collapse line and/or an imbalance line; [] when healthy."""
    n = len(health.shares)
    lines = []
    if health.collapsed:
        parts = []
        if health.collapsed_to is not None:
            e = health.collapsed_to
            parts.append(
                f"expert {e} takes {100 * health.shares[e]:.1f}% of the tokens "
                f"(> {100 * thresholds.collapse:.0f}%)"
            )
        if health.unused:
            parts.append(f"experts {', '.join(map(str, health.unused))} received no tokens")
        lines.append(f"MoE routing collapse in {health.layer} ({where}): " + "; ".join(parts))
    if health.low or health.high:
        parts = []
        if health.high:
            parts.append(
                f"over-used (> {thresholds.high:g}/E = {100 * thresholds.high / n:.1f}%): "
                + _experts(health.high, health.shares)
            )
        if health.low:
            parts.append(
                f"under-used (< {thresholds.low:g}/E = {100 * thresholds.low / n:.1f}%): "
                + _experts(health.low, health.shares)
            )
        lines.append(f"MoE routing imbalance in {health.layer} ({where}): " + "; ".join(parts))
    return lines


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _counts_as_lists(counts: dict[str, torch.Tensor], reduce: bool) -> dict[str, list[float]]:
    """Per-layer counts as lists, in model order, summed over the workers first when ``reduce``
    and running distributed (every worker sends its layers in the same order)."""
    dist = torch.distributed
    names = sorted(counts, key=layer_order)
    if reduce and dist.is_available() and dist.is_initialized() and counts:
        flat = torch.cat([counts[n].double() for n in names])
        dist.all_reduce(flat)
        sizes = [counts[n].numel() for n in names]
        return {n: c.tolist() for n, c in zip(names, flat.split(sizes), strict=True)}
    return {n: counts[n].double().tolist() for n in names}


class _Window:
    """Per-layer count sums of the batches seen since the last check (tensors: no host sync)."""

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, layer: str, counts: torch.Tensor) -> None:
        layer = short_name(layer)  # the name the logged metrics use
        counts = counts.detach()
        if layer in self.counts:
            self.counts[layer] = self.counts[layer] + counts
        else:
            self.counts[layer] = counts.clone()

    def take(self) -> dict[str, torch.Tensor]:
        counts, self.counts = self.counts, {}
        return counts


class RoutingMonitor:
    """Checks routing health over windows of updates and after each validation.

    Args:
        interval: updates per training check; 0 disables the training checks.
        thresholds: the health thresholds.
        boost_factor: when > 1, multiply the balance-loss weight by it at the end of an epoch in
            which every training check (at least one) found an imbalance; 1 disables it.
        boost_max: the balance-loss weight never rises above this.
        emit: where warnings go (default: this module's logger, rank 0 only).
    """

    def __init__(
        self,
        interval: int = 100,
        thresholds: HealthThresholds | None = None,
        boost_factor: float = 1.0,
        boost_max: float = 1.0,
        emit: Callable[[str], None] | None = None,
    ):
        if interval < 0:
            raise ValueError(f"--moe-monitor-interval must be >= 0, got {interval}")
        if boost_factor < 1:
            raise ValueError(f"--moe-balance-boost-factor must be >= 1, got {boost_factor}")
        self.interval = interval
        self.thresholds = thresholds or HealthThresholds()
        self.boost_factor = boost_factor
        self.boost_max = boost_max
        self._emit = emit
        self._train = _Window()
        self._window_start: int | None = None
        self._valid = _Window()
        self._valid_batches = 0
        self._last_update = 0
        self._epoch_checks = 0  # training checks in this epoch
        self._epoch_imbalanced = 0  # ... of which found an imbalance
        self._epoch = 1
        # A final validation has no later training batch: check it when the process exits.
        self._finalizer = weakref.finalize(self, RoutingMonitor._flush_at_exit, weakref.ref(self))

    # -- feeding -------------------------------------------------------------------------------
    def observe(
        self, records: Sequence[MoERecord], training: bool, num_updates: int
    ) -> list[Check]:
        """Add a batch's routing records. In training, first close the window (or the pending
        validation) that this update ends. Returns the checks this call ran (often none)."""
        checks = []
        if training:
            valid = self.flush_validation()
            if valid is not None:
                checks.append(valid)
            if self._window_start is None:
                self._window_start = num_updates
            if self.interval > 0 and num_updates - self._window_start >= self.interval:
                checks.append(self._check_train_window(num_updates))
            self._last_update = num_updates
            for record in records:
                self._train.add(record.layer, record.expert_load)
        else:
            self._valid_batches += 1
            for record in records:
                self._valid.add(record.layer, record.expert_load)
        return checks

    # -- checks --------------------------------------------------------------------------------
    def _check(self, counts: dict[str, torch.Tensor], where: str, reduce: bool) -> Check:
        summed = _counts_as_lists(counts, reduce)
        verdicts = [layer_health(layer, c, self.thresholds) for layer, c in summed.items()]
        for health in verdicts:
            for line in health_messages(health, where, self.thresholds):
                self._warn(line)
        return Check(where, verdicts)

    def _check_train_window(self, num_updates: int) -> Check:
        where = f"train, updates {self._window_start + 1}-{num_updates}"
        check = self._check(self._train.take(), where, reduce=True)
        self._window_start = num_updates
        if check.layers:
            self._epoch_checks += 1
            self._epoch_imbalanced += any(h.imbalanced for h in check.layers)
        return check

    def flush_validation(self, reduce: bool = True) -> Check | None:
        """Check the counts of the validation batches seen since the last training batch (None
        when there were none), summed over the workers when ``reduce`` (every worker must call
        it then, as the next training batch does)."""
        if self._valid_batches == 0:
            return None
        where = f"valid after update {self._last_update}, {self._valid_batches} batches"
        if not reduce and _is_distributed():
            where += ", this worker's share"
        self._valid_batches = 0
        return self._check(self._valid.take(), where, reduce=reduce)

    @staticmethod
    def _flush_at_exit(ref) -> None:
        monitor = ref()
        if monitor is not None:
            monitor.flush_validation(reduce=False)  # no collective at exit

    def end_epoch(self, balance_weight: float) -> float:
        """Close an epoch; return the balance-loss weight for the next one (raised by
        ``boost_factor``, at most ``boost_max``, if every training check of the epoch found an
        imbalance)."""
        epoch, checks, bad = self._epoch, self._epoch_checks, self._epoch_imbalanced
        self._epoch += 1
        self._epoch_checks = self._epoch_imbalanced = 0
        if self.boost_factor <= 1 or checks == 0 or bad < checks:
            return balance_weight
        new_weight = min(balance_weight * self.boost_factor, self.boost_max)
        if new_weight > balance_weight:
            self._warn(
                f"MoE routing stayed imbalanced at all {checks} checks of epoch {epoch}: "
                f"raising the balance-loss weight from {balance_weight:g} to {new_weight:g}"
            )
        return new_weight

    def epoch_state(self) -> dict:
        """What ``end_epoch`` depends on besides the weight: the epoch number and this epoch's
        training checks so far (saved with the criterion's state, ``criterion_state.py``)."""
        return {"epoch": self._epoch, "checks": self._epoch_checks,
                "imbalanced": self._epoch_imbalanced}  # fmt: skip

    def load_epoch_state(self, state: dict) -> None:
        """Take back ``epoch_state``'s state."""
        self._epoch = int(state["epoch"])
        self._epoch_checks = int(state["checks"])
        self._epoch_imbalanced = int(state["imbalanced"])

    def _warn(self, line: str) -> None:
        if self._emit is not None:
            self._emit(line)
        elif _is_rank_zero():
            logger.warning(line)
