"""Classification with a ``sentence_prediction`` checkpoint (``moe_roberta`` and its head).

Inputs are encoded as fairseq's ``sentence_prediction`` task builds them in ``load_dataset``:
``<init_token> a </s>`` for one text, and ``<init_token> a </s> <separator_token> b </s>`` for a
pair (``input0``, then ``input1`` prepended with the separator, concatenated), padded on the
right. A checkpoint whose data folder has ``input1/`` was trained on pairs and takes pairs only;
one without takes single texts only. The head's classes are the label dictionary's symbols after
its specials, as ``OffsetTokensDataset`` maps them in the task.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fairseq.data import data_utils

from .engine_base import Engine, EngineOptions
from .errors import invalid


class ClassificationEngine(Engine):
    """A classifier; one batch key (``"classify"``)."""

    kind = "classification"
    route = "/v1/classify"

    def __init__(self, model, task, cfg, options: EngineOptions, checkpoint: str):
        super().__init__(model, task, cfg, options, checkpoint)
        if getattr(task.cfg, "regression_target", False):
            raise ValueError("regression checkpoints (--regression-target) are not served")
        self.head = getattr(cfg.criterion, "classification_head_name", None) or next(
            iter(model.classification_heads)
        )
        if self.head not in model.classification_heads:
            raise ValueError(
                f"it has no classification head {self.head!r} (it has "
                f"{sorted(model.classification_heads)})"
            )
        num_classes = model.classification_heads[self.head].out_proj.out_features
        labels = task.label_dictionary
        self.labels = [labels[labels.nspecial + i] for i in range(num_classes)]
        self.dictionary = task.source_dictionary
        self.init_token = task.cfg.init_token
        self.separator_token = task.cfg.separator_token
        self.pairs = (Path(str(task.cfg.data).split(":")[0]) / "input1").is_dir()
        self.max_tokens = min(options.max_text_tokens, model.max_positions())

    def encode(self, text, where: str) -> torch.Tensor:
        """``text``: a string, or a pair ``[a, b]`` for a pair model (already type-checked)."""
        is_pair = isinstance(text, list | tuple)
        if is_pair != self.pairs:
            raise invalid(
                "wrong_input_form",
                f"{where}: this classifier takes "
                + ("sentence pairs [text_a, text_b]" if self.pairs else "single texts (strings)"),
            )
        parts = list(text) if is_pair else [text]
        tokens = []
        for n, part in enumerate(parts):
            piece_where = f"{where}[{n}]" if is_pair else where
            encoded = self._encode_line(self.dictionary, part, piece_where)
            prefix = self.init_token if n == 0 else self.separator_token
            if prefix is not None:
                encoded = torch.cat([encoded.new_tensor([prefix]), encoded])
            tokens.append(encoded)
        return self.check_length(torch.cat(tokens), self.max_tokens, where)

    def _run_chunk(self, key, items: list[torch.Tensor]) -> tuple[list[dict], int]:
        pad = self.dictionary.pad()
        src_tokens = data_utils.collate_tokens(items, pad, left_pad=False)  # B x T
        logits, _ = self.model(
            src_tokens.to(self.device),
            features_only=True,
            classification_head_name=self.head,
        )  # B x classes
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        results = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "label": self.labels[best],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
            )
        return results, 0

    def describe(self) -> dict:
        return {**super().describe(), "labels": self.labels, "pairs": self.pairs}
