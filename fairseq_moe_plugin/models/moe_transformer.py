"""``moe_transformer``: fairseq's encoder-decoder transformer with MoE feed-forward layers.

Every ``--encoder-moe-freq``-th encoder layer and ``--decoder-moe-freq``-th decoder layer has an
MoE FFN; with both at 0 the model is fairseq's ``transformer``, parameter for parameter.

The per-layer routing records travel in the model output:
``encoder_out["moe_records"]`` (kept through ``reorder_encoder_out`` during beam search) and
``decoder_out[1]["moe_records"]``; ``MoETransformerModel.forward`` puts the encoder's records
first in the latter, which is what the criterion reads.
"""

from __future__ import annotations

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    tiny_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)
from torch import Tensor

from ..modules.moe_transformer_layer import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    wrap_layer_like_fairseq,
)
from .moe_config import (
    MoEConfig,
    is_moe_layer,
    moe_config_defaults,
    moe_config_from_namespace,
    validate_moe_args,
)
from .upcycle import maybe_upcycle


def _collect_records(layers) -> list[dict]:
    """Move the records the MoE layers produced in this forward out of the layers."""
    records = []
    for layer in layers:
        record = getattr(layer, "moe_record", None)
        if record is not None:
            records.append(record)
            layer.moe_record = None
    return records


def _clear_records(layers) -> None:
    # LayerDrop may skip a layer: a record left from an earlier forward must not be read.
    for layer in layers:
        if getattr(layer, "moe_record", None) is not None:
            layer.moe_record = None


def _next_layer(stack, freq: int) -> tuple[int, bool]:
    """The index of the layer ``stack`` is about to build, and whether it is an MoE layer.

    fairseq's encoder/decoder ``__init__`` call ``build_*_layer(cfg)`` once per layer without
    the index, so the stack counts (``_layers_built`` is set before the base ``__init__``)."""
    index = stack._layers_built
    stack._layers_built += 1
    return index, is_moe_layer(index, freq)


class MoETransformerEncoder(TransformerEncoderBase):
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

    def build_encoder_layer(self, cfg):
        index, moe = _next_layer(self, self.moe_cfg.encoder_moe_freq)
        if not moe:
            return super().build_encoder_layer(cfg)
        layer = MoETransformerEncoderLayer(
            cfg, self.moe_cfg, name=f"encoder.layers.{index}", return_fc=self.return_fc
        )
        return wrap_layer_like_fairseq(layer, cfg)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Tensor | None = None,
        return_all_hiddens: bool = False,
        token_embeddings: Tensor | None = None,
    ):
        _clear_records(self.layers)
        encoder_out = super().forward_scriptable(
            src_tokens, src_lengths, return_all_hiddens, token_embeddings
        )
        encoder_out["moe_records"] = _collect_records(self.layers)
        return encoder_out

    def reorder_encoder_out(self, encoder_out: dict[str, list[Tensor]], new_order):
        # fairseq rebuilds the dict with a fixed key set; the records are batch totals, so they
        # are carried over unchanged.
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        reordered["moe_records"] = encoder_out.get("moe_records", [])
        return reordered


class MoETransformerDecoder(TransformerDecoderBase):
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

    def build_decoder_layer(self, cfg, no_encoder_attn: bool = False):
        index, moe = _next_layer(self, self.moe_cfg.decoder_moe_freq)
        if not moe:
            return super().build_decoder_layer(cfg, no_encoder_attn)
        layer = MoETransformerDecoderLayer(
            cfg, self.moe_cfg, name=f"decoder.layers.{index}", no_encoder_attn=no_encoder_attn
        )
        return wrap_layer_like_fairseq(layer, cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        _clear_records(self.layers)
        x, extra = super().extract_features_scriptable(
            prev_output_tokens,
            encoder_out,
            incremental_state,
            full_context_alignment,
            alignment_layer,
            alignment_heads,
        )
        extra["moe_records"] = _collect_records(self.layers)
        return x, extra


class NumUpdatesMixin:
    """Keeps ``num_updates``, which fairseq sets before every training forward; the MoE criteria
    read it to schedule their routing checks."""

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates


@register_model("moe_transformer")
class MoETransformerModel(NumUpdatesMixin, TransformerModel):
    """fairseq's ``transformer`` with sparse MoE FFNs (options: ``MoEConfig``)."""

    @classmethod
    def hub_models(cls):
        return {}

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # Defaults come from the architecture functions (``moe_config_defaults``), so that the
        # presets can set their own.
        gen_parser_from_dataclass(parser, MoEConfig(), delete_default=True, with_prefix="")

    @classmethod
    def build_model(cls, args, task):
        moe_base_architecture(args)
        validate_moe_args(args)
        model = super().build_model(args, task)
        maybe_upcycle(model, args)
        return model

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return MoETransformerEncoder(
            TransformerConfig.from_namespace(args),
            moe_config_from_namespace(args),
            src_dict,
            embed_tokens,
        )

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return MoETransformerDecoder(
            cfg,
            moe_config_from_namespace(args),
            tgt_dict,
            embed_tokens,
            no_encoder_attn=cfg.no_cross_attention,
        )

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        encoder_out = self.encoder(
            src_tokens, src_lengths=src_lengths, return_all_hiddens=return_all_hiddens
        )
        x, extra = self.decoder(
            prev_output_tokens,
            encoder_out=encoder_out,
            features_only=features_only,
            alignment_layer=alignment_layer,
            alignment_heads=alignment_heads,
            src_lengths=src_lengths,
            return_all_hiddens=return_all_hiddens,
        )
        extra["moe_records"] = encoder_out["moe_records"] + extra["moe_records"]
        return x, extra


# Presets. Each sets its sizes, then fills MoE defaults, then fairseq's remaining defaults.


@register_model_architecture("moe_transformer", "moe_transformer")
def moe_base_architecture(args):
    moe_config_defaults(args)
    base_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer_tiny")
def moe_transformer_tiny(args):
    """A debug model for tests: 2+2 layers of width 64, layer 1 of each stack MoE, 4 experts."""
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 128)
    if getattr(args, "moe_expert_count", None) is None:
        args.moe_expert_count = 4
    moe_config_defaults(args)
    tiny_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer_iwslt_de_en")
def moe_transformer_iwslt_de_en(args):
    moe_config_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("moe_transformer", "moe_transformer_wmt_en_de")
def moe_transformer_wmt_en_de(args):
    moe_config_defaults(args)
    transformer_wmt_en_de(args)


@register_model_architecture("moe_transformer", "moe_transformer_wmt_en_de_big")
def moe_transformer_wmt_en_de_big(args):
    moe_config_defaults(args)
    transformer_wmt_en_de_big(args)
