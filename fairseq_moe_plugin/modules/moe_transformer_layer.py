"""fairseq transformer encoder/decoder layers whose feed-forward block is an MoE layer.

fairseq's layers compute their FFN inline as ``fc2(activation_dropout(activation_fn(fc1(x))))``.
Rather than copy fairseq's attention code, these subclasses keep fairseq's ``forward`` untouched
and route that one expression to the MoE layer: ``fc1`` becomes the MoE FFN (each expert applies
its own activation and activation dropout), and ``activation_fn``, ``activation_dropout_module``
and ``fc2`` become identities. Residual, dropout and layer norms stay exactly fairseq's.

The MoE FFN needs the padding mask, which fairseq gives to the layer's ``forward`` but not to
``fc1``; ``forward`` holds it for the duration of the call. After each call the layer's routing
record is in ``layer.moe_record``, from where the encoder/decoder moves it into the model output.
"""

from __future__ import annotations

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from .experts import StackedExperts
from .gate import TopKGate
from .moe_layer import MoELayer, MoERecord


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def build_moe_layer(
    moe_cfg, d_model: int, ffn_dim: int, activation_fn: str, activation_dropout: float, name: str
) -> MoELayer:
    """An MoE layer from the model's MoE options (see ``MoEConfig``) and the layer's sizes."""
    gate = TopKGate(
        d_model,
        moe_cfg.moe_expert_count,
        k=moe_cfg.moe_top_k,
        normalize_top_k=moe_cfg.moe_normalize_top_k,
        capacity_factor=moe_cfg.moe_capacity_factor,
        eval_capacity_factor=moe_cfg.moe_eval_capacity_factor,
        jitter_eps=moe_cfg.moe_jitter_eps,
    )
    experts = StackedExperts(
        moe_cfg.moe_expert_count,
        d_model,
        moe_cfg.moe_expert_ffn_dim or ffn_dim,
        activation_fn=moe_cfg.moe_activation_fn or activation_fn,
        activation_dropout=activation_dropout,
        reuse_grad_buffers=not moe_cfg.moe_no_grad_buffer_reuse,
    )
    return MoELayer(gate, experts, name=name)


def wrap_layer_like_fairseq(layer, cfg):
    """Activation checkpointing and FSDP wrapping exactly as fairseq's ``build_*_layer`` do."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


class _MoEFFNMixin:
    """Swaps the dense FFN of a fairseq transformer layer for ``self.moe``."""

    moe: MoELayer
    moe_record: MoERecord | None

    def _install_moe(self, moe: MoELayer) -> None:
        # The dense FFN built by fairseq's __init__ is discarded; its modules are unregistered so
        # that the state dict holds only the MoE parameters (``moe.gate.*``, ``moe.experts.*``).
        del self.fc1, self.fc2, self.activation_dropout_module
        self.moe = moe
        self.fc1 = self._moe_ffn  # T x B x C -> T x B x C
        self.fc2 = _identity
        self.activation_fn = _identity
        self.activation_dropout_module = _identity
        self.moe_record = None
        self._padding_mask: torch.Tensor | None = None  # B x T, set during forward

    def _moe_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x: T x B x C (time-major)."""
        mask = self._padding_mask  # B x T or None
        y, self.moe_record = self.moe(x, None if mask is None else mask.t())  # mask: T x B
        return y


class MoETransformerEncoderLayer(_MoEFFNMixin, TransformerEncoderLayerBase):
    """fairseq's encoder layer with an MoE FFN. ``forward`` is fairseq's."""

    def __init__(self, cfg, moe_cfg, name: str, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._install_moe(
            build_moe_layer(
                moe_cfg,
                cfg.encoder.embed_dim,
                cfg.encoder.ffn_embed_dim,
                cfg.activation_fn,
                float(cfg.activation_dropout or cfg.relu_dropout or 0.0),
                name,
            )
        )

    def forward(self, x, encoder_padding_mask: torch.Tensor | None, attn_mask=None):
        self._padding_mask = encoder_padding_mask  # B x T or None
        try:
            return super().forward(x, encoder_padding_mask, attn_mask=attn_mask)
        finally:
            self._padding_mask = None


class MoETransformerDecoderLayer(_MoEFFNMixin, TransformerDecoderLayerBase):
    """fairseq's decoder layer with an MoE FFN. ``forward`` is fairseq's."""

    def __init__(self, cfg, moe_cfg, name: str, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self._install_moe(
            build_moe_layer(
                moe_cfg,
                cfg.decoder.embed_dim,
                cfg.decoder.ffn_embed_dim,
                cfg.activation_fn,
                float(cfg.activation_dropout or cfg.relu_dropout or 0.0),
                name,
            )
        )

    def forward(self, x, *args, self_attn_padding_mask: torch.Tensor | None = None, **kwargs):
        self._padding_mask = self_attn_padding_mask  # B x T (B x 1 when decoding a step)
        try:
            return super().forward(
                x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs
            )
        finally:
            self._padding_mask = None
