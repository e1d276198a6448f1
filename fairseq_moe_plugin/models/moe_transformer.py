"""``moe_transformer``: fairseq's encoder-decoder transformer with MoE feed-forward layers.

Every ``--encoder-moe-freq``-th encoder layer and ``--decoder-moe-freq``-th decoder layer has an
MoE FFN; with both at 0 the model is fairseq's ``transformer``, parameter for parameter.

The per-layer routing records travel in the model output (``moe_encoder_decoder.py``):
``encoder_out["moe_records"]`` and ``decoder_out[1]["moe_records"]``;
``MoETransformerModel.forward`` puts the encoder's records first in the latter, which is what the
criteria read.
"""

from __future__ import annotations

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    tiny_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)

from ..expert_parallel_training import keep_shards_out_of_ddp
from .adapter_checkpoint import AdapterCheckpointMixin
from .moe_config import MoEConfig, moe_config_defaults, moe_config_from_namespace, validate_moe_args
from .moe_encoder_decoder import MoETransformerDecoder, MoETransformerEncoder
from .upcycle import prepare_moe_model


class NumUpdatesMixin:
    """Keeps ``num_updates``, which fairseq sets before every training forward; the MoE criteria
    read it to schedule their routing checks."""

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates


@register_model("moe_transformer")
class MoETransformerModel(AdapterCheckpointMixin, NumUpdatesMixin, TransformerModel):
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
        prepare_moe_model(model, args)
        keep_shards_out_of_ddp(model)
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
