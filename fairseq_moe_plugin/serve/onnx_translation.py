"""Translation served from an ONNX export folder (``fairseq-moe-serve --engine onnx``).

``load_onnx_engine`` reads the folder ``fairseq-moe-export-onnx --part translation`` writes
(``deploy/onnx_generate.py``: three graphs, the dictionaries, ``manifest.json``), rebuilds the
task from it without the PyTorch weights, and returns ``OnnxTranslationEngine``: the torch
engine's request checks, batching and fairseq ``SequenceGenerator`` (``translation.py``), with
the onnxruntime-backed model in place of the PyTorch one. What it cannot give: live routing
statistics. The experts run inside the graphs, so no ``MoELayer`` forward hook fires; the model it
hands to the ``RoutingCollector`` has no MoE layer, the ``/metrics`` routing series are absent,
and ``/healthz`` says ``"engine": "onnx"`` with the exported model's MoE layers and
``"routing": "not observed"``.
"""

from __future__ import annotations

import logging

import torch

from .engine_base import EngineOptions
from .translation import TranslationEngine

logger = logging.getLogger("fairseq_moe_plugin.serve")

ROUTING_NOTE = "not observed: the experts run inside the ONNX graphs"


class OnnxTranslationEngine(TranslationEngine):
    """``TranslationEngine`` over ``onnx_generate.OnnxTranslationModel``."""

    def __init__(self, model, task, cfg, options: EngineOptions, path: str, manifest: dict):
        super().__init__(model, task, cfg, options, path)
        self.manifest = manifest

    def describe(self) -> dict:
        return {
            **super().describe(),
            "engine": "onnx",
            "moe_op": self.manifest.get("moe_op"),
            "exported_moe_layers": dict(self.manifest["model"].get("moe_layers", {})),
            "routing": ROUTING_NOTE,
        }


def _check_options(path: str, options: EngineOptions) -> None:
    """ValueError naming the option the ONNX engine cannot honour."""
    if str(options.device) != "cpu":
        raise ValueError(f"{path}: the ONNX engine runs on onnxruntime's CPU provider; got "
                         f"--device {options.device}")  # fmt: skip
    if options.fallback_expert is not None:
        raise ValueError(f"{path}: --moe-fallback-expert is fixed in the graphs at export time; "
                         "re-export the checkpoint with the override instead")  # fmt: skip
    if options.key_file is not None:
        raise ValueError(f"{path}: ONNX export folders are not encrypted; --decrypt-key-file "
                         "does not apply")  # fmt: skip


def load_onnx_engine(path: str, options: EngineOptions) -> OnnxTranslationEngine:
    """The engine of the export folder ``path``; onnxruntime gets as many intra-op threads as
    torch has (``--threads``). ``options.data`` is not read: the folder holds the dictionaries.

    Raises ``onnx_generate.OnnxFolderError`` (a ValueError) naming the file when the folder is
    incomplete or its manifest malformed, ValueError for options it cannot honour."""
    from fairseq_moe_plugin.deploy.onnx_generate import OnnxFolderError, load_onnx_model

    _check_options(path, options)
    if options.data is not None:
        logger.info("--data %s is not read: %s holds the dictionaries", options.data, path)
    model, task, cfg, manifest = load_onnx_model(path, threads=torch.get_num_threads())
    try:
        engine = OnnxTranslationEngine(model, task, cfg, options, str(path), manifest)
    except ValueError as err:
        raise OnnxFolderError(f"{path}: cannot serve it: {err}") from err
    logger.info("loaded ONNX export %s (%s, MoE layers: %s; routing not observed)", path,
                manifest.get("checkpoint"), ", ".join(manifest["model"].get("moe_layers", {})))  # fmt: skip
    return engine
