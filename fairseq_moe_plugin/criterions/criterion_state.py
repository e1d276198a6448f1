"""The MoE criteria's training state in fairseq checkpoints: the balance boost.

With ``--moe-balance-boost-factor`` > 1 a criterion raises its balance-loss weight at the end
of an epoch in which every routing check found an imbalance (``RoutingMonitor.end_epoch``).
That weight is state of the run, like the learning rate: it depends on every epoch so far. It
lives on the criterion (``moe_balance_loss_weight``), with the monitor's count of this epoch's
checks (``RoutingMonitor.epoch_state``) and the meter count the criterion uses to see an epoch
end. fairseq saves a criterion's ``state_dict`` only when the criterion has parameters, so this
state goes in the checkpoint's ``extra_state`` under ``"moe_criterion"``
(``save_criterion_state_with_fairseq``, a patch of ``Trainer.state_dict`` and
``Trainer.load_checkpoint`` listed in ``fairseq_patches.py``); it is plain numbers.

Resuming now (``--restore-file``, or fairseq's ``checkpoint_last.pt``) continues with the saved
weight and the epoch's checks so far, as the uninterrupted run would:

- a mid-epoch checkpoint: the weight, the epoch's checks and the meter count are restored;
- an end-of-epoch checkpoint: restored, then the end-of-epoch decision that the uninterrupted
  run takes at the next epoch's first batch is taken at once (possibly raising the weight,
  with the usual warning);
- not restored (the run starts from the configured weight, as before, with a log line): with
  ``--reset-lr-scheduler`` (the boost is a schedule of a loss weight, and a fine-tuning run that
  resets the schedule starts it again), for a checkpoint saved without this state (before this
  change, or by another criterion), or when ``--moe-balance-loss-weight``,
  ``--moe-balance-boost-factor`` or ``--moe-balance-boost-max`` differ from the saved run's.

A run that does not resume is unchanged: saving only adds the entry. The monitor's current
window of expert counts (since its last check) is not saved: after a resume the first window
starts at the resumed update.
"""

from __future__ import annotations

import functools
import inspect
import logging

logger = logging.getLogger(__name__)

EXTRA_STATE_KEY = "moe_criterion"
MARKER = "__fairseq_moe_criterion_state__"


def _options(criterion) -> dict:
    monitor = criterion.moe_monitor
    return {
        "balance_loss_weight": float(criterion._moe_configured_balance_weight),
        "boost_factor": float(monitor.boost_factor),
        "boost_max": float(monitor.boost_max),
    }


def boost_state(criterion) -> dict:
    """What ``extra_state["moe_criterion"]`` holds for ``criterion`` (a ``MoECriterionMixin``)."""
    count = criterion._moe_epoch_meter_count
    return {
        "version": 1,
        "options": _options(criterion),
        "balance_loss_weight": float(criterion.moe_balance_loss_weight),
        "monitor": criterion.moe_monitor.epoch_state(),
        "epoch_meter_count": None if count is None else int(count),
    }


def load_boost_state(criterion, state, meters_loaded: bool, epoch_ended: bool) -> bool:
    """Restore ``boost_state``'s ``state`` into ``criterion`` as the module doc says; False (and
    nothing changes) when it is not restored. ``meters_loaded``: fairseq restored the training
    meters (a mid-epoch checkpoint without ``--reset-meters``); ``epoch_ended``: the checkpoint
    was saved at the end of an epoch."""
    if not isinstance(state, dict) or state.get("version") != 1:
        if criterion.moe_monitor.boost_factor > 1:
            logger.info("the checkpoint holds no balance-boost state: the boost starts again")
        return False
    if state["options"] != _options(criterion):
        logger.info(
            f"balance boost not restored: the checkpoint's options {state['options']} differ from "
            f"this run's {_options(criterion)}; starting from the configured weight"
        )
        return False
    criterion.moe_balance_loss_weight = float(state["balance_loss_weight"])
    criterion.moe_monitor.load_epoch_state(state["monitor"])
    criterion._moe_epoch_meter_count = state["epoch_meter_count"] if meters_loaded else None
    if epoch_ended and criterion.moe_monitor.boost_factor > 1:
        weight = criterion.moe_monitor.end_epoch(criterion.moe_balance_loss_weight)
        criterion.moe_balance_loss_weight = weight
    return True


def with_criterion_state(state_dict, load_checkpoint):
    """``Trainer.state_dict`` and ``Trainer.load_checkpoint`` (given), wrapped as the module doc
    says: the first adds the criterion's ``moe_state_dict()`` to ``extra_state``, the second gives
    it back to the criterion after loading."""
    signature = inspect.signature(load_checkpoint)

    @functools.wraps(state_dict)
    def new_state_dict(self):
        state = state_dict(self)
        criterion = self.get_criterion()
        if hasattr(criterion, "moe_state_dict") and isinstance(state.get("extra_state"), dict):
            state["extra_state"][EXTRA_STATE_KEY] = criterion.moe_state_dict()
        return state

    @functools.wraps(load_checkpoint)
    def new_load_checkpoint(self, *args, **kwargs):
        extra_state = load_checkpoint(self, *args, **kwargs)
        criterion = self.get_criterion()
        if not isinstance(extra_state, dict) or not hasattr(criterion, "load_moe_state_dict"):
            return extra_state
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("reset_lr_scheduler"):
            return extra_state
        itr = extra_state.get("train_iterator") or {}
        ended = itr.get("version", 1) >= 2 and itr.get("iterations_in_epoch") == 0
        criterion.load_moe_state_dict(
            extra_state.get(EXTRA_STATE_KEY),
            meters_loaded=not (ended or bound.arguments.get("reset_meters")),
            epoch_ended=ended,
        )
        return extra_state

    for new in (new_state_dict, new_load_checkpoint):
        new.__fairseq_moe_patched__ = True
        setattr(new, MARKER, True)
    return new_state_dict, new_load_checkpoint


def save_criterion_state_with_fairseq() -> None:
    """Apply ``with_criterion_state`` to fairseq's ``Trainer`` (idempotent). Installed after the
    sharded-checkpoint patches of the same methods (``fairseq_patches.PATCHES``), which it wraps."""
    from fairseq.trainer import Trainer

    if getattr(Trainer.state_dict, MARKER, False):
        return
    Trainer.state_dict, Trainer.load_checkpoint = with_criterion_state(
        Trainer.state_dict, Trainer.load_checkpoint
    )
