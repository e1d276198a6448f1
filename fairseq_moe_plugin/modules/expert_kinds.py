"""The registry of routed expert kinds, and the builders that turn a model's MoE options into
the experts of one layer.

- ``EXPERT_KINDS``: the ``--moe-expert-type`` values -> their classes (``ffn``:
  ``StackedExperts``, ``lora``: ``LoRAExperts``);
- ``INT8_KINDS``: the ``--moe-int8`` modes -> the class their experts become
  (``Int8StackedExperts``, built by ``quantized_int8`` of an fp32 kind);
- ``PLACEMENTS`` (``placements.py``): the ``--moe-expert-placement`` values.

Every kind implements ``expert_protocol.Experts``: its capabilities and state-dict layout as
class attributes, and the hooks the tools call (FLOP count, ONNX export, int8, upcycling noise,
BERT init), each implemented or raising ``ExpertKindUnsupported`` with the reason. No tool tests
a kind's class or compares ``--moe-expert-type`` / ``--moe-expert-placement`` strings: they call
``expert_kind(cfg)``, ``placement(cfg)`` or the module's hooks.

Adding an expert kind is one new file and one registry line:

1. ``modules/<kind>_experts.py``: an ``nn.Module`` with every member of ``Experts`` (the class
   attributes, ``from_config(moe_cfg, d_model, ffn_dim, activation_fn, activation_dropout)``,
   ``forward(x, plan, weight)`` and the hooks);
2. its line in ``EXPERT_KINDS`` below; the ``--moe-expert-type`` choices
   (``models/moe_config.EXPERT_TYPE_CHOICES``) are read from it.

Plain arguments; no fairseq needed.
"""

from __future__ import annotations

from .expert_protocol import ExpertKindUnsupported, Experts, UpcycleRule, is_experts
from .experts import StackedExperts
from .int8_experts import INT8_COMPUTE, Int8StackedExperts
from .lora_experts import LoRAExperts
from .placements import PLACEMENTS, Placement, placement
from .shared_experts import SharedExperts

__all__ = [
    "EXPERT_KINDS",
    "INT8_KINDS",
    "PLACEMENTS",
    "Experts",
    "ExpertKindUnsupported",
    "Placement",
    "UpcycleRule",
    "build_experts",
    "build_shared_experts",
    "expert_kind",
    "is_experts",
    "placement",
]

EXPERT_KINDS: dict[str, type[Experts]] = {
    "ffn": StackedExperts,
    "lora": LoRAExperts,
}
INT8_KINDS: dict[str, type[Experts]] = dict.fromkeys(INT8_COMPUTE, Int8StackedExperts)


def expert_kind(cfg) -> type[Experts]:
    """The expert kind of a model config (``cfg.moe_expert_type``); ValueError naming the known
    ones for anything else."""
    name = str(cfg.moe_expert_type)
    if name not in EXPERT_KINDS:
        raise ValueError(
            f"unknown --moe-expert-type {name!r}; expected one of {list(EXPERT_KINDS)}"
        )
    return EXPERT_KINDS[name]


def build_experts(
    moe_cfg, d_model: int, ffn_dim: int, activation_fn: str, activation_dropout: float
) -> Experts:
    """The routed experts of one MoE layer from the model's MoE options (``MoEConfig``) and the
    layer's sizes: ``d_model``, the dense FFN's width ``ffn_dim`` and activation, fairseq's
    ``--activation-dropout``."""
    return expert_kind(moe_cfg).from_config(
        moe_cfg, d_model, ffn_dim, activation_fn, activation_dropout
    )


def build_shared_experts(
    moe_cfg, d_model: int, ffn_dim: int, activation_fn: str, activation_dropout: float
) -> SharedExperts | None:
    """The layer's shared experts (``--moe-shared-experts``, width ``--moe-expert-ffn-dim`` or
    ``ffn_dim``, activation ``--moe-activation-fn`` or ``activation_fn``), or None without
    them. Whether the expert kind and the placement allow them is a rule of
    ``models/config_rules.py``, checked before."""
    num_shared = int(getattr(moe_cfg, "moe_shared_experts", 0) or 0)
    if num_shared <= 0:
        return None
    return SharedExperts(
        d_model,
        moe_cfg.moe_expert_ffn_dim or ffn_dim,
        num_shared,
        activation_fn=moe_cfg.moe_activation_fn or activation_fn,
        activation_dropout=activation_dropout,
        gated=bool(getattr(moe_cfg, "moe_shared_expert_gate", False)),
    )
