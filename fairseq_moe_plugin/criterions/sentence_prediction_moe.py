"""``sentence_prediction_moe``: fairseq's ``sentence_prediction`` (classification or regression,
with its GLUE metrics: accuracy, F1, Matthews correlation, Pearson/Spearman) plus the MoE
auxiliary losses (load balance, Switch Transformer eq. 4-6; router z-loss, ST-MoE eq. 5), the
routing metrics and the routing monitor, shared with the translation criterion
(``moe_criterion.py``).

fairseq's ``forward`` is reused as it is; the routing records are read from the model's output
through a forward hook. ``sample_size`` is the number of sentences, so the objective is
``task_loss / sentences + sum_layers (w_b * balance_l + w_z * z_l)``; with both weights 0 the
criterion is exactly fairseq's.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)

from .moe_aux import reduce_moe_metrics
from .moe_criterion import MoECriterionConfig, MoECriterionMixin


@dataclass
class SentencePredictionMoEConfig(SentencePredictionConfig, MoECriterionConfig):
    pass


@register_criterion("sentence_prediction_moe", dataclass=SentencePredictionMoEConfig)
class SentencePredictionMoECriterion(MoECriterionMixin, SentencePredictionCriterion):
    def __init__(self, cfg: SentencePredictionMoEConfig, task):
        super().__init__(cfg, task)
        self.init_moe(
            cfg.moe_balance_loss_weight,
            cfg.moe_z_loss_weight,
            cfg.moe_monitor_interval,
            cfg.moe_monitor_low_load,
            cfg.moe_monitor_high_load,
            cfg.moe_monitor_collapse_share,
            cfg.moe_balance_boost_factor,
            cfg.moe_balance_boost_max,
        )

    def forward(self, model, sample, reduce=True):
        outputs = []
        hook = model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        finally:
            hook.remove()
        loss, moe_logs = self.add_moe(model, outputs[-1], loss, sample_size, reduce=reduce)
        logging_output["loss"] = loss.data
        logging_output.update(moe_logs)
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        SentencePredictionCriterion.reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
