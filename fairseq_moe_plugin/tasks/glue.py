"""``moe_glue``: fairseq's ``sentence_prediction`` task on an official GLUE task directory.

    fairseq-train GLUE/MNLI --user-dir fairseq_moe_plugin --task moe_glue \
        --arch moe_roberta_base --criterion sentence_prediction_moe ...

The directory is read as distributed (``glue_data.py``), tokenised with a sentencepiece model
(given, or trained on the train split) and binarised once into a cache (``glue_cache.py``); no
separate preprocessing step. The number of classes, the ``<s>``/separator tokens and the
official validation metrics of the task (F1 for MRPC and QQP, Matthews correlation for CoLA,
Pearson and Spearman for STS-B, accuracy for the others) are set from the GLUE task. Splits keep
GLUE's names (``dev``, ``dev_matched``, ``dev_mismatched``, ``test``, ...); ``valid`` (fairseq's
default ``--valid-subset``) means the first dev split and ``valid1`` the second.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask
from omegaconf import open_dict

from .glue_cache import build_cache
from .glue_data import GlueFormatError, glue_task

logger = logging.getLogger(__name__)


@dataclass
class GlueTaskConfig(SentencePredictionConfig):
    moe_glue_task: Optional[str] = field(
        default=None,
        metadata={"help": "GLUE task name (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, "
                  "WNLI); default: the data directory's name"},
    )  # fmt: skip
    moe_glue_spm_model: Optional[str] = field(
        default=None,
        metadata={"help": "sentencepiece model to tokenise with; default: one trained on the "
                  "train split (cached)"},
    )  # fmt: skip
    moe_glue_spm_vocab_size: int = field(
        default=8000, metadata={"help": "vocabulary size of the trained sentencepiece model"}
    )
    moe_glue_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "where the binarised data goes; default: <data>/.moe_glue_cache"},
    )


@register_task("moe_glue", dataclass=GlueTaskConfig)
class GlueTask(SentencePredictionTask):
    def __init__(self, cfg, data_dictionary, label_dictionary, glue, cache: Path):
        super().__init__(cfg, data_dictionary, label_dictionary)
        self.glue = glue
        self.cache = cache

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        glue_dir = Path(cfg.data)
        if not glue_dir.is_dir():
            raise FileNotFoundError(f"GLUE task directory {glue_dir} does not exist")
        glue = glue_task(cfg.moe_glue_task or glue_dir.name)
        if bool(cfg.regression_target) != glue.is_regression:
            raise GlueFormatError(
                f"{glue.name} is {'regression' if glue.is_regression else 'classification'}: "
                + ("pass --regression-target" if glue.is_regression else "drop --regression-target")
            )
        cache = build_cache(glue_dir, glue, cfg.moe_glue_cache_dir or glue_dir / ".moe_glue_cache",
                            cfg.moe_glue_spm_model, cfg.moe_glue_spm_vocab_size)  # fmt: skip
        data_dict = cls.load_dictionary(str(cache / "input0" / "dict.txt"))
        with open_dict(cfg):
            cfg.num_classes = glue.num_classes
            if cfg.init_token is None:
                cfg.init_token = data_dict.bos()  # <s> starts every input, as in RoBERTa
            if (cache / "input1").is_dir() and cfg.separator_token is None:
                cfg.separator_token = data_dict.eos()  # </s> separates sentence pairs
        label_dict = (data_dict if glue.is_regression
                      else cls.load_dictionary(str(cache / "label" / "dict.txt")))  # fmt: skip
        logger.info(f"{glue.name}: {len(data_dict)} input types, cache {cache}")
        return cls(cfg, data_dict, label_dict, glue, cache)

    def resolve_split(self, split: str) -> str:
        """fairseq's ``valid``/``valid1`` -> the task's first/second dev split."""
        aliases = {"valid": 0, "valid1": 1}
        if split in aliases and aliases[split] < len(self.glue.dev_splits):
            return self.glue.dev_splits[aliases[split]]
        self.glue.columns(split)  # raises for a split the task does not have
        if not (self.cache / "input0" / f"{split}.bin").is_file():
            raise FileNotFoundError(
                f"{Path(self.cfg.data) / (split + '.tsv')}: missing {self.glue.name} {split} file"
            )
        return split

    def load_dataset(self, split, combine=False, **kwargs):
        name = self.resolve_split(split)
        with open_dict(self.cfg):
            data, self.cfg.data = self.cfg.data, str(self.cache)
            try:
                super().load_dataset(name, combine=combine, **kwargs)
            finally:
                self.cfg.data = data
        self.datasets[split] = self.datasets[name]
        return self.datasets[split]

    def row_ids(self, split: str) -> list[str]:
        """The GLUE ids of ``split``'s rows (what a submission file's ``index`` column holds)."""
        return (self.cache / f"{self.resolve_split(split)}.index").read_text().splitlines()

    def build_criterion(self, cfg):
        """Turn on the task's official validation metrics in fairseq's sentence_prediction."""
        criterion = super().build_criterion(cfg)
        wanted = set(self.glue.metrics)
        if hasattr(criterion, "keep_pred_and_targ"):
            criterion.report_mcc = criterion.report_mcc or "mcc" in wanted
            criterion.report_acc_and_f1 = criterion.report_acc_and_f1 or "f1" in wanted
            criterion.report_pearson_and_spearman = (
                criterion.report_pearson_and_spearman or "pearson" in wanted
            )
            criterion.keep_pred_and_targ = (
                criterion.report_mcc
                or criterion.report_acc_and_f1
                or criterion.report_pearson_and_spearman
            )
        return criterion
