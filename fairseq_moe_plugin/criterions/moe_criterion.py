"""What every ``*_moe`` criterion adds to its fairseq base criterion: the auxiliary losses, the
routing metrics (``moe_metrics.py``), the routing monitor (``moe_monitor.py``), and a stop when
a router produces NaN or inf logits.

A criterion is ``class X(MoECriterionMixin, FairseqBaseCriterion)`` with a config that adds
``MoECriterionConfig`` to the base's. The base's ``forward`` runs unchanged; the mixin reads the
routing records from what the model returned to it (``net_output[1]["moe_records"]``), so the
losses are those of the forward whose graph the loss goes through, with activation checkpointing
too.

Loss scaling. fairseq divides gradients by ``sample_size`` (target tokens, sentences with
``--sentence-avg``, or sentences for classification), and a criterion's main loss is a *sum*
over the sample. The auxiliary losses are means over tokens (Switch Transformer eq. 4-6, ST-MoE
eq. 5), so they enter the summed loss multiplied by ``sample_size``; after fairseq's division the
objective is ``main_loss / sample_size + sum_layers (w_balance * balance_l + w_z * z_l)``,
independent of the batch size, as in the papers.
"""

from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from ..distributed.global_balance import (
    BALANCE_SCOPES,
    global_counts_of,
    global_scope_applies,
)
from ..modules.record import MoERecord
from ..modules.routing.losses import global_load_balance_loss
from ..modules.routing_buffers import gates_with, update_routing_buffers
from .criterion_state import boost_state, load_boost_state
from .moe_metrics import moe_logging_output, reduce_moe_metrics
from .moe_monitor import HealthThresholds, RoutingMonitor


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
    moe_balance_scope: ChoiceEnum(list(BALANCE_SCOPES)) = field(
        default="micro_batch",
        metadata={
            "help": "where the Switch balance loss counts the expert frequencies f_i: "
            "micro_batch (default): in each forward's own tokens; global: over the whole update, "
            "every micro-batch (--update-freq) on every data-parallel worker, before the product "
            "with the micro-batch's mean probabilities P_i (Qiu et al. 2025, global-batch LBL; "
            "W workers then equal one process with --update-freq W). With --update-freq > 1 the "
            "counts come from one more forward of each micro-batch first, not back-propagated "
            "(docs/distributed.md gives its measured cost); with --update-freq 1, from one all-reduce. Top-k "
            "layers with the switch loss only; validation uses micro_batch"
        },
    )


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
            "imbalance, multiply the balance-loss weight by this factor (logged; kept in "
            "checkpoints, so that a resumed run goes on with it); 1 = off"
        },
    )
    moe_balance_boost_max: float = field(
        default=1.0,
        metadata={"help": "the balance-loss weight is never raised above this"},
    )


@dataclass
class MoECriterionConfig(MoELossConfig, MoEMonitorConfig):
    pass


class RouterLogitsError(FloatingPointError):
    """A router produced NaN or inf logits: its routing, and every loss after it, is garbage."""


class _OutputTap:
    """The model as the base criterion sees it: calls go to the model and what they return is
    kept in ``outputs``; every other attribute is the model's. Nothing is set on the model."""

    def __init__(self, model):
        self._model = model
        self.outputs: list = []

    def __call__(self, *args, **kwargs):
        output = self._model(*args, **kwargs)
        self.outputs.append(output)
        return output

    def __getattr__(self, name):
        return getattr(self._model, name)


def records_in(net_output) -> list[MoERecord]:
    """The routing records a model put in its output (``net_output[1]["moe_records"]``)."""
    if isinstance(net_output, (tuple, list)) and len(net_output) > 1:
        extra = net_output[1]
        if isinstance(extra, dict):
            return list(extra.get("moe_records", []))
    return []


def _gate_buffers(model, option: str, buffer: str) -> dict[str, torch.Tensor]:
    """``{layer name: E}`` a copy of ``buffer`` of every gate with ``option`` on."""
    return {n: getattr(g, buffer).detach().clone() for n, g in gates_with(model, option).items()}


def usage_emas(model) -> dict[str, torch.Tensor]:
    """``{layer name: E}`` the usage EMA of every gate that keeps one (``--moe-usage-ema``)."""
    return _gate_buffers(model, "usage_ema_decay", "usage_ema")


def update_usage_emas(model, records: list[MoERecord]) -> dict[str, torch.Tensor]:
    """Fold a training batch's loads into the usage EMA of each layer's gate
    (``routing_buffers.update_routing_buffers``, the EMA only), and return the EMAs
    (``usage_emas``). Each worker updates its own copy from the batches it sees; a checkpoint
    holds the copy of the worker that saves it."""
    update_routing_buffers(model, records, options=("usage_ema_decay",))
    return usage_emas(model)


def balance_biases(model) -> dict[str, torch.Tensor]:
    """``{layer name: E}`` the selection bias of every gate that balances with one
    (``--moe-bias-balancing-rate``)."""
    return _gate_buffers(model, "bias_balancing_rate", "balance_bias")


def accumulate_balance_loads(model, records: list[MoERecord]) -> dict[str, torch.Tensor]:
    """Add a training batch's loads (the router's assignments before capacity) to each
    bias-balanced gate's ``balance_load`` (``routing_buffers.update_routing_buffers``, that
    buffer only), whose sum over the update the gate turns into one bias step when fairseq
    starts the next update (over all workers); return the biases."""
    update_routing_buffers(model, records, options=("bias_balancing_rate",))
    return balance_biases(model)


class MoECriterionMixin:
    """Aux losses, routing logs, the routing monitor and the NaN stop, for a fairseq criterion.
    ``__init__`` of the criterion calls ``init_moe(cfg)``."""

    def init_moe(self, cfg: MoECriterionConfig) -> None:
        weight, z_weight = cfg.moe_balance_loss_weight, cfg.moe_z_loss_weight
        if weight < 0 or z_weight < 0:
            raise ValueError(
                "--moe-balance-loss-weight and --moe-z-loss-weight must be >= 0, got "
                f"{weight} and {z_weight}"
            )
        if cfg.moe_balance_boost_factor > 1 and cfg.moe_balance_boost_max <= weight:
            raise ValueError(
                f"--moe-balance-boost-factor {cfg.moe_balance_boost_factor} can never act: "
                f"--moe-balance-boost-max ({cfg.moe_balance_boost_max}) must be above "
                f"--moe-balance-loss-weight ({weight})"
            )
        self.moe_balance_loss_weight = weight
        self.moe_z_loss_weight = z_weight
        self.moe_balance_scope = str(getattr(cfg, "moe_balance_scope", "micro_batch"))
        self.moe_monitor = RoutingMonitor(
            interval=cfg.moe_monitor_interval,
            thresholds=HealthThresholds(
                low=cfg.moe_monitor_low_load,
                high=cfg.moe_monitor_high_load,
                collapse=cfg.moe_monitor_collapse_share,
            ),
            boost_factor=cfg.moe_balance_boost_factor,
            boost_max=cfg.moe_balance_boost_max,
        )
        self._moe_train_batches = 0  # fallback update counter for models without num_updates
        self._moe_epoch_meter_count = None
        self._moe_configured_balance_weight = weight  # the boost starts from it

    def moe_state_dict(self) -> dict:
        """The balance boost's state, which fairseq checkpoints keep in ``extra_state``
        (``criterion_state.py``, where resuming is described)."""
        return boost_state(self)

    def load_moe_state_dict(self, state, meters_loaded: bool, epoch_ended: bool) -> bool:
        """Take back ``moe_state_dict``'s state (``criterion_state.load_boost_state``)."""
        return load_boost_state(self, state, meters_loaded=meters_loaded, epoch_ended=epoch_ended)

    def forward(self, model, sample, reduce=True):
        """The base criterion's forward, plus ``aux * sample_size`` in the loss and the routing
        metrics in the logging output."""
        tap = _OutputTap(model)
        loss, sample_size, logging_output = super().forward(tap, sample, reduce=reduce)
        records = [record for output in tap.outputs for record in records_in(output)]
        loss, moe_logs = self.add_moe(model, records, loss, sample_size, reduce, sample)
        logging_output["loss"] = loss.data if reduce else loss.data.sum()
        logging_output.update(moe_logs)
        return loss, sample_size, logging_output

    def moe_routing_counts(self, model, sample) -> dict[str, torch.Tensor]:
        """``{layer: E}`` the router's assignments (before capacity) of the layers the global
        balance scope applies to, in one forward of ``sample`` as training runs it (the base
        criterion's forward); no loss is added and no state (usage EMA, biases, monitor) moves.
        The global scope's pre-pass calls it (``distributed/global_balance.py``)."""
        tap = _OutputTap(model)
        super().forward(tap, sample)
        records = [record for output in tap.outputs for record in records_in(output)]
        return {r.layer: r.expert_counts_routed for r in records if global_scope_applies(r)}

    def balance_losses(self, model, records: list[MoERecord], sample) -> list[torch.Tensor]:
        """Each record's balance loss: its own (micro-batch), or with ``--moe-balance-scope
        global`` in training the Switch loss on the update's global expert counts
        (``global_balance.global_counts_of``)."""
        counts = None
        if self.moe_balance_scope == "global" and model.training and sample is not None:
            counts = global_counts_of(sample, records)
        if counts is None:
            return [r.balance_loss for r in records]
        return [
            global_load_balance_loss(r.probs, counts[r.layer]) if r.layer in counts
            else r.balance_loss
            for r in records
        ]  # fmt: skip

    def add_moe(
        self, model, records: list[MoERecord], loss, sample_size, reduce: bool = True, sample=None
    ):
        """Add the aux term to ``loss`` and feed the monitor; returns the loss and the routing
        logging outputs. With ``reduce=False`` (per-token losses) the batch's aux term is spread
        evenly over the elements. ``sample`` carries the global expert counts of the update
        under ``--moe-balance-scope global``."""
        num_updates = getattr(model, "num_updates", None)
        self._stop_on_nonfinite_logits(records, num_updates, model.training)
        if model.training:
            self._moe_maybe_end_epoch()
            self._moe_train_batches += 1
            if num_updates is None:
                num_updates = self._moe_train_batches - 1
        self.moe_monitor.observe(records, training=model.training, num_updates=num_updates or 0)

        if model.training:  # the one place a batch moves the routers' buffers
            update_routing_buffers(model, records)
        emas, biases = usage_emas(model), balance_biases(model)
        w_balance, w_z = self.moe_balance_loss_weight, self.moe_z_loss_weight
        balances = self.balance_losses(model, records, sample)
        terms = [w_balance * b + w_z * r.z_loss for r, b in zip(records, balances, strict=True)]
        aux = sum(terms[1:], terms[0]) if terms else torch.zeros(())
        if records and (w_balance > 0 or w_z > 0):
            loss = loss + aux * sample_size / (1 if reduce else loss.numel())
        logs = moe_logging_output(records, aux, sample_size, emas, biases, balances)
        if records and self.moe_monitor.boost_factor > 1:
            logs["moe_balance_weight_x_ss"] = w_balance * sample_size
        return loss, logs

    @staticmethod
    def _stop_on_nonfinite_logits(records, num_updates, training: bool) -> None:
        """Raise ``RouterLogitsError`` naming the first layer whose router logits were NaN or inf
        (one host sync per batch for all layers)."""
        if not records or bool(torch.stack([r.logits_finite for r in records]).all()):
            return
        bad = [r.layer for r in records if not bool(r.logits_finite)]
        when = f"update {num_updates}" if training else f"validation after update {num_updates}"
        raise RouterLogitsError(
            f"MoE layer {bad[0]}: router logits contain NaN or inf at {when}"
            + (f" (also in {', '.join(bad[1:])})" if len(bad) > 1 else "")
            + "; training stops, as top-k routing on them would be meaningless. Usual causes: a "
            "learning rate too high, fp16 overflow (try --bf16, or --fp16 with a lower "
            "--fp16-init-scale), or NaN already in the layer's input"
        )

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

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
