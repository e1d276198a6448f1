"""The model side of the server: load one checkpoint, encode texts, run batches.

``load_engine`` loads the checkpoint with ``fairseq_moe_plugin.checkpoint_io`` (fairseq's
``load_model_ensemble_and_task`` on the plugin's weights-only state, encrypted files decrypted in
memory) and picks the engine from what it holds: a translation model (``translation`` or
``translation_multi_simple_epoch``) -> ``TranslationEngine`` (``translation.py``); a model with a
classification head and a task with a label dictionary (``sentence_prediction``) ->
``ClassificationEngine`` (``classification.py``).

Text becomes tokens as in the recipes (examples/translation/prepare_data.py ``encode``): the
sentencepiece pieces, space-joined, looked up in the task's dictionary (``encode_line``, with
``</s>`` appended). Without ``--spm-model`` the text is taken as space-separated pieces already.

What an engine adds to fairseq's inference helpers: batches cut by padded size
(``max_batch_tokens``), and the routing of every batch (``routing.RoutingCollector``).
"""

from __future__ import annotations

import logging
import os

from .engine_base import BatchResult, Engine, EngineOptions, TextEncoder

__all__ = ["BatchResult", "Engine", "EngineOptions", "TextEncoder", "load_engine"]

logger = logging.getLogger("fairseq_moe_plugin.serve")


def load_engine(checkpoint: str, options: EngineOptions, dictionaries=None) -> Engine:
    """Load ``checkpoint`` and return the engine for its kind (``options.engine``: ``torch``,
    or ``onnx``, which ``onnx_translation.load_onnx_engine`` loads).

    ``dictionaries``: a ``dictionaries.DictionaryPool``; the task's and model's dictionaries
    are replaced by the pool's equal ones before the engine is built (one copy across versions).

    Raises ``checkpoint_io.CheckpointError`` (a ValueError) naming the file when it cannot be
    loaded or is neither a translation nor a classification model."""
    from fairseq_moe_plugin.checkpoint_io import CheckpointError, load_model_ensemble_and_task

    if options.engine == "onnx":
        try:
            from .onnx_translation import load_onnx_engine
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.onnx_translation":
                raise
            raise CheckpointError(
                f"{checkpoint}: engine onnx is not available in this installation "
                f"({__package__}.onnx_translation is missing): serve it with engine torch"
            ) from e
        return load_onnx_engine(checkpoint, options)
    if options.engine != "torch":
        raise CheckpointError(f"{checkpoint}: unknown engine {options.engine!r} (torch, onnx)")
    if os.path.isdir(checkpoint):
        raise CheckpointError(
            f"{checkpoint}: is a folder, not a checkpoint file: an ONNX export folder "
            "(fairseq-moe-export-onnx --part translation) is served with engine onnx"
        )

    overrides: dict = {}
    if options.data is not None:
        overrides["data"] = str(options.data)
    if options.fallback_expert is not None:
        overrides["moe_fallback_expert"] = options.fallback_expert
    models, cfg, task = load_model_ensemble_and_task(
        checkpoint, key_file=options.key_file, arg_overrides=overrides or None
    )
    model = models[0].eval().to(options.device)
    sharing = dictionaries.share(task, model) if dictionaries is not None else None
    from fairseq.tasks.translation import TranslationTask
    from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

    try:
        if isinstance(task, TranslationTask | TranslationMultiSimpleEpochTask):
            from .translation import TranslationEngine

            engine = TranslationEngine(model, task, cfg, options, checkpoint)
        elif getattr(model, "classification_heads", None) and hasattr(task, "label_dictionary"):
            from .classification import ClassificationEngine

            engine = ClassificationEngine(model, task, cfg, options, checkpoint)
        else:
            raise ValueError(
                f"its task is {type(task).__name__} and its model {type(model).__name__}: the "
                "server takes a translation model (task translation or "
                "translation_multi_simple_epoch) or a classifier (a model with a "
                "classification head, task sentence_prediction)"
            )
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: cannot serve it: {e}") from e
    engine.dictionary_sharing = sharing
    logger.info(
        "loaded %s (%s, %s, MoE layers: %s)",
        checkpoint,
        engine.kind,
        type(model).__name__,
        ", ".join(f"{n} ({e} experts)" for n, e in engine.routing.num_experts.items()),
    )
    return engine
