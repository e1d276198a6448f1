"""``label_smoothed_cross_entropy_moe``: fairseq's label-smoothed cross-entropy plus the MoE
auxiliary losses (load balance, Switch Transformer eq. 4-6; router z-loss, ST-MoE eq. 5), the
routing metrics and the routing monitor (``moe_criterion.py``).

``loss = CE_sum + sample_size * sum_layers (w_b * balance_l + w_z * z_l)``. With
``--moe-balance-loss-weight 0 --moe-z-loss-weight 0`` it is exactly fairseq's
``label_smoothed_cross_entropy`` (same loss, same gradients); the routing metrics are still
logged.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

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
    def __init__(self, cfg: LabelSmoothedCrossEntropyMoECriterionConfig, task):
        super().__init__(
            task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy
        )
        self.init_moe(cfg)
