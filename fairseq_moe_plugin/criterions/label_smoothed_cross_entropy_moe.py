"""``label_smoothed_cross_entropy_moe``: fairseq's label-smoothed cross-entropy plus the MoE
auxiliary losses (load balance, Switch Transformer eq. 4-6; router z-loss, ST-MoE eq. 5).

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

from .moe_aux import (
    MoELossConfig,
    moe_aux_loss,
    moe_logging_output,
    moe_records_of,
    reduce_moe_metrics,
)


@dataclass
class LabelSmoothedCrossEntropyMoECriterionConfig(
    LabelSmoothedCrossEntropyCriterionConfig, MoELossConfig
):
    pass


@register_criterion(
    "label_smoothed_cross_entropy_moe", dataclass=LabelSmoothedCrossEntropyMoECriterionConfig
)
class LabelSmoothedCrossEntropyMoECriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        moe_balance_loss_weight=0.01,
        moe_z_loss_weight=0.001,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if moe_balance_loss_weight < 0 or moe_z_loss_weight < 0:
            raise ValueError(
                "--moe-balance-loss-weight and --moe-z-loss-weight must be >= 0, got "
                f"{moe_balance_loss_weight} and {moe_z_loss_weight}"
            )
        self.moe_balance_loss_weight = moe_balance_loss_weight
        self.moe_z_loss_weight = moe_z_loss_weight

    def forward(self, model, sample, reduce=True):
        """fairseq's forward with the aux term added: ``loss = CE_sum + aux * sample_size``."""
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

        records = moe_records_of(net_output)
        aux = moe_aux_loss(records, self.moe_balance_loss_weight, self.moe_z_loss_weight)
        if records and (self.moe_balance_loss_weight > 0 or self.moe_z_loss_weight > 0):
            # With reduce=False the loss is per token: spread the batch's aux term evenly.
            loss = loss + aux * sample_size / (1 if reduce else loss.numel())

        logging_output = {
            "loss": loss.data if reduce else loss.data.sum(),
            "nll_loss": nll_loss.data if reduce else nll_loss.data.sum(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        logging_output.update(moe_logging_output(records, aux, sample_size))
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
