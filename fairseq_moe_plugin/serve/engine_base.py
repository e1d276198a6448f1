"""What every serving engine is: the options the command line sets, a batch's result, text
encoding, and the ``Engine`` base class that ``translation.TranslationEngine`` and
``classification.ClassificationEngine`` extend. ``engine.load_engine`` picks one of them for a
checkpoint (this module imports neither, so the engines and the loader import it, not each
other).

Text becomes tokens as in the recipes (examples/translation/prepare_data.py ``encode``): the
sentencepiece pieces, space-joined, looked up in the task's dictionary (``encode_line``, with
``</s>`` appended). Without ``--spm-model`` the text is taken as space-separated pieces already.

What an engine adds to fairseq's inference helpers: batches cut by padded size
(``max_batch_tokens``), and the routing of every batch (``routing.RoutingCollector``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .errors import invalid
from .routing import LayerRouting, RoutingCollector

logger = logging.getLogger("fairseq_moe_plugin.serve")


@dataclass
class EngineOptions:
    """What the command line sets (see fairseq_moe_cli/serve.py for the flags)."""

    data: str | None = None  # --data: the task's data folder (its dictionaries)
    spm_model: str | None = None  # --spm-model
    key_file: str | None = None  # --decrypt-key-file
    fallback_expert: int | None = None  # --moe-fallback-expert (None: the checkpoint's)
    device: str = "cpu"
    max_text_tokens: int = 256
    max_text_chars: int = 4096
    max_batch_tokens: int = 4096
    beam: int = 5
    max_beam: int = 16
    max_len_a: float | None = None  # None: the checkpoint's generation settings
    max_len_b: int | None = None
    engine: str = "torch"  # --engine: torch, or onnx (serve/onnx_translation.py)


@dataclass
class BatchResult:
    outputs: list  # one per item, in the order given
    tokens_out: int  # tokens generated (translation); 0 for classification
    routing: list[LayerRouting]


class TextEncoder:
    """Text -> space-separated pieces (sentencepiece when a model is given)."""

    def __init__(self, spm_model: str | None):
        self.sp = None
        if spm_model is not None:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(spm_model))

    @property
    def bpe_symbol(self) -> str | None:
        """What fairseq's ``Dictionary.string`` needs to turn pieces back into text."""
        return "sentencepiece" if self.sp is not None else None

    def pieces(self, text: str) -> str:
        if self.sp is None:
            return " ".join(text.split())
        return " ".join(self.sp.encode(text, out_type=str))


class Engine:
    """What both engines share: the model in eval mode, text encoding with length limits,
    batches cut to ``max_batch_tokens`` padded tokens, and the routing collector.

    Subclasses set ``kind`` and ``route`` and implement ``_run_chunk``."""

    kind = ""
    route = ""
    dictionary_sharing: dict | None = None  # what ``DictionaryPool.share`` did at load

    def __init__(self, model, task, cfg, options: EngineOptions, checkpoint: str):
        self.model = model
        self.task = task
        self.cfg = cfg
        self.options = options
        self.checkpoint = checkpoint
        self.text = TextEncoder(options.spm_model)
        self.device = torch.device(options.device)
        self.routing = RoutingCollector(model)

    # -- encoding (on the event loop: cheap, and errors belong to one request) --------------

    def _encode_line(self, dictionary, text: str, where: str) -> torch.Tensor:
        """The text as a 1-D long tensor of dictionary ids ending with ``</s>``; 422 when it is
        blank, too long, or not encodable."""
        if len(text) > self.options.max_text_chars:
            raise invalid(
                "text_too_long",
                f"{where} has {len(text)} characters; this server takes at most "
                f"{self.options.max_text_chars} (--max-text-chars)",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
            raise invalid("invalid_text", f"{where} is not valid Unicode: {e.reason}") from e
        pieces = self.text.pieces(text)
        if not pieces:
            raise invalid("empty_text", f"{where} is empty")
        return dictionary.encode_line(pieces, add_if_not_exist=False, append_eos=True).long()

    def check_length(self, tokens: torch.Tensor, limit: int, where: str) -> torch.Tensor:
        if tokens.numel() > limit:
            raise invalid(
                "text_too_long",
                f"{where} has {tokens.numel()} tokens (with the model's special tokens); this "
                f"server takes at most {limit} (--max-text-tokens and the model's maximum "
                "positions)",
            )
        return tokens

    # -- running (on the worker thread) ---------------------------------------------------

    def run(self, key, items: list[torch.Tensor]) -> BatchResult:
        """Run ``items`` (encoded inputs, all with the same batch ``key``) in chunks of at most
        ``max_batch_tokens`` padded tokens, shortest first; outputs in the order given."""
        order = sorted(range(len(items)), key=lambda i: items[i].numel())
        chunks, chunk = [], []
        for i in order:  # ascending length: item i is the longest of its chunk
            if chunk and (len(chunk) + 1) * items[i].numel() > self.options.max_batch_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(i)
        chunks += [chunk] if chunk else []
        outputs: list = [None] * len(items)
        tokens_out = 0
        try:
            for chunk in chunks:
                with torch.inference_mode():
                    results, produced = self._run_chunk(key, [items[j] for j in chunk])
                for j, result in zip(chunk, results, strict=True):
                    outputs[j] = result
                tokens_out += produced
        except Exception:
            self.routing.take()  # a failed batch's partial routing is not reported
            raise
        return BatchResult(outputs=outputs, tokens_out=tokens_out, routing=self.routing.take())

    def _run_chunk(self, key, items: list[torch.Tensor]) -> tuple[list, int]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What /healthz says about the model."""
        return {
            "kind": self.kind,
            "route": self.route,
            "checkpoint": os.path.basename(self.checkpoint),
            "moe_layers": dict(self.routing.num_experts),
        }
