"""Every rule across the MoE options, in one table: which flags, when it is broken, what to say.

``validate_moe_args`` runs the table once, at config time (``build_model`` of ``moe_transformer``
and ``moe_roberta``), and prefixes each message with the arch in use; a rule with
``warn=True`` logs instead of refusing. The rows marked ``layer=True`` concern what one MoE
layer is built from, and ``check_layer_options`` applies those same rows, with the layer's name
as the prefix, when a layer is built from a bare ``MoEConfig`` (``build_moe_layer``), so that
the wording is the same wherever a config is refused.

The routing methods, the expert kinds and the placements answer the questions the rules ask
(``causal``, ``supports_shared_experts``, ...); no rule compares a method's or a kind's name.
A module checks only its own arguments; the argument rows call those checks (one wording).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from fairseq.utils import get_available_activation_fns

from ..modules.expert_kinds import expert_kind, placement
from ..modules.expert_parallel import expert_parallel_groups
from ..modules.gate import (
    check_fallback_expert,
    check_method_options,
    check_router_options,
    check_routing_options,
)
from ..modules.routing import ROUTING_METHODS, RoutingMethod, RoutingMode, routing_method

logger = logging.getLogger(__name__)

SHARED_CONFLICT = (
    "--moe-shared-experts needs --moe-expert-type ffn and --moe-expert-placement replace: LoRA "
    "experts and the parallel placement already run the layer's dense FFN for every token (a "
    "shared expert)"
)
CMR_CONFLICT = (
    "--moe-cmr mixes the layer's own dense FFN with the MoE output; it does not combine with "
    "--moe-expert-placement parallel (which adds the two) nor with --moe-expert-type lora "
    "(whose experts already hold the dense FFN)"
)


# fairseq DDP backends that leave the expert shards (``p.expert``) out of their all-reduce.
EXPERT_PARALLEL_DDP_BACKENDS = ("c10d", "pytorch_ddp", "legacy_ddp", "no_c10d")


class Options:
    """The options a rule reads: the flags (``o.<name>``, None when absent) and what the
    registries say about them. ``layer_causal`` is set when one layer is checked: None for a
    whole model, else whether that layer is in a decoder."""

    def __init__(self, args, has_decoder: bool = True, layer_causal: bool | None = None):
        self.args, self.has_decoder, self.layer_causal = args, has_decoder, layer_causal

    def __getattr__(self, name: str):
        return getattr(self.args, name, None)

    def flag(self, name: str):
        return getattr(self.args, name, None)

    @cached_property
    def encoder_method(self) -> RoutingMethod:
        return routing_method(self.args.moe_routing)

    @cached_property
    def decoder_method(self) -> RoutingMethod | None:
        """The routing of the decoder's MoE layers, or None where there are none."""
        if self.layer_causal is False:
            return None
        if self.layer_causal is None and not (self.has_decoder and self.decoder_moe_freq > 0):
            return None
        return routing_method(decoder_routing(self.args))

    @cached_property
    def methods(self) -> list[RoutingMethod]:
        """The routing methods in use, encoder first (one when a layer is checked)."""
        if self.layer_causal:
            return [self.decoder_method]
        used = [self.encoder_method]
        if self.decoder_method is not None and self.decoder_method is not self.encoder_method:
            used.append(self.decoder_method)
        return used

    @cached_property
    def kind(self):
        return expert_kind(self.args)

    @cached_property
    def place(self):
        return placement(self.args)

    @property
    def upcycled(self) -> bool:
        return bool(self.moe_init_from_dense or self.moe_upcycled_from)


def decoder_routing(args) -> str:
    """The routing of the decoder's MoE layers: --moe-decoder-routing, else --moe-routing."""
    return str(getattr(args, "moe_decoder_routing", None) or args.moe_routing)


@dataclass(frozen=True)
class Rule:
    """One row: ``broken(o)`` is True when the options break it; ``message`` says why (a string,
    or a function of the options). An argument row instead has ``check``, a module's own check
    that raises ValueError with the message."""

    flags: tuple[str, ...]
    broken: Callable[[Options], bool] | None = None
    message: str | Callable[[Options], str] = ""
    warn: bool = False
    layer: bool = False  # also checked by check_layer_options
    check: Callable[[Options], None] | None = None

    def violation(self, o: Options) -> str | None:
        if self.check is not None:
            try:
                self.check(o)
            except ValueError as err:
                return str(err)
            return None
        if not self.broken(o):
            return None
        return self.message(o) if callable(self.message) else self.message


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_fp16(o: Options) -> bool:
    """--fp16/--bf16 flatten every parameter into one fp32 buffer (unless told not to)."""
    return bool(o.fp16 or o.bf16) and not (
        o.memory_efficient_fp16 or o.memory_efficient_bf16 or o.fp16_no_flatten_grads
    )


def _sharded(o: Options) -> bool:
    return str(o.moe_checkpoint_format or "consolidated") == "sharded"


def _expert_parallel(o: Options) -> bool:
    """P > 1 in a run with several processes (one process holds every expert otherwise)."""
    return o.moe_expert_parallel_size > 1 and dist.is_available() and dist.is_initialized()


def _parallel_groups(o: Options) -> None:
    """The layout's own check that P divides the number of processes (builds the groups)."""
    if _expert_parallel(o):
        expert_parallel_groups(o.moe_expert_parallel_size)


def _method_options(o: Options) -> None:
    """The routing methods' own options, for each method in use; the bias balances the
    methods that take it, so a model whose other stack routes otherwise (expert choice in the
    encoder, say) balances only that one (``build_moe_layer``)."""
    biased = [m for m in o.methods if m.bias_balancing] or o.methods
    for method in sorted(o.methods, key=lambda m: m.name):
        rate = o.moe_bias_balancing_rate if method in biased else 0.0
        check_method_options(
            method.name, o.moe_expert_capacity_factor, str(o.moe_capacity_priority), rate
        )


def _unread_method_flags(o: Options) -> list[str]:
    """The options that only some routing methods read (their ``flags``), set away from their
    default while no method in use reads them."""
    unread = []
    for method in ROUTING_METHODS.values():
        for name, default in method.flags.items():
            readers = [m for m in ROUTING_METHODS.values() if name in m.flags]
            if method is readers[0] and o.flag(name) not in (None, default):
                if not any(m in o.methods for m in readers):
                    unread.append(
                        f"{_flag(name)} has no effect: only "
                        f"{' and '.join(m.title for m in readers)} reads it, and the model routes "
                        f"by {' and '.join(m.name for m in o.methods)}"
                    )
    return unread


_SHARDED_REFUSES = {
    "moe_save_trainable_only": "adapter-only checkpoints already leave the frozen base out",
    "store_ema": "the EMA model's copy of the experts would be gathered on one process",
    "write_checkpoints_asynchronously": "every process writes its shards while fairseq "
    "waits for them",
}


RULES: list[Rule] = [
    # --- the registered names (every later row reads the objects they name) --------------
    Rule(("moe_routing", "moe_decoder_routing"),
         check=lambda o: (routing_method(o.moe_routing),
                          routing_method(decoder_routing(o.args), "--moe-decoder-routing"))),
    Rule(("moe_expert_type",), check=lambda o: expert_kind(o.args)),
    Rule(("moe_expert_placement",), check=lambda o: placement(o.args)),
    # --- sizes and the router's own arguments (the modules' checks, one wording) ------------
    Rule(("moe_expert_count", "moe_top_k", "moe_jitter_eps", "moe_expert_parallel_size"),
         check=lambda o: check_routing_options(o.moe_expert_count, o.moe_top_k,
                                               o.moe_jitter_eps, o.moe_expert_parallel_size)),
    *[Rule((side,), lambda o, s=side: o.flag(s) < 0,
           lambda o, s=side: f"{_flag(s)} must be >= 0 (0 = no MoE layers), got {o.flag(s)}")
      for side in ("encoder_moe_freq", "decoder_moe_freq")],
    Rule(("moe_expert_ffn_dim",),
         lambda o: o.moe_expert_ffn_dim is not None and o.moe_expert_ffn_dim < 1,
         lambda o: f"--moe-expert-ffn-dim must be >= 1, got {o.moe_expert_ffn_dim}"),
    Rule(("moe_activation_fn",),
         lambda o: o.moe_activation_fn is not None
         and str(o.moe_activation_fn) not in get_available_activation_fns(),
         lambda o: f"--moe-activation-fn {o.moe_activation_fn!r} is not one of "
         f"{get_available_activation_fns()}"),
    *[Rule((f"{side}_moe_freq", f"{side}_layers"),
           lambda o, s=side: o.flag(f"{s}_layers") is not None
           and o.flag(f"{s}_moe_freq") > o.flag(f"{s}_layers"),
           lambda o, s=side: f"--{s}-moe-freq {o.flag(f'{s}_moe_freq')} > --{s}-layers "
           f"{o.flag(f'{s}_layers')}: the {s} has no MoE layer", warn=True)
      for side in ("encoder", "decoder")],
    Rule(("moe_routing", "moe_dense_routing_until", "moe_router_temperature",
          "moe_balance_loss", "moe_usage_ema"),
         check=lambda o: check_router_options(str(o.moe_routing), o.moe_dense_routing_until,
                                              o.moe_router_temperature, str(o.moe_balance_loss),
                                              o.moe_usage_ema)),
    Rule(("moe_fallback_expert", "moe_expert_count"),
         check=lambda o: check_fallback_expert(o.moe_fallback_expert, o.moe_expert_count)),
    Rule(("moe_upcycle_noise",), lambda o: o.moe_upcycle_noise < 0,
         lambda o: f"--moe-upcycle-noise must be >= 0, got {o.moe_upcycle_noise}"),
    # --- expert parallelism ---------------------------------------------------------------
    Rule(("moe_expert_parallel_size",), check=_parallel_groups),
    Rule(("moe_expert_parallel_size", "ddp_backend"),
         lambda o: _expert_parallel(o)
         and str(o.ddp_backend or "pytorch_ddp") not in EXPERT_PARALLEL_DDP_BACKENDS,
         lambda o: f"--ddp-backend {o.ddp_backend} cannot keep sharded experts out of its "
         f"all-reduce; use one of {', '.join(EXPERT_PARALLEL_DDP_BACKENDS)} with "
         "--moe-expert-parallel-size"),
    Rule(("moe_expert_parallel_size", "fp16", "bf16"),
         lambda o: _expert_parallel(o) and _check_fp16(o),
         "--fp16/--bf16 flatten every parameter into one fp32 buffer, which cannot hold "
         "sharded experts apart; add --fp16-no-flatten-grads (or use "
         "--memory-efficient-fp16/--memory-efficient-bf16) with --moe-expert-parallel-size"),
    Rule(("moe_expert_parallel_size", "encoder_layerdrop", "decoder_layerdrop"),
         lambda o: _expert_parallel(o) and bool(o.encoder_layerdrop or o.decoder_layerdrop),
         "LayerDrop skips different layers on different processes, which the experts' "
         "all-to-all cannot follow; set --encoder-layerdrop 0 --decoder-layerdrop 0"),
    # --- sharded checkpoints --------------------------------------------------------------
    *[Rule(("moe_checkpoint_format", flag), lambda o, f=flag: _sharded(o) and bool(o.flag(f)),
           f"--moe-checkpoint-format sharded does not support {_flag(flag)} ({reason}); use "
           "--moe-checkpoint-format consolidated")
      for flag, reason in _SHARDED_REFUSES.items()],
    Rule(("moe_checkpoint_format", "ddp_backend"),
         lambda o: _sharded(o) and str(o.ddp_backend or "") == "fully_sharded",
         "--moe-checkpoint-format sharded does not support --ddp-backend fully_sharded, which "
         "has sharded checkpoints of its own (--use-sharded-state)"),
    # --- routing methods ------------------------------------------------------------------
    Rule(("moe_routing", "moe_decoder_routing", "decoder_moe_freq"),
         lambda o: o.decoder_method is not None and not o.decoder_method.causal,
         lambda o: f"{o.decoder_method.title} is not causal, so it cannot run in a decoder: "
         f"{o.decoder_method.reason('causal')}. Use it in the encoder with "
         "--moe-decoder-routing topk, or set --decoder-moe-freq 0", layer=True),
    Rule(("moe_decoder_routing", "decoder_moe_freq"),
         lambda o: o.layer_causal is None and o.decoder_method is None
         and o.moe_decoder_routing is not None,
         "--moe-decoder-routing has no effect: the model has no decoder MoE layer", warn=True),
    Rule(("moe_expert_capacity_factor", "moe_capacity_priority", "moe_bias_balancing_rate"),
         check=_method_options),
    Rule(("moe_routing", "moe_decoder_routing"), lambda o: bool(_unread_method_flags(o)),
         lambda o: "; ".join(_unread_method_flags(o)), warn=True),
    Rule(("moe_capacity_priority", "moe_routing"),
         lambda o: str(o.moe_capacity_priority) == "random"
         and not any(m.has_capacity for m in o.methods),
         "--moe-capacity-priority random has no effect: only top-k routing has a capacity",
         warn=True),
    Rule(("moe_routing", "moe_balance_loss"),
         lambda o: o.encoder_method.mode is RoutingMode.DENSE
         and str(o.moe_balance_loss) == "switch",
         "--moe-routing dense with --moe-balance-loss switch: under dense routing every expert "
         "gets every token, so the Switch loss is constant (1) and balances nothing; "
         "--moe-balance-loss mse balances the routing probabilities", warn=True),
    # --- shared experts, EOM, CMR ---------------------------------------------------------
    Rule(("moe_shared_experts",), lambda o: o.moe_shared_experts < 0,
         lambda o: f"--moe-shared-experts must be >= 0 (0 = none), got {o.moe_shared_experts}"),
    Rule(("moe_shared_expert_gate", "moe_shared_experts"),
         lambda o: bool(o.moe_shared_expert_gate) and not o.moe_shared_experts,
         "--moe-shared-expert-gate gates the shared experts: it needs --moe-shared-experts >= 1"),
    Rule(("moe_shared_experts", "moe_expert_type", "moe_expert_placement"),
         lambda o: bool(o.moe_shared_experts)
         and not (o.kind.supports_shared_experts and o.place.allows_shared_experts),
         SHARED_CONFLICT, layer=True),
    Rule(("moe_eom",), lambda o: not 0.0 <= (o.moe_eom or 0.0) < 1.0,
         lambda o: f"--moe-eom must be in [0, 1) (0 = off), got {o.moe_eom}"),
    Rule(("moe_cmr_gate_dropout",), lambda o: not 0.0 <= (o.moe_cmr_gate_dropout or 0.0) < 1.0,
         lambda o: f"--moe-cmr-gate-dropout must be in [0, 1), got {o.moe_cmr_gate_dropout}"),
    Rule(("moe_cmr_gate_dropout", "moe_cmr"),
         lambda o: (o.moe_cmr_gate_dropout or 0.0) > 0 and not o.moe_cmr,
         "--moe-cmr-gate-dropout has no effect without --moe-cmr", warn=True),
    Rule(("moe_cmr", "moe_expert_type", "moe_expert_placement"),
         lambda o: bool(o.moe_cmr) and not (o.kind.supports_cmr and o.place.allows_cmr),
         CMR_CONFLICT, layer=True),
    # --- expert kinds and placement -------------------------------------------------------
    Rule(("moe_lora_rank",), lambda o: o.kind.reads_lora_options and o.moe_lora_rank < 1,
         lambda o: f"--moe-lora-rank must be >= 1, got {o.moe_lora_rank}"),
    Rule(("moe_lora_alpha",), lambda o: o.kind.reads_lora_options and not o.moe_lora_alpha > 0,
         lambda o: f"--moe-lora-alpha must be > 0, got {o.moe_lora_alpha}"),
    Rule(("moe_lora_dropout",),
         lambda o: o.kind.reads_lora_options and not 0.0 <= o.moe_lora_dropout < 1.0,
         lambda o: f"--moe-lora-dropout must be in [0, 1), got {o.moe_lora_dropout}"),
    Rule(("moe_expert_type", "moe_expert_placement"),
         lambda o: o.place.keeps_dense_ffn and not o.kind.supports_parallel_placement,
         lambda o: f"--moe-expert-type {o.kind.kind} already adds each expert's deltas to the "
         "layer's frozen FFN; use it with --moe-expert-placement replace"),
    Rule(("moe_expert_type", "moe_expert_parallel_size"),
         lambda o: o.moe_expert_parallel_size > 1 and not o.kind.supports_expert_parallel,
         lambda o: f"--moe-expert-type {o.kind.kind} does not support "
         "--moe-expert-parallel-size > 1"),
    *[Rule(("moe_expert_type", flag),
           lambda o, f=flag: o.kind.shares_dense_ffn and o.flag(f) is not None,
           lambda o, f=flag: f"{_flag(f)} does not apply to --moe-expert-type {o.kind.kind}: "
           "its experts share the layer's dense FFN (its size and activation)")
      for flag in ("moe_expert_ffn_dim", "moe_activation_fn")],
    # --- frozen base, adapters, upcycling -------------------------------------------------
    Rule(("moe_save_trainable_only", "moe_freeze_base"),
         lambda o: bool(o.moe_save_trainable_only) and not o.moe_freeze_base,
         "--moe-save-trainable-only needs --moe-freeze-base (else everything is trained)"),
    Rule(("moe_save_trainable_only", "moe_init_from_dense"),
         lambda o: bool(o.moe_save_trainable_only) and bool(o.moe_freeze_base)
         and not (o.moe_init_from_dense or o.moe_base_sha256),
         "--moe-save-trainable-only needs --moe-init-from-dense: the dense checkpoint the frozen "
         "weights come from, which adapter-only checkpoints refer to"),
    Rule(("moe_freeze_base", "moe_init_from_dense"),
         lambda o: bool(o.moe_freeze_base) and not o.upcycled,
         "--moe-freeze-base without --moe-init-from-dense freezes a randomly initialised base",
         warn=True),
    Rule(("moe_train_heads", "moe_freeze_base"),
         lambda o: bool(o.moe_train_heads) and not o.moe_freeze_base,
         "--moe-train-heads has no effect without --moe-freeze-base", warn=True),
    Rule(("moe_init_from_dense", "moe_normalize_top_k"),
         lambda o: bool(o.moe_init_from_dense) and not o.moe_normalize_top_k
         and not (o.place.experts_start_at_zero or o.kind.shares_dense_ffn
                  or o.encoder_method.mode is RoutingMode.DENSE),
         "--moe-init-from-dense without --moe-normalize-top-k: the experts' outputs are "
         "weighted by raw router probabilities (about 1/E at first), so the upcycled model "
         "does not start from what the dense model computes", warn=True),
    Rule(("moe_top_k", "moe_normalize_top_k"),
         lambda o: o.moe_top_k == 1 and bool(o.moe_normalize_top_k),
         "--moe-normalize-top-k with --moe-top-k 1 makes every gate weight 1: the router then "
         "learns only from the balance and z losses", warn=True),
    # --- int8 (fairseq-moe-quantize writes it; inference only) ----------------------------
    Rule(("moe_int8", "moe_expert_type"),
         lambda o: str(o.moe_int8 or "off") != "off" and not o.kind.supports_int8,
         lambda o: f"--moe-int8 {o.moe_int8} supports FFN experts only, not --moe-expert-type "
         f"{o.kind.kind}"),
    Rule(("moe_int8", "moe_expert_parallel_size"),
         lambda o: str(o.moe_int8 or "off") != "off" and o.moe_expert_parallel_size > 1,
         lambda o: f"--moe-int8 {o.moe_int8} runs on one process: --moe-expert-parallel-size "
         "must be 1"),
    Rule(("moe_int8", "moe_freeze_base", "moe_save_trainable_only"),
         lambda o: str(o.moe_int8 or "off") != "off"
         and bool(o.moe_freeze_base or o.moe_save_trainable_only),
         lambda o: f"--moe-int8 {o.moe_int8} is for inference: not with "
         "--moe-freeze-base/--moe-save-trainable-only"),
    Rule(("moe_compile", "moe_capacity_factor", "moe_eval_capacity_factor", "moe_routing",
          "moe_decoder_routing", "moe_expert_parallel_size"),
         lambda o: bool(o.moe_compile) and (max(o.moe_capacity_factor, o.moe_eval_capacity_factor)
            > 0 or o.moe_expert_parallel_size > 1 or not all(m.batch_independent for m in o.methods)),
         lambda o: "--moe-compile needs dropless, batch-independent routing on one process "
         "(--moe-capacity-factor 0, --moe-eval-capacity-factor 0, top-k or dense routing, "
         "--moe-expert-parallel-size 1): padding makes the token count data-dependent in the graph"),
]  # fmt: skip


def apply_rules(o: Options, rules: list[Rule], prefix: str) -> None:
    """Check ``rules`` in table order: the first broken one raises ValueError(``prefix: why``)
    (later rows may read what an earlier row checks), each broken warning row is logged."""
    for rule in rules:
        message = rule.violation(o)
        if message is None:
            continue
        if not rule.warn:
            raise ValueError(f"{prefix}: {message}")
        logger.warning(message)


def validate_moe_args(args, has_decoder: bool = True) -> None:
    """Refuse impossible MoE settings with a message that names the arch in use and the flag,
    and warn about settings that do nothing (``has_decoder``: False for encoder-only models,
    moe_roberta)."""
    apply_rules(Options(args, has_decoder), RULES, getattr(args, "arch", None) or "moe")


def check_layer_options(moe_cfg, name: str, causal: bool) -> None:
    """The ``layer=True`` rows for one layer built from ``moe_cfg`` (``name`` prefixes the
    message; ``causal``: the layer is in a decoder)."""
    layer_rows = [r for r in RULES if r.layer]
    apply_rules(Options(moe_cfg, layer_causal=causal), layer_rows, name)
