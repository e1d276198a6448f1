"""``sentence_prediction_moe``: fairseq's ``sentence_prediction`` (classification or regression,
with its GLUE metrics: accuracy, F1, Matthews correlation, Pearson/Spearman) plus the MoE
auxiliary losses (load balance, Switch Transformer eq. 4-6; router z-loss, ST-MoE eq. 5), the
routing metrics and the routing monitor (``moe_criterion.py``).

``sample_size`` is the number of sentences, so the objective is
``task_loss / sentences + sum_layers (w_b * balance_l + w_z * z_l)``; with both weights 0 the
criterion is exactly fairseq's.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)

from .moe_criterion import MoECriterionConfig, MoECriterionMixin


@dataclass
class SentencePredictionMoEConfig(SentencePredictionConfig, MoECriterionConfig):
    pass


@register_criterion("sentence_prediction_moe", dataclass=SentencePredictionMoEConfig)
class SentencePredictionMoECriterion(MoECriterionMixin, SentencePredictionCriterion):
    def __init__(self, cfg: SentencePredictionMoEConfig, task):
        super().__init__(cfg, task)
        self.init_moe(cfg)
