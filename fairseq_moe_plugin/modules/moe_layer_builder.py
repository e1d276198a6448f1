"""``build_moe_layer``: one MoE layer from a model's MoE options (``MoEConfig``).

A translation of a config, nothing more: the rules across options live in
``models/config_rules.py`` (checked at config time, and here for the rows that concern one
layer, with the layer's name in the message); the gate, the experts and the shared experts
check their own arguments.
"""

from __future__ import annotations

from ..models.config_rules import check_layer_options, decoder_routing
from .expert_kinds import build_experts, build_shared_experts
from .gate import TopKGate
from .moe_layer import MoELayer
from .routing import routing_method


def layer_routing(moe_cfg, causal: bool) -> str:
    """The ``--moe-routing`` value a layer routes by: a decoder (``causal``) layer's is
    ``--moe-decoder-routing`` when set."""
    return decoder_routing(moe_cfg) if causal else str(moe_cfg.moe_routing)


def build_gate(moe_cfg, d_model: int, routing: str) -> TopKGate:
    """The router of one layer routing by ``routing``. The bias of aux-loss-free balancing
    applies to methods that take it: an expert-choice encoder beside top-k decoder layers has
    none."""
    rate = moe_cfg.moe_bias_balancing_rate if routing_method(routing).bias_balancing else 0.0
    return TopKGate(
        d_model,
        moe_cfg.moe_expert_count,
        k=moe_cfg.moe_top_k,
        normalize_top_k=moe_cfg.moe_normalize_top_k,
        capacity_factor=moe_cfg.moe_capacity_factor,
        eval_capacity_factor=moe_cfg.moe_eval_capacity_factor,
        jitter_eps=moe_cfg.moe_jitter_eps,
        routing=routing,
        dense_until=moe_cfg.moe_dense_routing_until,
        temperature=moe_cfg.moe_router_temperature,
        router_bias=moe_cfg.moe_router_bias,
        balance_loss=str(moe_cfg.moe_balance_loss),
        usage_ema=moe_cfg.moe_usage_ema,
        fallback_expert=moe_cfg.moe_fallback_expert,
        expert_capacity_factor=moe_cfg.moe_expert_capacity_factor,
        capacity_priority=str(moe_cfg.moe_capacity_priority),
        bias_balancing_rate=rate,
    )


def build_moe_layer(
    moe_cfg,
    d_model: int,
    ffn_dim: int,
    activation_fn: str,
    activation_dropout: float,
    name: str,
    causal: bool = False,
) -> MoELayer:
    """An MoE layer from the model's MoE options (see ``MoEConfig``) and the layer's sizes.

    ``causal``: the layer is in a decoder, where a position may not see later ones; it routes
    by ``--moe-decoder-routing`` (default ``--moe-routing``), and a method that is not causal
    (expert choice) is refused there (ValueError naming the layer)."""
    check_layer_options(moe_cfg, name, causal)
    gate = build_gate(moe_cfg, d_model, layer_routing(moe_cfg, causal))
    experts = build_experts(moe_cfg, d_model, ffn_dim, activation_fn, activation_dropout)
    shared = build_shared_experts(moe_cfg, d_model, ffn_dim, activation_fn, activation_dropout)
    eom = float(getattr(moe_cfg, "moe_eom", 0.0) or 0.0)
    compile_ = bool(getattr(moe_cfg, "moe_compile", False))
    return MoELayer(gate, experts, name=name, shared=shared, eom=eom, compile=compile_)
