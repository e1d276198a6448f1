"""ONNX export of ``moe_roberta`` + a classification head, and of a translation model's encoder.

    classifier: src_tokens B x T int64 (fairseq's right padding)   -> logits B x num_classes
    encoder:    src_tokens B x S int64 (padded as the task pads), src_lengths B int64
                -> encoder_out S x B x C, encoder_padding_mask B x S bool (True at padding)

B and T/S are dynamic axes (T up to the model's max positions). fairseq's forwards branch in
Python on the data (``has_pads``, the MoE layer's ``nonzero`` over padding, the gate's capacity,
the attention fast path), which a static graph cannot hold, so the export runs a wrapper that
reuses the model's own submodules and weights (embeddings, layer norms, attention projections,
dense FFNs, routers, classification head) with a forward written for export: the key padding
mask is additive, padding positions are zeroed as fairseq zeroes them, and every MoE block is
``onnx_moe.ExportMoE`` (static-graph routing; see that module for the three ``--moe-op``
formulations; shared experts and the CMR mix are plain linear ops beside it, expert-choice
routing is refused: an expert's choice depends on the whole batch). The model itself is left
unmodified. The graph is built by torch's default (dynamo) exporter; ``--moe-op fused``/``qmoe``
map a torch custom op onto onnxruntime's ``com.microsoft.MoE``/``QMoE`` through its
``custom_translation_table``.

``--moe-op plain`` ships by default: exact for every activation, portable, and the fastest at
batch 1 on the measured classifier; ``onnx_moe``'s docstring has the figures, and when ``fused``
(or PyTorch itself, at large batches) is better.

Translation: this module exports the encoder (``--part encoder``, or as the first graph of
``--part translation``); ``onnx_decoder`` exports the decoder step with its key/value caches and
the cross-attention keys/values (reusing ``layer_ffn`` and ``positions_table`` from here), and
``onnx_generate`` writes the three graphs into one folder and runs them under fairseq's
``SequenceGenerator``, the beam reordering done outside the graphs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .onnx_moe import ExportError, ExportMoE, ort_translation_table

PARTS = ("classifier", "encoder", "translation")
DEFAULT_HEAD = "sentence_classification_head"


def positions_table(module, max_positions: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """(the position embedding table, whether it is learned), or (None, False) without one.
    ``module``: an encoder or decoder (``embed_positions``, ``padding_idx``); the sinusoidal
    table covers ``max_positions`` (default: the encoder's ``max_source_positions``)."""
    from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding

    pos = module.embed_positions
    if pos is None:
        return None, False
    if isinstance(pos, LearnedPositionalEmbedding):
        return None, True  # the module's own weight is used
    if isinstance(pos, SinusoidalPositionalEmbedding):
        if max_positions is None:
            max_positions = module.max_source_positions
        size = module.padding_idx + 1 + max_positions
        table = SinusoidalPositionalEmbedding.get_embedding(
            size, pos.embedding_dim, pos.padding_idx
        )
        return table, False
    raise ExportError(f"positional embedding {type(pos).__name__} is not supported")


def _check_attention(attn, name: str) -> None:
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ExportError(f"{name}: attention with --add-bias-kv/--add-zero-attn is not supported")
    if not attn.self_attention:
        raise ExportError(f"{name}: expected a self-attention module")


def layer_ffn(moe: nn.ModuleDict, index: int, layer, x: torch.Tensor,
              real_tokens: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """A layer's FFN (dense, MoE, MoE beside the dense FFN, or the two mixed by the CMR gate):
    x T x B x C, real_tokens (T*B) x 1 (False at padding) -> T x B x C. ``moe`` maps the layer
    index (str) to its ``ExportMoE``; a layer without one is dense."""
    key = str(index)
    if key not in moe:
        return layer.fc2(layer.activation_fn(layer.fc1(x)))
    y = moe[key](x.flatten(0, 1), real_tokens).view_as(x).to(x.dtype)
    if getattr(layer, "parallel_ffn", False):  # --moe-expert-placement parallel
        y = y + layer.fc2(layer.activation_fn(layer.fc1(x)))
    elif getattr(layer, "cmr", False):  # --moe-cmr: (1 - g) * dense + g * MoE
        gate = layer.cmr_gate
        g = torch.sigmoid(F.linear(x.float(), gate.weight.float(), gate.bias.float()))
        dense = layer.fc2(layer.activation_fn(layer.fc1(x)))
        y = ((1.0 - g) * dense.float() + g * y.float()).to(x.dtype)  # T x B x C
    return y


class ExportEncoder(nn.Module):
    """fairseq's ``TransformerEncoderBase`` forward (eval, no dropout) over the encoder's own
    modules, with MoE blocks as ``ExportMoE``: src_tokens B x T -> (T x B x C, B x T pad)."""

    def __init__(self, encoder, moe_op: str = "plain"):
        super().__init__()
        from ..modules.moe_transformer_layer import MoETransformerEncoderLayer

        self.encoder = encoder
        self.padding_idx = int(encoder.padding_idx)
        table, self.learned_positions = positions_table(encoder)
        self.has_positions = encoder.embed_positions is not None
        if table is not None:
            self.register_buffer("position_table", table, persistent=False)
        self.moe = nn.ModuleDict()
        for i, layer in enumerate(encoder.layers):
            name = f"encoder.layers.{i}"
            _check_attention(layer.self_attn, name)
            if isinstance(layer, MoETransformerEncoderLayer):
                self.moe[str(i)] = ExportMoE(layer.moe, name, moe_op)
            elif not hasattr(layer, "fc1"):
                raise ExportError(f"{name}: unsupported encoder layer {type(layer).__name__}")

    def embed(self, src_tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """fairseq's ``forward_embedding`` and padding zeroing: B x T -> B x T x C."""
        enc = self.encoder
        x = enc.embed_scale * enc.embed_tokens(src_tokens)  # B x T x C
        if self.has_positions:  # fairseq's make_positions: padding_idx + 1, ... at real tokens
            mask = real.long()
            positions = torch.cumsum(mask, dim=1) * mask + self.padding_idx  # B x T
            if self.learned_positions:
                x = x + enc.embed_positions.weight[positions]
            else:
                x = x + self.position_table[positions]
        if enc.layernorm_embedding is not None:
            x = enc.layernorm_embedding(x)
        if enc.quant_noise is not None:
            x = enc.quant_noise(x)
        return x * real.unsqueeze(-1).to(x.dtype)

    @staticmethod
    def attention(attn, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention with standard ops. x: T x B x C; key_mask: B x 1 x 1 x T
        additive (0 or the dtype's minimum at padding) -> T x B x C."""
        heads, head_dim = attn.num_heads, attn.head_dim

        def split(t):  # T x B x C -> B x H x T x D
            return t.unflatten(2, (heads, head_dim)).permute(1, 2, 0, 3)

        q = split(attn.q_proj(x) * attn.scaling)
        k, v = split(attn.k_proj(x)), split(attn.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) + key_mask  # B x H x T x T
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).permute(2, 0, 1, 3).flatten(2)  # T x B x C
        return attn.out_proj(out)

    def ffn(self, index: int, layer, x: torch.Tensor, real_tokens: torch.Tensor) -> torch.Tensor:
        """The layer's FFN: T x B x C -> T x B x C (``layer_ffn``)."""
        return layer_ffn(self.moe, index, layer, x, real_tokens)

    def forward(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_tokens: B x T -> (encoder_out T x B x C, padding mask B x T, True at padding)."""
        pad = src_tokens.eq(self.padding_idx)  # B x T
        real = ~pad
        x = self.embed(src_tokens, real).transpose(0, 1)  # T x B x C
        key_mask = torch.zeros_like(pad, dtype=x.dtype).masked_fill(pad, torch.finfo(x.dtype).min)
        key_mask = key_mask[:, None, None, :]  # B x 1 x 1 x T
        real_tokens = real.t().reshape(-1, 1)  # (T*B) x 1
        for i, layer in enumerate(self.encoder.layers):
            before = layer.normalize_before
            residual = x
            h = layer.self_attn_layer_norm(x) if before else x
            x = residual + self.attention(layer.self_attn, h, key_mask)
            if not before:
                x = layer.self_attn_layer_norm(x)
            residual = x
            h = layer.final_layer_norm(x) if before else x
            x = residual + self.ffn(i, layer, h, real_tokens)
            if not before:
                x = layer.final_layer_norm(x)
        if self.encoder.layer_norm is not None:
            x = self.encoder.layer_norm(x)
        return x, pad


class ExportClassifier(nn.Module):
    """``moe_roberta`` + one classification head: src_tokens B x T -> logits B x classes."""

    def __init__(self, model, head: str = DEFAULT_HEAD, moe_op: str = "plain"):
        super().__init__()
        heads = sorted(getattr(model, "classification_heads", {}) or {})
        if head not in heads:
            raise ExportError(
                f"no classification head {head!r} in the model; it has: "
                f"{', '.join(heads) if heads else 'none'} (--head)"
            )
        self.encoder = ExportEncoder(model.encoder.sentence_encoder, moe_op)
        self.head = model.classification_heads[head]

    def forward(self, src_tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.encoder(src_tokens)  # T x B x C
        return self.head(x.transpose(0, 1))  # B x classes


class ExportTranslationEncoder(nn.Module):
    """``moe_transformer``'s encoder: (src_tokens B x S, src_lengths B) -> (S x B x C, B x S).
    fairseq's encoder recomputes the lengths from the padding; ``src_lengths`` is accepted for
    its interface and not read."""

    def __init__(self, model, moe_op: str = "plain"):
        super().__init__()
        self.encoder = ExportEncoder(model.encoder, moe_op)

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor):
        return self.encoder(src_tokens)


def model_kind(model) -> str:
    """``classifier`` for moe_roberta; ``translation`` for moe_transformer and fairseq's dense
    ``transformer`` (parts ``translation``, the default, and ``encoder``); ExportError otherwise."""
    from fairseq.models.transformer import TransformerModel

    from ..models.moe_roberta import MoERobertaModel

    if isinstance(model, MoERobertaModel):
        return "classifier"
    if isinstance(model, TransformerModel):  # MoETransformerModel is one
        return "translation"
    raise ExportError(
        f"the model is a {type(model).__name__}; the ONNX export supports moe_roberta "
        "(--part classifier) and moe_transformer or fairseq's transformer (--part translation "
        "or encoder)"
    )


def build_export_module(model, part: str, head: str = DEFAULT_HEAD, moe_op: str = "plain"):
    """The export wrapper of ``model`` (put in eval mode) for ``part`` (classifier or encoder;
    the whole translation model is three graphs: ``onnx_decoder.export_translation``)."""
    if part not in PARTS:
        raise ExportError(f"unknown --part {part!r}; expected one of {', '.join(PARTS)}")
    kind = model_kind(model)
    if (kind == "classifier") != (part == "classifier"):
        arch = "moe_roberta" if kind == "classifier" else "translation"
        raise ExportError(f"--part {part} does not apply to a {arch} model: use --part {kind}")
    if part == "translation":
        raise ExportError(
            "--part translation is three graphs (encoder, cross_kv, decoder_step): use "
            "onnx_decoder.export_translation"
        )
    check_fp32(model)
    model.eval()
    if part == "classifier":
        return ExportClassifier(model, head, moe_op).eval()
    return ExportTranslationEncoder(model, moe_op).eval()


def check_fp32(model) -> None:
    """ExportError unless the model's experts are fp32 (int8 ones export as ``--moe-op qmoe``)."""
    int8 = str(getattr(getattr(model, "args", None), "moe_int8", "off") or "off")
    if int8 != "off":
        raise ExportError(
            f"the model has int8 weights (moe_int8={int8}); export the fp32 checkpoint (int8 "
            "experts in ONNX: --moe-op qmoe)"
        )


def example_inputs(part: str, dictionary, max_positions: int, left_pad: bool = False):
    """A small padded batch (3 x 7, one sentence of length 4) for tracing."""
    length = min(7, max_positions)
    low, generator = dictionary.nspecial, torch.Generator().manual_seed(0)
    tokens = torch.randint(low, max(low + 1, len(dictionary)), (3, length), generator=generator)
    lengths = torch.tensor([length, length, min(4, length)])
    tokens[:, -1] = dictionary.eos()
    short = torch.full((length,), dictionary.pad())
    body = tokens[2, length - int(lengths[2]) :]
    short[: len(body)] = body
    tokens[2] = short.roll(length - len(body)) if left_pad else short
    if part == "classifier":
        return (tokens,)
    return tokens, lengths


def export_onnx(module: nn.Module, path: str | Path, inputs: tuple, part: str,
                max_positions: int | None = None) -> Path:  # fmt: skip
    """Export ``module`` to ``path`` with dynamic batch and length axes; returns the path."""
    import logging
    import warnings

    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = Dim("batch", min=1)
    length = Dim("length", min=1, max=max_positions) if max_positions else Dim("length", min=1)
    if part == "classifier":
        names, outputs = ["src_tokens"], ["logits"]
        shapes = ({0: batch, 1: length},)
    else:
        names, outputs = ["src_tokens", "src_lengths"], ["encoder_out", "encoder_padding_mask"]
        shapes = ({0: batch, 1: length}, {0: batch})
    # The exporter logs its progress and optional registrations (torchvision) and warns about
    # axis names it merges (src_lengths' batch is src_tokens'); none of it concerns this graph.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, inputs, input_names=names, output_names=outputs, dynamic_shapes=shapes,
            custom_translation_table=ort_translation_table(), dynamo=True, verbose=False,
        )  # fmt: skip
    program.save(str(path))
    return path


def ort_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session (``threads`` intra-op threads, 0 = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, part: str, src_tokens: torch.Tensor, padding_idx: int = 1) -> list:
    """The session's outputs (numpy) for a B x T batch of token ids."""
    feeds = {"src_tokens": src_tokens.numpy()}
    if part == "encoder":  # fairseq's interface; the graph does not read it
        feeds["src_lengths"] = src_tokens.ne(padding_idx).sum(dim=1).numpy()
    return session.run(None, feeds)


def reference(model, part: str, head: str, src_tokens: torch.Tensor) -> list[torch.Tensor]:
    """PyTorch eval outputs of the unmodified model (what the graph must match)."""
    with torch.no_grad():
        if part == "classifier":
            return [model(src_tokens, features_only=True, classification_head_name=head)[0]]
        lengths = src_tokens.ne(model.encoder.padding_idx).sum(dim=1)
        out = model.encoder(src_tokens, src_lengths=lengths)
        return [out["encoder_out"][0], out["encoder_padding_mask"][0]]


def compare(session, part: str, batches, expected_fn, atol: float = 1e-4,
            padding_idx: int = 1) -> dict:  # fmt: skip
    """Run the session on every batch and compare with ``expected_fn(batch)``'s outputs.

    Returns ``max_abs_diff`` (over the logits, or the whole encoder output, padding positions
    included; NaN counts as inf), ``agreement`` (classifier: share of equal arg-max
    predictions; encoder: share of sentences whose padding mask is equal), ``sentences``,
    ``batches``, ``ok`` (diff <= atol and agreement 1) and ``atol``.
    """
    max_diff, agree, total, n_batches = 0.0, 0, 0, 0
    for tokens in batches:
        got = [torch.from_numpy(a) for a in run_session(session, part, tokens, padding_idx)]
        with torch.no_grad():
            want = expected_fn(tokens)
        diff = (got[0] - want[0]).abs().nan_to_num(nan=math.inf)
        if part == "classifier":
            agree += int((got[0].argmax(-1) == want[0].argmax(-1)).sum())
        else:
            agree += int((got[1] == want[1]).all(dim=1).sum())
        max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
        total += tokens.shape[0]
        n_batches += 1
    agreement = agree / total if total else 1.0
    ok = max_diff <= atol and agreement == 1.0
    return {"sentences": total, "batches": n_batches, "max_abs_diff": max_diff,
            "agreement": agreement, "atol": atol, "ok": ok}  # fmt: skip
