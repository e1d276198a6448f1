"""What every ``*_moe`` criterion adds to its base criterion: the auxiliary losses, the routing
logging outputs, and the routing monitor (``moe_monitor.py``). A criterion mixes in
``MoECriterionMixin``, calls ``init_moe`` in ``__init__`` and ``add_moe`` in ``forward``."""

from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from .moe_aux import MoELossConfig, moe_aux_loss, moe_logging_output, moe_records_of
from .moe_monitor import HealthThresholds, RoutingMonitor


@dataclass
class MoEMonitorConfig(FairseqDataclass):
    moe_monitor_interval: int = field(
        default=100,
        metadata={
            "help": "check routing health on the expert loads summed over this many updates "
            "(and after each validation); 0 disables the training checks"
        },
    )
    moe_monitor_low_load: float = field(
        default=0.4,
        metadata={"help": "warn when an expert's share of its layer is below this / E"},
    )
    moe_monitor_high_load: float = field(
        default=2.0,
        metadata={"help": "warn when an expert's share of its layer is above this / E"},
    )
    moe_monitor_collapse_share: float = field(
        default=0.8,
        metadata={
            "help": "warn of a routing collapse when one expert takes more than this share of a "
            "layer's assignments (unused experts are a collapse too)"
        },
    )
    moe_balance_boost_factor: float = field(
        default=1.0,
        metadata={
            "help": "when > 1: at the end of an epoch in which every routing check found an "
            "imbalance, multiply the balance-loss weight by this factor (logged; not saved in "
            "checkpoints); 1 = off"
        },
    )
    moe_balance_boost_max: float = field(
        default=1.0,
        metadata={"help": "the balance-loss weight is never raised above this"},
    )


@dataclass
class MoECriterionConfig(MoELossConfig, MoEMonitorConfig):
    pass


class MoECriterionMixin:
    """Aux losses, routing logs and the routing monitor for a fairseq criterion."""

    def init_moe(
        self,
        moe_balance_loss_weight: float,
        moe_z_loss_weight: float,
        moe_monitor_interval: int,
        moe_monitor_low_load: float,
        moe_monitor_high_load: float,
        moe_monitor_collapse_share: float,
        moe_balance_boost_factor: float,
        moe_balance_boost_max: float,
    ) -> None:
        if moe_balance_loss_weight < 0 or moe_z_loss_weight < 0:
            raise ValueError(
                "--moe-balance-loss-weight and --moe-z-loss-weight must be >= 0, got "
                f"{moe_balance_loss_weight} and {moe_z_loss_weight}"
            )
        if moe_balance_boost_factor > 1 and moe_balance_boost_max <= moe_balance_loss_weight:
            raise ValueError(
                f"--moe-balance-boost-factor {moe_balance_boost_factor} can never act: "
                f"--moe-balance-boost-max ({moe_balance_boost_max}) must be above "
                f"--moe-balance-loss-weight ({moe_balance_loss_weight})"
            )
        self.moe_balance_loss_weight = moe_balance_loss_weight
        self.moe_z_loss_weight = moe_z_loss_weight
        self.moe_monitor = RoutingMonitor(
            interval=moe_monitor_interval,
            thresholds=HealthThresholds(
                low=moe_monitor_low_load,
                high=moe_monitor_high_load,
                collapse=moe_monitor_collapse_share,
            ),
            boost_factor=moe_balance_boost_factor,
            boost_max=moe_balance_boost_max,
        )
        self._moe_train_batches = 0  # fallback update counter for models without num_updates
        self._moe_epoch_meter_count = None

    def add_moe(self, model, net_output, loss, sample_size, reduce: bool = True):
        """Add the aux term to ``loss`` and feed the monitor; returns the loss and the routing
        logging outputs. With ``reduce=False`` (per-token losses) the batch's aux term is spread
        evenly over the elements."""
        records = moe_records_of(net_output)
        if model.training:
            self._moe_maybe_end_epoch()
            self._moe_train_batches += 1
            num_updates = getattr(model, "num_updates", None)
            if num_updates is None:
                num_updates = self._moe_train_batches - 1
        else:
            num_updates = 0
        self.moe_monitor.observe(records, training=model.training, num_updates=num_updates)

        aux = moe_aux_loss(records, self.moe_balance_loss_weight, self.moe_z_loss_weight)
        if records and (self.moe_balance_loss_weight > 0 or self.moe_z_loss_weight > 0):
            loss = loss + aux * sample_size / (1 if reduce else loss.numel())
        logs = moe_logging_output(records, aux, sample_size)
        if records and self.moe_monitor.boost_factor > 1:
            logs["moe_balance_weight_x_ss"] = self.moe_balance_loss_weight * sample_size
        return loss, logs

    def _moe_maybe_end_epoch(self) -> None:
        """Detect the start of a new training epoch: fairseq's ``train.py`` resets the epoch-level
        ``train`` meters (which hold ``moe_balance_loss``) when an epoch ends."""
        if self.moe_monitor.boost_factor <= 1:
            return
        meter = metrics.get_meter("train", "moe_balance_loss")
        count = getattr(meter, "count", None)
        if count is None:
            return
        previous, self._moe_epoch_meter_count = self._moe_epoch_meter_count, count
        if previous is not None and count < previous:
            self.moe_balance_loss_weight = self.moe_monitor.end_epoch(self.moe_balance_loss_weight)
