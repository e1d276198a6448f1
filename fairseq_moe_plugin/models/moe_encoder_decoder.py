"""The encoder and decoder of ``moe_transformer`` (and the encoder of ``moe_roberta``): fairseq's
``TransformerEncoderBase`` / ``TransformerDecoderBase`` whose every ``--encoder-moe-freq``-th /
``--decoder-moe-freq``-th layer has an MoE FFN.

Their layer loops collect the routing records the MoE layers return
(``modules/moe_transformer_layer.py``) and put them in the output: ``encoder_out["moe_records"]``
(kept through ``reorder_encoder_out`` during beam search) and ``extra["moe_records"]`` of the
decoder, in layer order. A layer that LayerDrop skips gives no record. Apart from the loops, the
forwards are fairseq's: the same embedding, masks, layer norms and outputs.

With sharded experts (``--moe-expert-parallel-size`` > 1), a forward in eval mode is a round of
``modules/expert_parallel_lockstep.py``: processes that decode for different numbers of steps
keep joining each other's expert exchanges.
"""

from __future__ import annotations

import torch
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
)
from torch import Tensor

from ..modules import expert_parallel_lockstep as lockstep
from ..modules.moe_layer import MoELayer
from ..modules.moe_transformer_layer import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    fsdp_wrap_like_fairseq,
)
from ..naming import module_name
from .moe_config import MoEConfig, is_moe_layer


class LockstepStackMixin:
    """An encoder or decoder whose eval-mode forwards with sharded experts are lockstep rounds
    (``run_in_rounds``); ``register_rounds`` is called once its layers exist."""

    def register_rounds(self) -> None:
        registered = lockstep.register_stack([m for m in self.modules() if isinstance(m, MoELayer)])
        self._round_id, self._round_layers = registered if registered else (None, [])

    def run_in_rounds(self, forward):
        round_id = getattr(self, "_round_id", None)
        if round_id is None or self.training:
            return forward()
        return lockstep.run_stack(round_id, self._round_layers[0].experts.expert_parallel, forward)


def _next_layer(stack, freq: int) -> tuple[int, bool]:
    """The index of the layer ``stack`` is about to build, and whether it is an MoE layer.

    fairseq's encoder/decoder ``__init__`` call ``build_*_layer(cfg)`` once per layer without
    the index, so the stack counts (``_layers_built`` is set before the base ``__init__``)."""
    index = stack._layers_built
    stack._layers_built += 1
    return index, is_moe_layer(index, freq)


class MoETransformerEncoder(LockstepStackMixin, TransformerEncoderBase):
    def __init__(
        self,
        cfg: TransformerConfig,
        moe_cfg: MoEConfig,
        dictionary,
        embed_tokens,
        return_fc: bool = False,
    ):
        self.moe_cfg = moe_cfg
        self._layers_built = 0
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        self.register_rounds()

    def build_encoder_layer(self, cfg):
        index, moe = _next_layer(self, self.moe_cfg.encoder_moe_freq)
        if not moe:
            return super().build_encoder_layer(cfg)
        name = module_name("encoder", index)
        layer = MoETransformerEncoderLayer(cfg, self.moe_cfg, name, return_fc=self.return_fc)
        return fsdp_wrap_like_fairseq(layer, cfg)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Tensor | None = None,
        return_all_hiddens: bool = False,
        token_embeddings: Tensor | None = None,
    ):
        """fairseq's encoder forward (``src_tokens``: B x S), plus ``moe_records``."""
        return self.run_in_rounds(
            lambda: self._encode(src_tokens, return_all_hiddens, token_embeddings)
        )

    def _encode(self, src_tokens, return_all_hiddens, token_embeddings):
        encoder_padding_mask = src_tokens.eq(self.padding_idx)  # B x S
        has_pads = src_tokens.device.type == "xla" or bool(encoder_padding_mask.any())
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)  # B x S x C
        if has_pads:  # zero the padding positions
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # B x S x C -> S x B x C

        encoder_states = [x] if return_all_hiddens else []
        fc_results, records = [], []
        for layer in self.layers:
            out = layer(x, encoder_padding_mask=encoder_padding_mask if has_pads else None)
            if isinstance(out, tuple) and len(out) == 3:  # an MoE layer: x, fc_result, record
                x, fc_result, record = out
                records.append(record)
            elif isinstance(out, tuple):  # a dense layer built with return_fc
                x, fc_result = out
            else:
                x, fc_result = out, None
            if return_all_hiddens:
                encoder_states.append(x)
                fc_results.append(fc_result)
        if self.layer_norm is not None:
            x = self.layer_norm(x)

        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32)  # B
        return {
            "encoder_out": [x],  # S x B x C
            "encoder_padding_mask": [encoder_padding_mask],  # B x S
            "encoder_embedding": [encoder_embedding],  # B x S x C
            "encoder_states": encoder_states,  # List[S x B x C]
            "fc_results": fc_results,  # List[S x B x C]
            "src_tokens": [],
            "src_lengths": [src_lengths.reshape(-1, 1).contiguous()],  # B x 1
            "moe_records": records,
        }

    def reorder_encoder_out(self, encoder_out: dict[str, list[Tensor]], new_order):
        # fairseq rebuilds the dict with a fixed key set; the records describe the batch as it was
        # encoded, so they are carried over unchanged.
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        reordered["moe_records"] = encoder_out.get("moe_records", [])
        return reordered


class MoETransformerDecoder(LockstepStackMixin, TransformerDecoderBase):
    def __init__(
        self,
        cfg: TransformerConfig,
        moe_cfg: MoEConfig,
        dictionary,
        embed_tokens,
        no_encoder_attn: bool = False,
        output_projection=None,
    ):
        self.moe_cfg = moe_cfg
        self._layers_built = 0
        super().__init__(
            cfg,
            dictionary,
            embed_tokens,
            no_encoder_attn=no_encoder_attn,
            output_projection=output_projection,
        )
        self.register_rounds()

    def build_decoder_layer(self, cfg, no_encoder_attn: bool = False):
        index, moe = _next_layer(self, self.moe_cfg.decoder_moe_freq)
        if not moe:
            return super().build_decoder_layer(cfg, no_encoder_attn)
        name = module_name("decoder", index)
        layer = MoETransformerDecoderLayer(cfg, self.moe_cfg, name, no_encoder_attn)
        return fsdp_wrap_like_fairseq(layer, cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        """fairseq's decoder features (``prev_output_tokens``: B x T; B x T x C out), plus
        ``extra["moe_records"]``."""
        args = (prev_output_tokens, encoder_out, incremental_state, full_context_alignment,
                alignment_layer, alignment_heads)  # fmt: skip
        return self.run_in_rounds(lambda: self._decode(*args))

    def _decode(
        self,
        prev_output_tokens,
        encoder_out,
        incremental_state,
        full_context_alignment,
        alignment_layer,
        alignment_heads,
    ):
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc, enc_padding_mask = None, None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]  # S x B x C
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            enc_padding_mask = encoder_out["encoder_padding_mask"][0]  # B x S
        x, tokens = self._embed(prev_output_tokens, incremental_state)  # T x B x C, B x T

        self_attn_padding_mask = None  # B x T
        if self.cross_self_attention or tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = tokens.eq(self.padding_idx)
        attn, inner_states, records = None, [x], []
        for idx, layer in enumerate(self.layers):
            if incremental_state is None and not full_context_alignment:
                self_attn_mask = self.buffered_future_mask(x)  # T x T
            else:
                self_attn_mask = None
            x, layer_attn, _, *record = layer(
                x,
                enc,
                enc_padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool(idx == alignment_layer),
                need_head_weights=bool(idx == alignment_layer),
            )
            records += record  # an MoE layer's fourth output
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average probabilities over heads
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states, "moe_records": records}

    def _embed(self, prev_output_tokens, incremental_state):
        """fairseq's decoder embedding: (T x B x C input of the first layer, the B x T tokens
        it embeds, i.e. only the last one when decoding incrementally)."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(
                prev_output_tokens, incremental_state=incremental_state
            )
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)  # B x T x C
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        return x.transpose(0, 1), prev_output_tokens  # B x T x C -> T x B x C
