"""Translation: beam search with fairseq's ``SequenceGenerator`` on one batch of source texts.

Multilingual checkpoints (``translation_multi_simple_epoch``) serve every target language of their
``--lang-pairs``. fairseq's task reads the pair from its arguments (``--source-lang`` and
``--target-lang``, fixed when it is set up); here the language tokens come from the task's own
data manager per batch instead, so one loaded model serves all its pairs:

- the encoder language token (``--encoder-langtok src|tgt``) is prepended to the source, as the
  task's ``src_dataset_tranform_func`` does (``PrependTokenDataset``);
- the decoder language token (``--decoder-langtok``) is the generation prefix, as the task's
  ``inference_step`` does, and is stripped from the output, as its ``build_generator`` does.

``--lang-tok-replacing-bos-eos`` checkpoints are refused at load time.
"""

from __future__ import annotations

import torch
from fairseq import utils
from fairseq.data import data_utils

from .engine_base import Engine, EngineOptions
from .errors import invalid


class TranslationEngine(Engine):
    """A translation model; batch key ``(source_lang, target_lang, beam)``."""

    kind = "translation"
    route = "/v1/translate"

    def __init__(self, model, task, cfg, options: EngineOptions, checkpoint: str):
        super().__init__(model, task, cfg, options, checkpoint)
        from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

        self.multilingual = isinstance(task, TranslationMultiSimpleEpochTask)
        self.src_langtok_spec = self.tgt_langtok_spec = None
        if self.multilingual:
            if getattr(task.args, "lang_tok_replacing_bos_eos", False):
                raise ValueError(
                    "checkpoints trained with --lang-tok-replacing-bos-eos are not served"
                )
            self.pairs = [tuple(p.split("-")) for p in task.lang_pairs]
            self.src_langtok_spec, self.tgt_langtok_spec = task.args.langtoks["main"]
            left_pad = task.args.left_pad_source
        else:
            self.pairs = [(task.cfg.source_lang, task.cfg.target_lang)]
            left_pad = task.cfg.left_pad_source
        self.left_pad = utils.eval_bool(str(left_pad))
        self.target_langs = sorted({tgt for _, tgt in self.pairs})
        self.src_dict, self.tgt_dict = task.source_dictionary, task.target_dictionary
        limit = utils.resolve_max_positions(task.max_positions(), model.max_positions())[0]
        self.max_tokens = min(options.max_text_tokens, limit)
        gen = cfg.generation
        self.max_len_a = options.max_len_a if options.max_len_a is not None else gen.max_len_a
        self.max_len_b = options.max_len_b if options.max_len_b is not None else gen.max_len_b
        self._generators = {}

    # -- request checks (event loop) ------------------------------------------------------

    def resolve_languages(self, target_lang: str | None, source_lang: str | None):
        """(source, target) of a request; 422 naming the languages this model has."""
        if target_lang is None:
            if len(self.target_langs) > 1:
                raise invalid(
                    "missing_target_lang",
                    f"target_lang is required: this model translates into {self.target_langs}",
                    target_langs=self.target_langs,
                )
            target_lang = self.target_langs[0]
        if target_lang not in self.target_langs:
            raise invalid(
                "unknown_target_lang",
                f"unknown target_lang {target_lang!r}: this model translates into "
                f"{self.target_langs}",
                target_langs=self.target_langs,
            )
        sources = sorted({src for src, tgt in self.pairs if tgt == target_lang})
        if source_lang is None:
            if len(sources) > 1:
                raise invalid(
                    "missing_source_lang",
                    f"source_lang is required: this model translates into {target_lang!r} from "
                    f"{sources}",
                    source_langs=sources,
                )
            source_lang = sources[0]
        if source_lang not in sources:
            raise invalid(
                "unknown_source_lang",
                f"unknown source_lang {source_lang!r} for target_lang {target_lang!r}: this "
                f"model translates into it from {sources}",
                source_langs=sources,
            )
        return source_lang, target_lang

    def check_beam(self, beam: int | None) -> int:
        beam = self.options.beam if beam is None else beam
        if not 1 <= beam <= self.options.max_beam:
            raise invalid(
                "beam_out_of_range",
                f"beam must be between 1 and {self.options.max_beam} (--max-beam), got {beam}",
            )
        return beam

    def encode(self, text: str, where: str, source_lang: str, target_lang: str) -> torch.Tensor:
        tokens = self._encode_line(self.src_dict, text, where)
        if self.src_langtok_spec:
            langtok = self.task.data_manager.get_encoder_langtok(
                source_lang, target_lang, self.src_langtok_spec
            )
            tokens = torch.cat([tokens.new_tensor([langtok]), tokens])
        return self.check_length(tokens, self.max_tokens, where)

    # -- generation (worker thread) -------------------------------------------------------

    def _generator(self, beam: int):
        if beam not in self._generators:
            from fairseq.sequence_generator import SequenceGenerator

            gen = self.cfg.generation
            self._generators[beam] = SequenceGenerator(
                [self.model],
                self.tgt_dict,
                beam_size=beam,
                max_len_a=self.max_len_a,
                max_len_b=self.max_len_b,
                min_len=getattr(gen, "min_len", 1),
                normalize_scores=not getattr(gen, "unnormalized", False),
                len_penalty=getattr(gen, "lenpen", 1.0),
                unk_penalty=getattr(gen, "unkpen", 0.0),
                no_repeat_ngram_size=getattr(gen, "no_repeat_ngram_size", 0),
            )
        return self._generators[beam]

    def _run_chunk(self, key, items: list[torch.Tensor]) -> tuple[list[str], int]:
        _, target_lang, beam = key
        pad, eos = self.src_dict.pad(), self.src_dict.eos()
        src_tokens = data_utils.collate_tokens(items, pad, eos, left_pad=self.left_pad)  # B x T
        sample = {
            "id": torch.arange(len(items)),
            "net_input": {
                "src_tokens": src_tokens.to(self.device),
                "src_lengths": torch.tensor([t.numel() for t in items], device=self.device),
            },
        }
        prefix, strip = None, set()
        if self.tgt_langtok_spec:
            langtok = self.task.data_manager.get_decoder_langtok(target_lang, self.tgt_langtok_spec)
            prefix = torch.full((len(items), 1), langtok, dtype=torch.long, device=self.device)
            strip = {langtok}
        hypos = self._generator(beam).generate([self.model], sample, prefix_tokens=prefix)
        texts, produced = [], 0
        for nbest in hypos:
            tokens = nbest[0]["tokens"].int().cpu()
            produced += sum(int(t) not in strip and int(t) != eos for t in tokens)
            texts.append(
                self.tgt_dict.string(
                    tokens, self.text.bpe_symbol, extra_symbols_to_ignore=strip or None
                )
            )
        return texts, produced

    def describe(self) -> dict:
        return {
            **super().describe(),
            "target_langs": self.target_langs,
            "lang_pairs": [f"{s}-{t}" for s, t in self.pairs],
            "beam": self.options.beam,
            "max_beam": self.options.max_beam,
        }
