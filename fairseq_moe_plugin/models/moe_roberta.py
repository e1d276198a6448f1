"""``moe_roberta``: a RoBERTa-style encoder whose FFNs are MoE layers, for classification.

The encoder is ``moe_transformer``'s (same ``MoEConfig`` options, same modules, same routing
records); the model is fairseq's ``RobertaModel``, so ``register_classification_head`` and the
``sentence_prediction`` machinery work unchanged. The routing records travel in the output's
extra dict (``extra["moe_records"]``), which the MoE criteria read.

Presets: ``moe_roberta_tiny`` (tests), ``moe_roberta_base`` and ``moe_roberta_large`` (the sizes
of fairseq's ``roberta_base`` and ``roberta_large``).
"""

from __future__ import annotations

import logging

import torch.nn as nn
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaEncoder, RobertaModel
from fairseq.models.roberta.model import base_architecture as roberta_base_architecture
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_hasattr

from ..expert_parallel_training import keep_shards_out_of_ddp
from ..modules.expert_kinds import is_experts
from .adapter_checkpoint import AdapterCheckpointMixin
from .frozen_base import log_trainable
from .moe_config import MoEConfig, moe_config_defaults, moe_config_from_namespace, validate_moe_args
from .moe_encoder_decoder import MoETransformerEncoder
from .moe_transformer import NumUpdatesMixin
from .upcycle import prepare_moe_model

logger = logging.getLogger(__name__)


def init_experts_like_bert(module: nn.Module) -> None:
    """What ``init_bert_params`` does to a dense FFN (weights N(0, 0.02), zero biases), for
    every stacked expert (each kind's ``init_like_bert``)."""
    for m in module.modules():
        if is_experts(m):
            m.init_like_bert()


class MoERobertaEncoder(RobertaEncoder):
    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = MoETransformerEncoder(
            TransformerConfig.from_namespace(args),
            moe_config_from_namespace(args),
            dictionary,
            embed_tokens,
        )
        encoder.apply(init_bert_params)
        init_experts_like_bert(encoder)
        return encoder

    def extract_features(self, src_tokens, return_all_hiddens=False, **kwargs):
        encoder_out = self.sentence_encoder(
            src_tokens,
            return_all_hiddens=return_all_hiddens,
            token_embeddings=kwargs.get("token_embeddings", None),
        )
        features = encoder_out["encoder_out"][0].transpose(0, 1)  # T x B x C -> B x T x C
        inner_states = encoder_out["encoder_states"] if return_all_hiddens else None
        return features, {"inner_states": inner_states, "moe_records": encoder_out["moe_records"]}


@register_model("moe_roberta")
class MoERobertaModel(AdapterCheckpointMixin, NumUpdatesMixin, RobertaModel):
    """fairseq's RoBERTa with sparse MoE FFNs (options: ``MoEConfig``; the decoder options do
    not apply)."""

    @classmethod
    def hub_models(cls):
        return {}

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        gen_parser_from_dataclass(parser, MoEConfig(), delete_default=True, with_prefix="")
        # fairseq's roberta does not offer these, though its encoder (TransformerConfig) reads
        # them; moe_transformer has them from fairseq's transformer.
        for name in ("checkpoint_activations", "offload_activations"):
            help_text = TransformerConfig.__dataclass_fields__[name].metadata["help"]
            parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)

    @classmethod
    def build_model(cls, args, task):
        moe_roberta_architecture(args)
        validate_moe_args(args, has_decoder=False)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        model = cls(args, MoERobertaEncoder(args, task.source_dictionary))
        prepare_moe_model(model, args)
        keep_shards_out_of_ddp(model)
        return model

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        """fairseq's, then the frozen-base rule: a new head trains only with
        ``--moe-train-heads``."""
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        if getattr(self.args, "moe_freeze_base", False):
            train = bool(getattr(self.args, "moe_train_heads", False))
            self.classification_heads[name].requires_grad_(train)
            log_trainable(self, f"frozen base, with classification head {name!r}")
            if not train:
                logger.warning(
                    f"--moe-freeze-base without --moe-train-heads: classification head {name!r} "
                    "stays frozen at its initialisation"
                )


@register_model_architecture("moe_roberta", "moe_roberta")
def moe_roberta_architecture(args):
    moe_config_defaults(args)
    roberta_base_architecture(args)
    args.checkpoint_activations = getattr(args, "checkpoint_activations", False)
    args.offload_activations = getattr(args, "offload_activations", False)
    if args.offload_activations:
        args.checkpoint_activations = True  # offloading implies checkpointing, as in fairseq


@register_model_architecture("moe_roberta", "moe_roberta_base")
def moe_roberta_base(args):
    moe_roberta_architecture(args)


def _sizes(args, layers: int, dim: int, ffn: int, heads: int) -> None:
    """Preset sizes, each overridable by its flag."""
    args.encoder_layers = getattr(args, "encoder_layers", layers)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", dim)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", ffn)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", heads)


@register_model_architecture("moe_roberta", "moe_roberta_large")
def moe_roberta_large(args):
    _sizes(args, layers=24, dim=1024, ffn=4096, heads=16)
    moe_roberta_architecture(args)


@register_model_architecture("moe_roberta", "moe_roberta_tiny")
def moe_roberta_tiny(args):
    """A debug model for tests: 2 layers of width 64 (layer 1 MoE), 4 experts."""
    _sizes(args, layers=2, dim=64, ffn=128, heads=2)
    if getattr(args, "moe_expert_count", None) is None:
        args.moe_expert_count = 4
    moe_roberta_architecture(args)
