"""Validation of the MoE options (``MoEConfig``): impossible settings are refused with a message
that names the arch in use and the flag; settings that do nothing are warned about."""

import logging
from argparse import Namespace

import torch.distributed as dist
from fairseq.utils import get_available_activation_fns

from ..modules.expert_parallel import expert_parallel_groups
from ..modules.gate import (
    check_fallback_expert,
    check_method_options,
    check_router_options,
    check_routing_options,
)

logger = logging.getLogger(__name__)


def validate_moe_args(args: Namespace, has_decoder: bool = True) -> None:
    """Reject impossible MoE settings with a message that names the arch in use and the flag
    (``has_decoder``: False for encoder-only models, moe_roberta)."""
    arch = getattr(args, "arch", None) or "moe"

    def fail(msg: str) -> None:
        raise ValueError(f"{arch}: {msg}")

    try:  # E, k and jitter: the one check the gate and the experts use too
        check_routing_options(
            args.moe_expert_count,
            args.moe_top_k,
            args.moe_jitter_eps,
            args.moe_expert_parallel_size,
        )
    except ValueError as err:
        fail(str(err))
    for flag in ("encoder_moe_freq", "decoder_moe_freq"):
        if getattr(args, flag) < 0:
            fail(
                f"--{flag.replace('_', '-')} must be >= 0 (0 = no MoE layers), "
                f"got {getattr(args, flag)}"
            )
    if args.moe_expert_ffn_dim is not None and args.moe_expert_ffn_dim < 1:
        fail(f"--moe-expert-ffn-dim must be >= 1, got {args.moe_expert_ffn_dim}")
    activation = args.moe_activation_fn
    if activation is not None and str(activation) not in get_available_activation_fns():
        fail(f"--moe-activation-fn {activation!r} is not one of {get_available_activation_fns()}")
    for side in ("encoder", "decoder"):
        freq, layers = getattr(args, f"{side}_moe_freq"), getattr(args, f"{side}_layers", None)
        if layers is not None and freq > layers:  # encoder-only models have no decoder
            logger.warning(
                f"--{side}-moe-freq {freq} > --{side}-layers {layers}: the {side} has no MoE layer"
            )
    try:
        check_router_options(
            str(args.moe_routing),
            args.moe_dense_routing_until,
            args.moe_router_temperature,
            str(args.moe_balance_loss),
            args.moe_usage_ema,
        )
    except ValueError as err:
        fail(str(err))
    try:
        check_fallback_expert(args.moe_fallback_expert, args.moe_expert_count)
    except ValueError as err:
        fail(str(err))
    _validate_expert_parallel(args, fail)
    _validate_checkpoint_format(args, fail)
    _validate_routing_methods(args, fail, has_decoder)
    _validate_adapters(args, fail)
    _validate_int8(args, fail)
    if args.moe_upcycle_noise < 0:
        fail(f"--moe-upcycle-noise must be >= 0, got {args.moe_upcycle_noise}")
    starts_exact = (
        str(args.moe_expert_placement) == "parallel"
        or str(args.moe_expert_type) == "lora"
        or str(args.moe_routing) == "dense"
    )  # the experts add nothing at first, or the combine weights sum to 1
    if args.moe_init_from_dense and not args.moe_normalize_top_k and not starts_exact:
        logger.warning(
            "--moe-init-from-dense without --moe-normalize-top-k: the experts' outputs are "
            "weighted by raw router probabilities (about 1/E at first), so the upcycled model "
            "does not start from what the dense model computes"
        )
    if args.moe_top_k == 1 and args.moe_normalize_top_k:
        logger.warning(
            "--moe-normalize-top-k with --moe-top-k 1 makes every gate weight 1: "
            "the router then learns only from the balance and z losses"
        )


def _validate_adapters(args: Namespace, fail) -> None:
    """LoRA experts, the parallel placement, the frozen base and adapter-only checkpoints."""
    lora = str(args.moe_expert_type) == "lora"
    if lora:
        if args.moe_lora_rank < 1:
            fail(f"--moe-lora-rank must be >= 1, got {args.moe_lora_rank}")
        if not args.moe_lora_alpha > 0:
            fail(f"--moe-lora-alpha must be > 0, got {args.moe_lora_alpha}")
        if not 0.0 <= args.moe_lora_dropout < 1.0:
            fail(f"--moe-lora-dropout must be in [0, 1), got {args.moe_lora_dropout}")
        if str(args.moe_expert_placement) == "parallel":
            fail(
                "--moe-expert-type lora already adds each expert's deltas to the layer's frozen "
                "FFN; use it with --moe-expert-placement replace"
            )
        if args.moe_expert_parallel_size > 1:
            fail("--moe-expert-type lora does not support --moe-expert-parallel-size > 1")
        for flag in ("moe_expert_ffn_dim", "moe_activation_fn"):
            if getattr(args, flag) is not None:
                fail(
                    f"--{flag.replace('_', '-')} does not apply to --moe-expert-type lora: "
                    "LoRA experts share the layer's dense FFN (its size and activation)"
                )
    upcycled = bool(args.moe_init_from_dense or getattr(args, "moe_upcycled_from", None))
    if args.moe_save_trainable_only:
        if not args.moe_freeze_base:
            fail("--moe-save-trainable-only needs --moe-freeze-base (else everything is trained)")
        if not (args.moe_init_from_dense or getattr(args, "moe_base_sha256", None)):
            fail(
                "--moe-save-trainable-only needs --moe-init-from-dense: the dense checkpoint "
                "the frozen weights come from, which adapter-only checkpoints refer to"
            )
    if args.moe_freeze_base and not upcycled:
        logger.warning(
            "--moe-freeze-base without --moe-init-from-dense freezes a randomly initialised base"
        )
    if args.moe_train_heads and not args.moe_freeze_base:
        logger.warning("--moe-train-heads has no effect without --moe-freeze-base")
    if str(args.moe_routing) == "dense" and str(args.moe_balance_loss) == "switch":
        logger.warning(
            "--moe-routing dense with --moe-balance-loss switch: under dense routing every "
            "expert gets every token, so the Switch loss is constant (1) and balances nothing; "
            "--moe-balance-loss mse balances the routing probabilities"
        )


def decoder_routing(args) -> str:
    """The routing of the decoder's MoE layers: --moe-decoder-routing, else --moe-routing."""
    return str(getattr(args, "moe_decoder_routing", None) or args.moe_routing)


def _validate_routing_methods(args: Namespace, fail, has_decoder: bool) -> None:
    """Expert choice, bias balancing, capacity priority, shared experts, EOM and CMR."""
    routings = {str(args.moe_routing)}
    decoder_moe = has_decoder and args.decoder_moe_freq > 0
    if decoder_moe:
        routings.add(decoder_routing(args))
        if decoder_routing(args) == "expert_choice":
            fail(
                "expert-choice routing cannot run in a decoder: each expert picks its tokens "
                "among all the batch's tokens, future ones included, so a token's output would "
                "depend on tokens not generated yet, and incremental decoding (one token per "
                "step) has no batch of tokens to choose from. Use it in the encoder with "
                "--moe-decoder-routing topk, or set --decoder-moe-freq 0"
            )
    elif getattr(args, "moe_decoder_routing", None) is not None:
        logger.warning("--moe-decoder-routing has no effect: the model has no decoder MoE layer")
    # The bias balances top-k layers; a model whose other stack routes otherwise (expert choice
    # in the encoder, say) balances its top-k stack only (build_moe_layer).
    bias_routings = routings & {"topk"} or routings
    try:
        for routing in sorted(routings):
            rate = args.moe_bias_balancing_rate if routing in bias_routings else 0.0
            check_method_options(
                routing,
                args.moe_expert_capacity_factor,
                str(args.moe_capacity_priority),
                rate,
            )
    except ValueError as err:
        fail(str(err))
    if str(args.moe_capacity_priority) == "random" and "topk" not in routings:
        logger.warning(
            "--moe-capacity-priority random has no effect: only top-k routing has a capacity"
        )
    if args.moe_shared_experts < 0:
        fail(f"--moe-shared-experts must be >= 0 (0 = none), got {args.moe_shared_experts}")
    if args.moe_shared_expert_gate and args.moe_shared_experts == 0:
        fail(
            "--moe-shared-expert-gate gates the shared experts: it needs --moe-shared-experts >= 1"
        )
    if args.moe_shared_experts and str(args.moe_expert_type) == "lora":
        fail("--moe-shared-experts needs --moe-expert-type ffn (LoRA experts share the dense FFN)")
    if args.moe_shared_experts and str(args.moe_expert_placement) == "parallel":
        fail(
            "--moe-shared-experts needs --moe-expert-placement replace: the parallel placement "
            "already runs the dense FFN for every token (a shared expert)"
        )
    if not 0.0 <= args.moe_eom < 1.0:
        fail(f"--moe-eom must be in [0, 1) (0 = off), got {args.moe_eom}")
    if not 0.0 <= args.moe_cmr_gate_dropout < 1.0:
        fail(f"--moe-cmr-gate-dropout must be in [0, 1), got {args.moe_cmr_gate_dropout}")
    if args.moe_cmr_gate_dropout > 0 and not args.moe_cmr:
        logger.warning("--moe-cmr-gate-dropout has no effect without --moe-cmr")
    if args.moe_cmr:
        if str(args.moe_expert_placement) == "parallel":
            fail(
                "--moe-cmr mixes a dense FFN and the MoE output with a learned gate; "
                "--moe-expert-placement parallel adds them unweighted: use one of the two"
            )
        if str(args.moe_expert_type) == "lora":
            fail(
                "--moe-cmr needs --moe-expert-type ffn: LoRA experts already run the layer's "
                "dense FFN for every token"
            )


# fairseq DDP backends that leave the expert shards (``p.expert``) out of their all-reduce.
EXPERT_PARALLEL_DDP_BACKENDS = ("c10d", "pytorch_ddp", "legacy_ddp", "no_c10d")


def _validate_int8(args: Namespace, fail) -> None:
    """int8 models are built by fairseq-moe-quantize for CPU inference: no training options."""
    mode = str(args.moe_int8)
    if mode == "off":
        return
    if str(args.moe_expert_type) == "lora":
        fail(f"--moe-int8 {mode} supports FFN experts only, not --moe-expert-type lora")
    if args.moe_expert_parallel_size > 1:
        fail(f"--moe-int8 {mode} runs on one process: --moe-expert-parallel-size must be 1")
    if args.moe_freeze_base or args.moe_save_trainable_only:
        fail(
            f"--moe-int8 {mode} is for inference: not with --moe-freeze-base/--moe-save-trainable-only"
        )


def _validate_checkpoint_format(args: Namespace, fail) -> None:
    """What --moe-checkpoint-format sharded cannot write."""
    if str(getattr(args, "moe_checkpoint_format", "consolidated")) != "sharded":
        return
    refused = {
        "moe_save_trainable_only": "adapter-only checkpoints already leave the frozen base out",
        "store_ema": "the EMA model's copy of the experts would be gathered on one process",
        "write_checkpoints_asynchronously": "every process writes its shards while fairseq "
        "waits for them",
    }
    for flag, reason in refused.items():
        if getattr(args, flag, False):
            fail(
                f"--moe-checkpoint-format sharded does not support --{flag.replace('_', '-')} "
                f"({reason}); use --moe-checkpoint-format consolidated"
            )
    if str(getattr(args, "ddp_backend", "")) == "fully_sharded":
        fail(
            "--moe-checkpoint-format sharded does not support --ddp-backend fully_sharded, which "
            "has sharded checkpoints of its own (--use-sharded-state)"
        )


def _validate_expert_parallel(args: Namespace, fail) -> None:
    """The settings --moe-expert-parallel-size P > 1 needs (``fail`` raises with the arch)."""
    size = args.moe_expert_parallel_size  # >= 1 and dividing E: check_routing_options
    if size == 1 or not (dist.is_available() and dist.is_initialized()):
        return  # one process holds every expert (a checkpoint trained with P > 1 loads so)
    try:  # the layout's own check that P divides the number of processes (builds the groups)
        expert_parallel_groups(size)
    except ValueError as err:
        fail(str(err))
    backend = str(getattr(args, "ddp_backend", "pytorch_ddp"))
    if backend not in EXPERT_PARALLEL_DDP_BACKENDS:
        fail(
            f"--ddp-backend {backend} cannot keep sharded experts out of its all-reduce; "
            f"use one of {', '.join(EXPERT_PARALLEL_DDP_BACKENDS)} with --moe-expert-parallel-size"
        )
    flat_fp16 = (getattr(args, "fp16", False) or getattr(args, "bf16", False)) and not (
        getattr(args, "memory_efficient_fp16", False)
        or getattr(args, "memory_efficient_bf16", False)
        or getattr(args, "fp16_no_flatten_grads", False)
    )
    if flat_fp16:
        fail(
            "--fp16/--bf16 flatten every parameter into one fp32 buffer, which cannot hold "
            "sharded experts apart; add --fp16-no-flatten-grads (or use "
            "--memory-efficient-fp16/--memory-efficient-bf16) with --moe-expert-parallel-size"
        )
    layerdrop = (
        getattr(args, "encoder_layerdrop", 0) or 0,
        getattr(args, "decoder_layerdrop", 0) or 0,
    )
    if any(layerdrop):
        fail(
            "LayerDrop skips different layers on different processes, which the experts' "
            "all-to-all cannot follow; set --encoder-layerdrop 0 --decoder-layerdrop 0"
        )
