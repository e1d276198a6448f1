"""A translation model served from ONNX: the export folder, and an onnxruntime-backed model that
fairseq's own ``SequenceGenerator`` drives.

The folder ``export_translation`` writes::

    encoder.onnx       src_tokens B x S, src_lengths B -> encoder_out S x B x C, padding mask
    cross_kv.onnx      encoder_out -> each decoder layer's cross-attention keys/values
    decoder_step.onnx  one token + caches -> logits, grown self-attention caches (onnx_decoder)
    dict.*.txt         the task's dictionaries (copied from its data folder)
    manifest.json      format, graph files, cache shapes, the task and generation settings

``load_onnx_model`` rebuilds the task from the folder alone (``tasks.setup_task`` on the saved
task settings with ``data`` pointing at the folder; no PyTorch weights are read) and returns an
``OnnxTranslationModel``: a ``FairseqEncoderDecoderModel`` whose encoder runs ``encoder.onnx``
and ``cross_kv.onnx`` once per batch, and whose ``FairseqIncrementalDecoder`` runs
``decoder_step.onnx`` once per step, keeping the self-attention caches in fairseq's
``incremental_state``. What this adds to fairseq: beam reordering outside the graph, as
index-selects of the cache arrays in ``reorder_incremental_state`` / ``reorder_encoder_out``, so
that beam search, length penalty, min/max length, prefix tokens and ``get_normalized_probs``
(log-softmax of the logits) are ``SequenceGenerator``'s own, unchanged.
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder

FORMAT = "fairseq-moe-onnx-translation"
VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("encoder", "cross_kv", "decoder_step")


class OnnxFolderError(ValueError):
    """An export folder that is missing a file or whose manifest is malformed."""


def _jsonable(value):
    """``value`` if JSON can hold it (tuples as lists), else ``_SKIP``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    return _SKIP


_SKIP = object()


def _section(cfg_section) -> dict:
    """A config section (a DictConfig or, for legacy tasks and models, a Namespace) as JSON."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_section, DictConfig):
        raw = OmegaConf.to_container(cfg_section, resolve=True, enum_to_str=True)
    else:
        raw = dict(vars(cfg_section))
    return {k: v for k, v in ((k, _jsonable(v)) for k, v in raw.items()) if v is not _SKIP}


def export_translation(model, task, cfg, folder, moe_op: str = "plain",
                       checkpoint: str = "") -> dict:  # fmt: skip
    """Write the folder (module doc) for ``model`` and ``task``; returns the manifest."""
    from fairseq import utils

    from fairseq_moe_plugin.modules.moe_layer import MoELayer

    from . import onnx_decoder
    from .onnx_export import check_fp32, model_kind

    if model_kind(model) != "translation":
        raise onnx_decoder.ExportError(f"--part translation needs a translation model, not "
                                       f"{type(model).__name__}")  # fmt: skip
    check_fp32(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task_cfg = _section(cfg.task)
    left_pad = utils.eval_bool(str(task_cfg.get("left_pad_source", True)))
    files = {"encoder": onnx_decoder.export_encoder_graph(model, folder, left_pad, moe_op)}
    files.update(onnx_decoder.export_decoder_graphs(model, folder, moe_op))
    data = Path(utils.split_paths(str(task_cfg.get("data", ".")))[0])
    dictionaries = sorted(p.name for p in data.glob("dict*.txt"))
    if not dictionaries:
        raise FileNotFoundError(f"no dict*.txt in the task's data folder {data}: give --data")
    for name in dictionaries:
        shutil.copyfile(data / name, folder / name)
    layers, heads, head_dim = onnx_decoder.layer_shapes(model)
    manifest = {
        "format": FORMAT, "version": VERSION, "files": files, "dictionaries": dictionaries,
        "checkpoint": Path(checkpoint).name, "moe_op": moe_op,
        "model": {"class": type(model).__name__, "decoder_layers": layers, "heads": heads,
                  "head_dim": head_dim, "padding_idx": int(model.decoder.padding_idx),
                  "max_source_positions": int(model.encoder.max_source_positions),
                  "max_target_positions": int(model.decoder.max_target_positions),
                  "moe_layers": {m.name: int(m.num_experts) for m in model.modules()
                                 if isinstance(m, MoELayer)}},
        "task_is_namespace": isinstance(cfg.task, Namespace), "task": task_cfg,
        "generation": _section(cfg.generation),
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder) -> dict:
    """The folder's manifest, checked: OnnxFolderError naming the file and what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise OnnxFolderError(f"{folder}: not an ONNX export folder (no such directory)")
    if not path.is_file():
        raise OnnxFolderError(f"{path}: missing; export the model with fairseq-moe-export-onnx "
                              "--part translation")  # fmt: skip
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OnnxFolderError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OnnxFolderError(f"{path}: not a {FORMAT} manifest (its 'format' is "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")  # fmt: skip
    if manifest.get("version") != VERSION:
        raise OnnxFolderError(f"{path}: version {manifest.get('version')!r}, this code reads "
                              f"version {VERSION}")  # fmt: skip
    for key, kind in (("files", dict), ("dictionaries", list), ("model", dict), ("task", dict),
                      ("generation", dict)):  # fmt: skip
        if not isinstance(manifest.get(key), kind):
            raise OnnxFolderError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    for key in ("decoder_layers", "heads", "head_dim", "padding_idx", "max_source_positions",
                "max_target_positions"):  # fmt: skip
        if not isinstance(manifest["model"].get(key), int):
            raise OnnxFolderError(f"{path}: model.{key} is missing or not an integer")
    names = [manifest["files"].get(g) for g in GRAPHS] + list(manifest["dictionaries"])
    for graph, name in zip(GRAPHS, names, strict=False):
        if not isinstance(name, str):
            raise OnnxFolderError(f"{path}: files.{graph} is missing")
    for name in names:
        if not (folder / str(name)).is_file():
            raise OnnxFolderError(f"{folder / str(name)}: missing from the export folder")
    return manifest


def rebuild_task(folder, manifest: dict):
    """(task, cfg) from the manifest, with the task's data folder the export folder; cfg has
    ``task``, ``generation`` and ``model`` as the engine reads them."""
    from fairseq import tasks
    from omegaconf import OmegaConf

    import fairseq_moe_plugin  # noqa: F401  (registers the plugin's tasks)

    settings = dict(manifest["task"], data=str(Path(folder).resolve()))
    if manifest.get("task_is_namespace", False):
        task_cfg = Namespace(**settings)
    else:
        task_cfg = OmegaConf.create(settings)
    try:
        task = tasks.setup_task(task_cfg)
    except (KeyError, AttributeError, FileNotFoundError, AssertionError) as err:
        raise OnnxFolderError(f"{Path(folder) / MANIFEST}: cannot set up its task "
                              f"({type(err).__name__}: {err})") from err  # fmt: skip
    cfg = Namespace(task=task_cfg, generation=OmegaConf.create(manifest["generation"]),
                    model=OmegaConf.create(manifest["model"]))  # fmt: skip
    return task, cfg


def _run(session, feeds: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in session.run(None, feeds)]


def _index(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, order.to(t.device))


class OnnxEncoder(FairseqEncoder):
    """``encoder.onnx`` then ``cross_kv.onnx``; fairseq's encoder_out dict plus ``cross_kv``
    (per layer k, v: B x H x S x D)."""

    def __init__(self, dictionary, encoder_session, cross_session, max_positions: int):
        super().__init__(dictionary)
        self.encoder_session, self.cross_session = encoder_session, cross_session
        self.max_source_positions = max_positions

    def forward(self, src_tokens, src_lengths=None, **kwargs):
        tokens = src_tokens.long().cpu().contiguous().numpy()  # B x S
        lengths = src_tokens.ne(self.dictionary.pad()).sum(dim=1).cpu().numpy()
        enc, pad = _run(self.encoder_session, {"src_tokens": tokens, "src_lengths": lengths})
        cross = _run(self.cross_session, {"encoder_out": enc.numpy()})
        return {"encoder_out": [enc], "encoder_padding_mask": [pad], "encoder_embedding": [],
                "encoder_states": [], "src_tokens": [], "src_lengths": [], "cross_kv": cross}  # fmt: skip

    def reorder_encoder_out(self, encoder_out, new_order):
        """Index-select every batch-first array (encoder_out is S x B x C). The cross keys and
        values are left as they are when the batch size does not change: beam search only
        reorders hypotheses of the same sentence then, whose rows are equal (fairseq's
        ``MultiheadAttention.reorder_incremental_state`` skips them alike)."""
        cross = encoder_out["cross_kv"]
        if cross and cross[0].size(0) != new_order.numel():
            cross = [_index(t, new_order) for t in cross]
        return {**encoder_out, "encoder_out": [encoder_out["encoder_out"][0].index_select(
                    1, new_order)],
                "encoder_padding_mask": [_index(encoder_out["encoder_padding_mask"][0],
                                                new_order)], "cross_kv": cross}  # fmt: skip

    def max_positions(self):
        return self.max_source_positions


class OnnxDecoder(FairseqIncrementalDecoder):
    """``decoder_step.onnx`` per step; the self-attention caches live in ``incremental_state``."""

    def __init__(self, dictionary, session, layers: int, heads: int, head_dim: int,
                 max_positions: int):  # fmt: skip
        super().__init__(dictionary)
        self.session = session
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_target_positions = max_positions

    def step(self, tokens: torch.Tensor, encoder_out: dict, caches: list[torch.Tensor] | None):
        """tokens B x (t+1) -> (logits B x V, the 2L grown caches)."""
        batch, t = tokens.size(0), tokens.size(1) - 1
        if caches is None:
            empty = torch.zeros(batch, self.heads, 0, self.head_dim)
            caches = [empty] * (2 * self.layers)
        if caches[0].size(2) != t:
            raise ValueError(f"the cache holds {caches[0].size(2)} positions, the step needs {t}")
        feeds = {"prev_output_tokens": tokens[:, -1:].long().cpu().contiguous().numpy(),
                 "step": np.array([t], dtype=np.int64),
                 "encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy()}  # fmt: skip
        cross = encoder_out["cross_kv"]
        for i in range(self.layers):
            feeds[f"self_k_{i}"], feeds[f"self_v_{i}"] = (
                caches[2 * i].numpy(),
                caches[2 * i + 1].numpy(),
            )
            feeds[f"cross_k_{i}"], feeds[f"cross_v_{i}"] = (
                cross[2 * i].numpy(),
                cross[2 * i + 1].numpy(),
            )
        logits, *grown = _run(self.session, feeds)
        return logits, grown

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        """prev_output_tokens B x T -> (logits B x T x V, extra); with ``incremental_state``
        only the last position is computed (B x 1 x V); without, every position, step by step."""
        if encoder_out is None:
            raise ValueError("the ONNX decoder needs the encoder output")
        if incremental_state is None:
            caches, out = None, []
            for t in range(prev_output_tokens.size(1)):
                logits, caches = self.step(prev_output_tokens[:, : t + 1], encoder_out, caches)
                out.append(logits)
            return torch.stack(out, dim=1), {"attn": [None], "inner_states": None}
        state = self.get_incremental_state(incremental_state, "caches")
        caches = None if state is None else [state[str(i)] for i in range(2 * self.layers)]
        logits, caches = self.step(prev_output_tokens, encoder_out, caches)
        self.set_incremental_state(incremental_state, "caches",
                                   {str(i): c for i, c in enumerate(caches)})  # fmt: skip
        return logits.unsqueeze(1), {"attn": [None], "inner_states": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        """The beam reordering, outside the graph: index-select every cache array."""
        state = self.get_incremental_state(incremental_state, "caches")
        if state is not None:
            self.set_incremental_state(incremental_state, "caches",
                                       {k: _index(v, new_order) for k, v in state.items()})  # fmt: skip

    def max_positions(self):
        return self.max_target_positions


class OnnxTranslationModel(FairseqEncoderDecoderModel):
    """fairseq's encoder-decoder interface over the three onnxruntime sessions."""

    def __init__(self, encoder: OnnxEncoder, decoder: OnnxDecoder, manifest: dict):
        super().__init__(encoder, decoder)
        self.manifest = manifest


def load_onnx_model(folder, threads: int = 1):
    """(OnnxTranslationModel, task, cfg, manifest) from an export folder; OnnxFolderError when a
    file is missing or the manifest is malformed."""
    from .onnx_export import ort_session

    folder = Path(folder)
    manifest = read_manifest(folder)
    task, cfg = rebuild_task(folder, manifest)
    sessions = {}
    for graph in GRAPHS:
        path = folder / manifest["files"][graph]
        try:
            sessions[graph] = ort_session(path, threads)
        except Exception as err:  # onnxruntime raises its own exception types
            raise OnnxFolderError(f"{path}: onnxruntime cannot load it ({err})") from err
    m = manifest["model"]
    encoder = OnnxEncoder(task.source_dictionary, sessions["encoder"], sessions["cross_kv"],
                          m["max_source_positions"])  # fmt: skip
    decoder = OnnxDecoder(task.target_dictionary, sessions["decoder_step"], m["decoder_layers"],
                          m["heads"], m["head_dim"], m["max_target_positions"])  # fmt: skip
    return OnnxTranslationModel(encoder, decoder, manifest).eval(), task, cfg, manifest
