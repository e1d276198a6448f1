"""fairseq transformer encoder/decoder layers whose feed-forward block is an MoE layer.

Each layer is fairseq's (same attention modules, layer norms, dropout and residuals, same state
dict names apart from the FFN) with its own ``forward``, which returns the layer's routing record
beside fairseq's outputs, all tensors (sequence-first, fairseq's order):

- encoder layer: ``(x, fc_result, record)``; ``x`` is T x B x C, ``fc_result`` the MoE block's
  output before dropout when built with ``return_fc`` (else None);
- decoder layer: ``(x, attn, self_attn_state, record)``, fairseq's three outputs and the record.

Nothing is kept on the module between calls: the padding mask goes to the MoE layer as an
argument and the record leaves as a return value, so activation checkpointing (which re-runs the
forward in backward, ``checkpointing.py``) and FSDP see the record of the forward they run.
The attention blocks follow fairseq's ``TransformerEncoderLayerBase.forward`` and
``TransformerDecoderLayerBase.forward`` line for line (incremental state, cross-self-attention,
pre- or post-norm), so that a layer with one expert computes what fairseq's dense layer computes
(``tests/test_upcycle.py``). fairseq's NormFormer extras (``scale_attn``, ``scale_heads``,
``scale_fc``, ``scale_resids``) are not options of fairseq's transformer config; a config that
sets them is refused.
"""

from __future__ import annotations

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from .checkpointing import checkpointed
from .expert_kinds import placement
from .moe_layer import MoELayer
from .moe_layer_builder import build_moe_layer
from .record import MoERecord
from .shared_experts import cmr_gate_values


def fsdp_wrap_like_fairseq(layer, cfg):
    """FSDP wrapping as fairseq's ``build_*_layer`` do (a no-op outside FSDP training)."""
    min_params_to_wrap = cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


class _MoEFFNBlock:
    """What both layers share: the MoE layer in place of the dense FFN, the FFN block, and
    activation checkpointing of the whole layer."""

    moe: MoELayer

    def _install_moe(self, cfg, moe_cfg, side_cfg, name: str, causal: bool = False) -> None:
        """Build the MoE layer (``side_cfg``: ``cfg.encoder`` or ``cfg.decoder``; ``causal`` in
        the decoder). With ``--moe-expert-placement replace`` it takes the place of the dense
        FFN fairseq's __init__ built, which is unregistered so that the state dict holds only
        the MoE parameters (``moe.gate.*``, ``moe.experts.*``, ``moe.shared.*``); with
        ``parallel`` the dense FFN stays (``fc1``, ``fc2``, fairseq's names) and the MoE output
        is added to its output; with ``--moe-cmr`` the dense FFN stays too, and the two are
        mixed per token by the CMR gate ``cmr_gate`` (``shared_experts.cmr_gate_values``)."""
        self.parallel_ffn = placement(moe_cfg).keeps_dense_ffn
        self.cmr = bool(getattr(moe_cfg, "moe_cmr", False))
        if not (self.parallel_ffn or self.cmr):
            del self.fc1, self.fc2, self.activation_dropout_module, self.activation_fn
        if self.cmr:  # NLLB's CMR gate: d_model -> 1, sigmoid in fp32
            self.cmr_gate = torch.nn.Linear(side_cfg.embed_dim, 1)
            self.cmr_gate_dropout = float(getattr(moe_cfg, "moe_cmr_gate_dropout", 0.0) or 0.0)
        activation_dropout = float(cfg.activation_dropout or cfg.relu_dropout or 0.0)
        self.moe = build_moe_layer(
            moe_cfg,
            side_cfg.embed_dim,
            side_cfg.ffn_embed_dim,
            cfg.activation_fn,
            activation_dropout,
            name,
            causal=causal,
        )
        self.checkpoint_activations = bool(cfg.checkpoint_activations)
        self.offload_activations = bool(cfg.offload_activations)

    def forward(self, *args, **kwargs):
        if self.checkpoint_activations:
            return checkpointed(self.forward_layer, self.offload_activations, *args, **kwargs)
        return self.forward_layer(*args, **kwargs)

    def _residual_block(self, x: Tensor, layer_norm, fn) -> tuple[Tensor, object]:
        """fairseq's residual sub-block around ``fn`` (which returns its output and an extra):
        ``x + dropout(fn(LN(x)))`` with ``normalize_before``, else ``LN(x + dropout(fn(x)))``.
        x: T x B x C; returns the block's output and ``fn``'s extra."""
        residual = x
        if self.normalize_before:
            x = layer_norm(x)
        x, extra = fn(x)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = layer_norm(x)
        return x, extra

    def _moe_block(
        self, x: Tensor, padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, MoERecord]:
        """fairseq's FFN block with the MoE layer as the FFN.

        Args:
            x: T x B x C.
            padding_mask: B x T, True at padding; or None.
        Returns:
            the block's output (T x B x C), the MoE output before dropout (T x B x C), the
            record.
        """
        mask = None if padding_mask is None else padding_mask.t()  # T x B

        def moe(h):
            y, record = self.moe(h, mask)  # T x B x C
            if self.parallel_ffn:  # fairseq's dense FFN, beside the experts
                y = y + self._dense_ffn(h)  # T x B x C
            elif self.cmr:
                g = cmr_gate_values(h, self.cmr_gate, self.cmr_gate_dropout, self.training)
                y = (1.0 - g) * self._dense_ffn(h).to(y.dtype) + g * y  # T x B x C
            return y, (y, record)

        x, (fc_result, record) = self._residual_block(x, self.final_layer_norm, moe)
        return x, fc_result, record

    def _dense_ffn(self, h: Tensor) -> Tensor:
        """fairseq's dense FFN, ``fc2(dropout(act(fc1(h))))``: T x B x C -> T x B x C."""
        return self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(h))))


class MoETransformerEncoderLayer(_MoEFFNBlock, TransformerEncoderLayerBase):
    """fairseq's encoder layer with an MoE FFN; returns ``(x, fc_result, record)``."""

    def __init__(self, cfg, moe_cfg, name: str, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._install_moe(cfg, moe_cfg, cfg.encoder, name)

    def forward_layer(
        self, x: Tensor, encoder_padding_mask: Tensor | None, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, MoERecord]:
        """x: T x B x C; encoder_padding_mask: B x T (True at padding) or None; attn_mask:
        T x T (1 = masked) or None."""
        if attn_mask is not None:  # as fairseq: -1e8, not -inf, so no row is all -inf
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )
        x, _ = self._residual_block(
            x,
            self.self_attn_layer_norm,
            lambda h: self.self_attn(
                query=h,
                key=h,
                value=h,
                key_padding_mask=encoder_padding_mask,
                need_weights=False,
                attn_mask=attn_mask,
            ),
        )
        x, fc_result, record = self._moe_block(x, encoder_padding_mask)
        return x, (fc_result if self.return_fc else None), record


class MoETransformerDecoderLayer(_MoEFFNBlock, TransformerDecoderLayerBase):
    """fairseq's decoder layer with an MoE FFN; returns ``(x, attn, self_attn_state, record)``."""

    def __init__(self, cfg, moe_cfg, name: str, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        normformer = [n for n in ("attn_ln", "c_attn", "ffn_layernorm", "w_resid")
                      if getattr(self, n) is not None]  # fmt: skip
        if normformer:
            raise ValueError(
                f"{name}: NormFormer options (scale_attn, scale_heads, scale_fc, scale_resids) "
                f"are not supported in MoE decoder layers; this config sets {normformer}"
            )
        self._install_moe(cfg, moe_cfg, cfg.decoder, name, causal=True)

    def forward_layer(
        self,
        x: Tensor,
        encoder_out: Tensor | None = None,
        encoder_padding_mask: Tensor | None = None,
        incremental_state: dict[str, dict[str, Tensor | None]] | None = None,
        prev_self_attn_state: list[Tensor] | None = None,
        prev_attn_state: list[Tensor] | None = None,
        self_attn_mask: Tensor | None = None,
        self_attn_padding_mask: Tensor | None = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """fairseq's decoder-layer arguments. x: T x B x C (T = 1 when decoding a step);
        encoder_out: S x B x C; encoder_padding_mask: B x S; self_attn_padding_mask: B x T."""
        if need_head_weights:
            need_attn = True
        moe_padding_mask = self_attn_padding_mask  # B x T, the target's own padding
        x, encoder_padding_mask = self._self_attention_block(
            x,
            encoder_out,
            encoder_padding_mask,
            incremental_state,
            prev_self_attn_state,
            self_attn_mask,
            self_attn_padding_mask,
        )
        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            x, attn = self._encoder_attention_block(
                x,
                encoder_out,
                encoder_padding_mask,
                incremental_state,
                prev_attn_state,
                need_attn,
                need_head_weights,
            )
        x, _, record = self._moe_block(x, moe_padding_mask)
        return x, attn, self._onnx_self_attn_state(incremental_state, moe_padding_mask), record

    def _self_attention_block(
        self,
        x,
        encoder_out,
        encoder_padding_mask,
        incremental_state,
        prev_self_attn_state,
        self_attn_mask,
        self_attn_padding_mask,
    ):
        """fairseq's self-attention sub-block; returns x and the encoder padding mask (which
        cross-self-attention may create)."""
        if prev_self_attn_state is not None:
            assert incremental_state is not None
            self.self_attn._set_input_buffer(incremental_state, _saved_state(prev_self_attn_state))
        input_buffer = self.self_attn._get_input_buffer(incremental_state)
        attend_to_source = self.cross_self_attention and not (
            incremental_state is not None
            and input_buffer is not None
            and "prev_key" in input_buffer
        )

        def self_attention(h):
            mask, padding_mask, enc_padding_mask, keys = (
                self_attn_mask, self_attn_padding_mask, encoder_padding_mask, h
            )  # fmt: skip
            if attend_to_source:  # cross-self-attention: keys are the source and the target
                assert encoder_out is not None
                if mask is not None:
                    mask = torch.cat((h.new_zeros(h.size(0), encoder_out.size(0)), mask), dim=1)
                if padding_mask is not None:
                    if enc_padding_mask is None:
                        enc_padding_mask = padding_mask.new_zeros(
                            encoder_out.size(1), encoder_out.size(0)
                        )
                    padding_mask = torch.cat((enc_padding_mask, padding_mask), dim=1)
                keys = torch.cat((encoder_out, h), dim=0)
            out, _ = self.self_attn(
                query=h,
                key=keys,
                value=keys,
                key_padding_mask=padding_mask,
                incremental_state=incremental_state,
                need_weights=False,
                attn_mask=mask,
            )
            return out, enc_padding_mask

        return self._residual_block(x, self.self_attn_layer_norm, self_attention)

    def _encoder_attention_block(
        self,
        x,
        encoder_out,
        encoder_padding_mask,
        incremental_state,
        prev_attn_state,
        need_attn,
        need_head_weights,
    ):
        """fairseq's encoder-attention sub-block; returns x and the attention weights."""
        if prev_attn_state is not None:
            assert incremental_state is not None
            self.encoder_attn._set_input_buffer(incremental_state, _saved_state(prev_attn_state))
        return self._residual_block(
            x,
            self.encoder_attn_layer_norm,
            lambda h: self.encoder_attn(
                query=h,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            ),
        )

    def _onnx_self_attn_state(self, incremental_state, self_attn_padding_mask):
        """fairseq's third output: the self-attention state, when tracing for ONNX."""
        if not (self.onnx_trace and incremental_state is not None):
            return None
        saved_state = self.self_attn._get_input_buffer(incremental_state)
        assert saved_state is not None
        state = [saved_state["prev_key"], saved_state["prev_value"]]
        if self_attn_padding_mask is not None:
            state.append(saved_state["prev_key_padding_mask"])
        return state


def _saved_state(prev_state: list[Tensor]) -> dict[str, Tensor]:
    """fairseq's attention input buffer from a ``prev_*_attn_state`` list."""
    saved_state = {"prev_key": prev_state[0], "prev_value": prev_state[1]}
    if len(prev_state) >= 3:
        saved_state["prev_key_padding_mask"] = prev_state[2]
    return saved_state
