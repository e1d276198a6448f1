"""ONNX export of a translation model's decoder: the one-token step with its key/value caches,
and the cross-attention keys/values computed once from the encoder output.

    cross_kv:     encoder_out S x B x C
                  -> cross_k_i, cross_v_i (B x H x S x D) for every decoder layer i
    decoder_step: prev_output_tokens B x 1 (the last token), step [1] int64 (t, the number of
                  tokens before it), encoder_padding_mask B x S bool, and per layer i
                  self_k_i, self_v_i (B x H x t x D) and cross_k_i, cross_v_i
                  -> logits B x V, new_self_k_i, new_self_v_i (B x H x (t+1) x D)

B, S and t are dynamic (t = 0 at the first step). The step computes what fairseq's incremental
``TransformerDecoderBase`` forward computes for the last position (eval, no dropout): the token
embedding (scaled) plus the position ``padding_idx + 1 + t`` (fairseq's incremental position for
a sequence of t + 1 tokens, sinusoidal or learned), each layer's self-attention over the cache
and the new key/value, the cross-attention over ``cross_k/v`` with the source padding masked
(-inf, as fairseq's ``masked_fill``), the FFN (dense, or the layer's MoE as ``onnx_moe.ExportMoE``
with ``onnx_export.layer_ffn``), the final layer norm and the output projection. fairseq keeps
these caches inside ``MultiheadAttention``'s incremental state and reorders them itself; here they
are plain graph inputs and outputs, and the caller reorders them for the beam (an index-select of
the cache arrays, ``onnx_generate.OnnxDecoder.reorder_incremental_state``). As for the encoder,
the wrappers reuse the model's own submodules and weights; the model is left unmodified.

``export_translation`` writes the three graphs, the task's dictionaries and ``manifest.json``
(the task and generation settings, the graphs' shapes) into one folder, from which
``onnx_generate.load_onnx_model`` rebuilds the task and an onnxruntime-backed model without the
PyTorch weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .onnx_export import ExportTranslationEncoder, check_fp32, layer_ffn, positions_table
from .onnx_moe import ExportError, ExportMoE

_NORMFORMER = ("attn_ln", "c_attn", "ffn_layernorm", "w_resid")


def check_decoder(decoder) -> None:
    """ExportError naming the option unless the step wrapper computes what ``decoder`` does."""
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise ExportError("the decoder has an adaptive softmax (--adaptive-softmax-cutoff)")
    if getattr(decoder, "cross_self_attention", False):
        raise ExportError("--cross-self-attention is not supported by the decoder step export")
    for i, layer in enumerate(decoder.layers):
        name = f"decoder.layers.{i}"
        if getattr(layer, "encoder_attn", None) is None:
            raise ExportError(f"{name}: a decoder layer without encoder attention")
        if any(getattr(layer, n, None) is not None for n in _NORMFORMER):
            raise ExportError(f"{name}: NormFormer options are not supported")
        for attn in (layer.self_attn, layer.encoder_attn):
            if attn.bias_k is not None or attn.add_zero_attn:
                raise ExportError(f"{name}: --add-bias-kv/--add-zero-attn is not supported")
        if not hasattr(layer, "moe") and not hasattr(layer, "fc1"):
            raise ExportError(f"{name}: unsupported decoder layer {type(layer).__name__}")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """T x B x C -> B x H x T x D."""
    return x.unflatten(2, (heads, -1)).permute(1, 2, 0, 3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           pad: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """q B x H x T x D (scaled), k/v B x H x S x D, pad B x S (True at padding) -> T x B x C."""
    scores = torch.matmul(q, k.transpose(-1, -2))  # B x H x T x S
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).permute(2, 0, 1, 3).flatten(2)  # T x B x C


class ExportCrossKV(nn.Module):
    """encoder_out S x B x C -> (cross_k_0, cross_v_0, cross_k_1, ...), each B x H x S x D: the
    encoder-attention key/value projections fairseq computes at the first step (``static_kv``)."""

    def __init__(self, model):
        super().__init__()
        check_decoder(model.decoder)
        self.layers = model.decoder.layers

    def forward(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for layer in self.layers:
            attn = layer.encoder_attn
            out += [split_heads(attn.k_proj(encoder_out), attn.num_heads),
                    split_heads(attn.v_proj(encoder_out), attn.num_heads)]  # fmt: skip
        return tuple(out)


class ExportDecoderStep(nn.Module):
    """One incremental decoder step (module doc): inputs ``(prev_output_tokens, step,
    encoder_padding_mask, self_k_0, self_v_0, cross_k_0, cross_v_0, self_k_1, ...)``, outputs
    ``(logits, new_self_k_0, new_self_v_0, ...)``."""

    def __init__(self, model, moe_op: str = "plain"):
        super().__init__()
        from ..modules.moe_transformer_layer import MoETransformerDecoderLayer

        decoder = model.decoder
        check_decoder(decoder)
        check_fp32(model)
        self.decoder = decoder
        self.padding_idx = int(decoder.padding_idx)
        table, self.learned_positions = positions_table(decoder, decoder.max_target_positions)
        self.has_positions = decoder.embed_positions is not None
        if table is not None:
            self.register_buffer("position_table", table, persistent=False)
        self.moe = nn.ModuleDict()
        for i, layer in enumerate(decoder.layers):
            if isinstance(layer, MoETransformerDecoderLayer):
                self.moe[str(i)] = ExportMoE(layer.moe, f"decoder.layers.{i}", moe_op)

    def embed(self, tokens: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """fairseq's ``_embed`` of the last token: tokens B x 1, step [1] -> 1 x B x C."""
        dec = self.decoder
        x = dec.embed_scale * dec.embed_tokens(tokens)  # B x 1 x C
        if dec.quant_noise is not None:
            x = dec.quant_noise(x)
        if dec.project_in_dim is not None:
            x = dec.project_in_dim(x)
        if self.has_positions:
            position = step + (self.padding_idx + 1)  # [1]
            table = dec.embed_positions.weight if self.learned_positions else self.position_table
            x = x + table.index_select(0, position)  # 1 x C broadcast
        if dec.layernorm_embedding is not None:
            x = dec.layernorm_embedding(x)
        return x.transpose(0, 1)  # 1 x B x C

    @staticmethod
    def _block(layer, norm, x, fn):
        """fairseq's residual sub-block: pre-norm ``x + fn(LN(x))`` or post-norm."""
        before = layer.normalize_before
        y = fn(norm(x) if before else x)
        x = x + y
        return x if before else norm(x)

    def forward(self, tokens, step, encoder_padding_mask, *caches):
        x = self.embed(tokens, step)  # 1 x B x C
        real = tokens.ne(self.padding_idx).t().reshape(-1, 1)  # B x 1 (never padding in search)
        new_caches = []
        for i, layer in enumerate(self.decoder.layers):
            self_k, self_v, cross_k, cross_v = caches[4 * i : 4 * i + 4]
            sa, ca = layer.self_attn, layer.encoder_attn

            def self_attention(h, sa=sa, self_k=self_k, self_v=self_v):
                q = split_heads(sa.q_proj(h) * sa.scaling, sa.num_heads)  # B x H x 1 x D
                k = torch.cat([self_k, split_heads(sa.k_proj(h), sa.num_heads)], dim=2)
                v = torch.cat([self_v, split_heads(sa.v_proj(h), sa.num_heads)], dim=2)
                new_caches.extend([k, v])  # B x H x (t+1) x D
                return sa.out_proj(attend(q, k, v))

            def cross_attention(h, ca=ca, cross_k=cross_k, cross_v=cross_v):
                q = split_heads(ca.q_proj(h) * ca.scaling, ca.num_heads)
                return ca.out_proj(attend(q, cross_k, cross_v, encoder_padding_mask))

            x = self._block(layer, layer.self_attn_layer_norm, x, self_attention)
            x = self._block(layer, layer.encoder_attn_layer_norm, x, cross_attention)
            x = self._block(layer, layer.final_layer_norm, x,
                            lambda h, i=i, layer=layer: layer_ffn(self.moe, i, layer, h, real))  # fmt: skip
        dec = self.decoder
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        x = x.transpose(0, 1)  # B x 1 x C
        if dec.project_out_dim is not None:
            x = dec.project_out_dim(x)
        logits = dec.output_projection(x)[:, 0, :]  # B x V
        return (logits, *new_caches)


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(the step's cache input names after the first three, its output names after logits)."""
    inputs, outputs = [], []
    for i in range(num_layers):
        inputs += [f"self_k_{i}", f"self_v_{i}", f"cross_k_{i}", f"cross_v_{i}"]
        outputs += [f"new_self_k_{i}", f"new_self_v_{i}"]
    return inputs, outputs


def _export(module, inputs, path, names, outputs, shapes) -> None:
    import logging
    import warnings

    from .onnx_moe import ort_translation_table

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(inputs), input_names=names, output_names=outputs,
            dynamic_shapes=shapes, custom_translation_table=ort_translation_table(),
            dynamo=True, verbose=False,
        )  # fmt: skip
    program.save(str(path))


def layer_shapes(model) -> tuple[int, int, int]:
    """(decoder layers, heads, head dim) of the caches."""
    attn = model.decoder.layers[0].encoder_attn
    return len(model.decoder.layers), int(attn.num_heads), int(attn.head_dim)


def export_decoder_graphs(model, folder, moe_op: str = "plain") -> dict:
    """Write ``cross_kv.onnx`` and ``decoder_step.onnx`` into ``folder``; returns their names."""
    from pathlib import Path

    from torch.export import Dim

    folder = Path(folder)
    model.eval()
    layers, heads, head_dim = layer_shapes(model)
    channels = model.encoder.embed_tokens.embedding_dim
    batch, src = Dim("batch", min=1), Dim("src_len", min=1)
    past = Dim("past", min=0, max=model.decoder.max_target_positions)
    enc = torch.randn(5, 3, channels)  # S x B x C
    cross = ExportCrossKV(model).eval()
    kv_names = [f"cross_{kind}_{i}" for i in range(layers) for kind in "kv"]
    _export(cross, [enc], folder / "cross_kv.onnx", ["encoder_out"], kv_names,
            ({0: src, 1: batch},))  # fmt: skip
    with torch.no_grad():
        cross_kv = cross(enc)
    step = ExportDecoderStep(model, moe_op).eval()
    dictionary = model.decoder.dictionary
    tokens = torch.full((3, 1), dictionary.nspecial, dtype=torch.long)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 3:] = True
    caches, cache_shapes = [], []
    for i in range(layers):
        caches += [torch.randn(3, heads, 2, head_dim), torch.randn(3, heads, 2, head_dim),
                   cross_kv[2 * i], cross_kv[2 * i + 1]]  # fmt: skip
        cache_shapes += [{0: batch, 2: past}] * 2 + [{0: batch, 2: src}] * 2
    shapes = ({0: batch}, None, {0: batch, 1: src}, tuple(cache_shapes))  # *caches: one tuple
    cache_in, cache_out = cache_names(layers)
    _export(step, [tokens, torch.tensor([2]), pad, *caches], folder / "decoder_step.onnx",
            ["prev_output_tokens", "step", "encoder_padding_mask", *cache_in],
            ["logits", *cache_out], shapes)  # fmt: skip
    return {"cross_kv": "cross_kv.onnx", "decoder_step": "decoder_step.onnx"}


def export_encoder_graph(model, folder, left_pad: bool, moe_op: str = "plain") -> str:
    """Write ``encoder.onnx`` (``onnx_export``'s translation encoder) into ``folder``."""
    from pathlib import Path

    from .onnx_export import example_inputs, export_onnx

    module = ExportTranslationEncoder(model, moe_op).eval()
    max_positions = int(model.encoder.max_source_positions)
    inputs = example_inputs("encoder", model.encoder.dictionary, max_positions, left_pad)
    export_onnx(module, Path(folder) / "encoder.onnx", inputs, "encoder", max_positions)
    return "encoder.onnx"
