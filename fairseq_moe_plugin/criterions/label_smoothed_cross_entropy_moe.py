"""``label_smoothed_cross_entropy_moe``: fairseq's label-smoothed cross-entropy plus the MoE
auxiliary losses (load balance, Switch Transformer eq. 4-6; router z-loss, ST-MoE eq. 5), the
routing metrics and the routing monitor (``moe_criterion.py``).

With ``--moe-balance-loss-weight 0 --moe-z-loss-weight 0`` it is exactly fairseq's
``label_smoothed_cross_entropy`` (same loss, same gradients); the routing metrics are still
logged.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from .moe_aux import reduce_moe_metrics
from .moe_criterion import MoECriterionConfig, MoECriterionMixin


@dataclass
class LabelSmoothedCrossEntropyMoECriterionConfig(
    LabelSmoothedCrossEntropyCriterionConfig, MoECriterionConfig
):
    pass


@register_criterion(
    "label_smoothed_cross_entropy_moe", dataclass=LabelSmoothedCrossEntropyMoECriterionConfig
)
class LabelSmoothedCrossEntropyMoECriterion(MoECriterionMixin, LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        moe_balance_loss_weight=0.01,
        moe_z_loss_weight=0.001,
        moe_monitor_interval=100,
        moe_monitor_low_load=0.4,
        moe_monitor_high_load=2.0,
        moe_monitor_collapse_share=0.8,
        moe_balance_boost_factor=1.0,
        moe_balance_boost_max=1.0,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.init_moe(
            moe_balance_loss_weight,
            moe_z_loss_weight,
            moe_monitor_interval,
            moe_monitor_low_load,
            moe_monitor_high_load,
            moe_monitor_collapse_share,
            moe_balance_boost_factor,
            moe_balance_boost_max,
        )

    def forward(self, model, sample, reduce=True):
        """fairseq's forward with the aux term added: ``loss = CE_sum + aux * sample_size``."""
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        loss, moe_logs = self.add_moe(model, net_output, loss, sample_size, reduce=reduce)

        logging_output = {
            "loss": loss.data if reduce else loss.data.sum(),
            "nll_loss": nll_loss.data if reduce else nll_loss.data.sum(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        logging_output.update(moe_logs)
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.data
            logging_output["total"] = total.data
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
