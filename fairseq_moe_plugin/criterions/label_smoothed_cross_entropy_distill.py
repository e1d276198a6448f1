"""``label_smoothed_cross_entropy_distill``: ``label_smoothed_cross_entropy_moe`` plus word-level
knowledge distillation from a frozen teacher checkpoint (an MoE teacher into a dense student, or
any teacher with the student's dictionaries; ``teacher.py`` loads and checks it).

The loss, summed over the non-padding target tokens t of the batch (as fairseq's criteria sum):

    loss = (1 - alpha) * LS_CE + alpha * T^2 * KD + sample_size * aux

    LS_CE = sum_t label-smoothed cross-entropy with the reference token (fairseq's
            ``label_smoothed_nll_loss``, Szegedy et al. 2016)
    KD    = sum_t KL(p_teacher^T(. | t) || p_student^T(. | t))
          = sum_t sum_v p_teacher^T(v) (log p_teacher^T(v) - log p_student^T(v))
    p^T   = softmax(z / T)        the soft targets of Hinton et al. 2015, eq. 1
    aux   = the MoE auxiliary losses of a student that is itself MoE (``moe_criterion.py``)

- Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network": eq. 1 (softmax at
  temperature T for both teacher and student); eq. 2-3: the soft-target gradients scale as
  1/T^2, hence the T^2 factor, so that changing T leaves the relative weight of the two terms
  as alpha sets it.
- Kim & Rush 2016, "Sequence-Level Knowledge Distillation": sec. 2.2, the interpolation
  ``L = (1 - alpha) L_NLL + alpha L_KD``; sec. 3.1, word-level KD, the cross-entropy with the
  teacher's distribution at every target position given the reference prefix (teacher forcing
  on the reference, as here). KL is that cross-entropy minus the teacher's entropy, a constant
  for the student: same gradients, and KD = 0 when the student matches the teacher.

With ``--kd-alpha 0`` the loss is exactly ``label_smoothed_cross_entropy_moe``'s (same value,
same gradients: the KD term is computed and logged but not added). Sequence-level KD (Kim &
Rush sec. 3.2) needs no criterion: train on the teacher's translations
(``examples/translation/distill.py``).

Logged: ``kd_loss`` (KD / target tokens, at temperature T, base 2 like ``nll_loss``) beside
``loss``, ``nll_loss`` and the routing metrics.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from .moe_criterion import MoECriterionConfig, MoECriterionMixin
from .teacher import Teacher


@dataclass
class DistillConfig(LabelSmoothedCrossEntropyCriterionConfig, MoECriterionConfig):
    teacher_path: Optional[str] = field(  # noqa: UP045  (fairseq parses typing.Optional)
        default=None,
        metadata={
            "help": "the teacher's checkpoint (required); loaded once, frozen, in eval mode, not "
            "saved in the student's checkpoints. Its dictionaries must be the student's and its "
            "eval routing batch-independent (no expert choice, --moe-eval-capacity-factor 0)"
        },
    )
    teacher_data: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "the teacher's data folder (its dictionaries) when it is no longer where "
            "the teacher was trained; default: the folder saved in its checkpoint"
        },
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={
            "help": "distillation temperature T > 0: teacher and student distributions are "
            "softmax(logits / T) in the KD term, which is scaled by T^2 (Hinton et al. 2015)"
        },
    )
    kd_alpha: float = field(
        default=0.5,
        metadata={
            "help": "weight alpha in [0, 1] of the KD term: loss = (1 - alpha) * label-smoothed "
            "CE + alpha * T^2 * KL(teacher || student) (Kim & Rush 2016, word-level KD); 0 = "
            "label_smoothed_cross_entropy_moe exactly (KD still logged)"
        },
    )


def check_kd_options(temperature: float, alpha: float) -> None:
    """Raise ValueError naming the flag when the temperature or the weight is out of range."""
    if not temperature > 0:
        raise ValueError(f"--kd-temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"--kd-alpha must be in [0, 1], got {alpha}")


def word_kd_loss(student_logits, teacher_logits, target, temperature: float, padding_idx: int,
                 reduce: bool = True):  # fmt: skip
    """KL(p_teacher^T || p_student^T) per target token, zero at padding; summed when ``reduce``
    (else N x 1, N = B * T, like ``label_smoothed_nll_loss``). Logits are N x V; fp32 math."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # N x V
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # N x V
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1, keepdim=True)  # N x 1
    kl = kl.masked_fill(target.unsqueeze(-1).eq(padding_idx), 0.0)
    return kl.sum() if reduce else kl


class LabelSmoothedCrossEntropyKD(LabelSmoothedCrossEntropyCriterion):
    """fairseq's label-smoothed cross-entropy with the word-level KD term (not registered: the
    registered criterion adds the MoE mixin on top, as ``label_smoothed_cross_entropy_moe``
    does; the forward follows ``label_smoothed_cross_entropy_with_alignment``'s)."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy,
                 teacher: Teacher, temperature: float, alpha: float):  # fmt: skip
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        check_kd_options(temperature, alpha)
        self.teacher = teacher  # a plain object: no parameters, no state_dict entries
        self.kd_temperature = temperature
        self.kd_alpha = alpha

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        ls_loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        kd_loss = self.compute_kd_loss(model, net_output, sample, reduce=reduce)
        t, alpha = self.kd_temperature, self.kd_alpha
        loss = ls_loss if alpha == 0 else (1 - alpha) * ls_loss + alpha * t * t * kd_loss
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "kd_loss": kd_loss.data if reduce else kd_loss.data.sum(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.item()
            logging_output["total"] = total.item()
        return loss, sample_size, logging_output

    def compute_kd_loss(self, model, net_output, sample, reduce=True):
        """The KD term of the student's ``net_output`` (``word_kd_loss``), with the teacher run
        on the same ``net_input`` (reference prefix)."""
        if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None:
            raise ValueError("label_smoothed_cross_entropy_distill: the student uses an "
                             "adaptive softmax, whose logits are not a full distribution")  # fmt: skip
        student = net_output[0]  # B x T x V
        teacher = self.teacher.logits(sample["net_input"], like=student)  # B x T x V
        if teacher.shape != student.shape:
            raise ValueError(
                f"--teacher-path {self.teacher.path}: teacher logits {tuple(teacher.shape)} and "
                f"student logits {tuple(student.shape)} differ in shape (B x T x V)"
            )
        target = model.get_targets(sample, net_output)  # B x T
        if self.ignore_prefix_size > 0:
            student = student[:, self.ignore_prefix_size :, :]
            teacher = teacher[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        vocab = student.size(-1)
        return word_kd_loss(student.reshape(-1, vocab), teacher.reshape(-1, vocab),
                            target.reshape(-1), self.kd_temperature, self.padding_idx,
                            reduce=reduce)  # fmt: skip

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        kd_sum = sum(log.get("kd_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        if ntokens > 0:
            metrics.log_scalar("kd_loss", kd_sum / ntokens / math.log(2), ntokens, round=3)


@register_criterion("label_smoothed_cross_entropy_distill", dataclass=DistillConfig)
class LabelSmoothedCrossEntropyDistillCriterion(MoECriterionMixin, LabelSmoothedCrossEntropyKD):
    def __init__(self, cfg: DistillConfig, task):
        check_kd_options(cfg.kd_temperature, cfg.kd_alpha)  # before the teacher is loaded
        super().__init__(
            task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size,
            cfg.report_accuracy, Teacher.load(cfg.teacher_path, task, cfg.teacher_data),
            cfg.kd_temperature, cfg.kd_alpha,
        )  # fmt: skip
        self.init_moe(cfg)
