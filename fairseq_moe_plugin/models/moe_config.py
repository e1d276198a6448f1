"""The MoE options of ``moe_transformer`` and ``moe_roberta``: one dataclass, with help text,
from which the command-line flags and the README's flags table are generated, and their
validation."""

import logging
from argparse import Namespace
from dataclasses import dataclass, field, fields
from typing import Optional

import torch.distributed as dist
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import get_available_activation_fns

from ..modules.expert_compute import IMPLS
from ..modules.expert_parallel import expert_parallel_groups
from ..modules.gate import (
    BALANCE_LOSSES,
    ROUTINGS,
    check_fallback_expert,
    check_router_options,
    check_routing_options,
)

logger = logging.getLogger(__name__)

ACTIVATION_CHOICES = ChoiceEnum(get_available_activation_fns())
UPCYCLE_ROUTER_CHOICES = ChoiceEnum(["random", "zero"])
EXPERT_IMPL_CHOICES = ChoiceEnum(list(IMPLS))
ROUTING_CHOICES = ChoiceEnum(list(ROUTINGS))
BALANCE_LOSS_CHOICES = ChoiceEnum(list(BALANCE_LOSSES))
PLACEMENT_CHOICES = ChoiceEnum(["replace", "parallel"])
INT8_MODES = ("off", "dynamic", "weight_only")
INT8_CHOICES = ChoiceEnum(list(INT8_MODES))
EXPERT_TYPE_CHOICES = ChoiceEnum(["ffn", "lora"])


@dataclass
class MoEConfig(FairseqDataclass):
    moe_expert_count: int = field(
        default=8, metadata={"help": "number of experts E in every MoE layer (>= 1)"}
    )
    moe_top_k: int = field(
        default=2, metadata={"help": "experts per token k, 1 <= k <= --moe-expert-count"}
    )
    moe_normalize_top_k: bool = field(
        default=False,
        metadata={
            "help": "rescale the k chosen gate probabilities to sum to 1 (GShard/Mixtral style); "
            "by default they are the raw softmax probabilities (Switch style). With k=1 "
            "normalising makes every weight 1, so the router learns only from the aux losses"
        },
    )
    moe_capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "training capacity per expert = ceil(factor * k * tokens / E); "
            "<= 0 means dropless (no token is ever dropped)"
        },
    )
    moe_eval_capacity_factor: float = field(
        default=0.0,
        metadata={
            "help": "capacity factor in evaluation and generation; <= 0 (default) means "
            "dropless, so a token's routing never depends on the rest of the batch"
        },
    )
    moe_jitter_eps: float = field(
        default=0.0,
        metadata={
            "help": "multiplicative jitter on the router input in training, "
            "x * U(1-eps, 1+eps) (Switch Transformer sec. 2.4); 0 disables it"
        },
    )
    moe_expert_ffn_dim: Optional[int] = field(
        default=None,
        metadata={"help": "hidden size of every expert; default: the layer's FFN size"},
    )
    moe_activation_fn: Optional[ACTIVATION_CHOICES] = field(
        default=None,
        metadata={"help": "activation inside the experts; default: --activation-fn"},
    )
    moe_no_grad_buffer_reuse: bool = field(
        default=False,
        metadata={
            "help": "CPU training: allocate the experts' stacked weight gradients afresh every "
            "update instead of reusing the previous update's buffers when nothing holds them. "
            "Reuse saves page-faulting E x d_ff x d_model of new memory per MoE layer and update "
            "(the README's performance section measures it) but keeps those buffers allocated "
            "between updates; no effect on GPU"
        },
    )
    moe_expert_impl: EXPERT_IMPL_CHOICES = field(
        default="auto",
        metadata={
            "help": "how the experts' matmuls are issued: auto (default) picks per call: "
            "grouped_mm (torch's grouped GEMM, no host sync) on a GPU in bf16; on CPU, padded "
            "(one batched matmul over an experts x rows grid) for inference on few tokens per "
            "expert, such as a decoding step, else loop (per-expert matmuls with the plugin's "
            "own backward). Name one to force it; padded is for inference only"
        },
    )
    moe_expert_parallel_size: int = field(
        default=1,
        metadata={
            "help": "expert parallelism: shard every MoE layer's experts over groups of this many "
            "processes (E/P experts each; tokens travel to their experts by all-to-all); the "
            "W/P groups are data-parallel replicas. Must divide --moe-expert-count and the "
            "number of processes; 1 = every process holds all experts. Checkpoints are "
            "consolidated: they load with any other value, and on one process"
        },
    )
    moe_init_from_dense: Optional[str] = field(
        default=None,
        metadata={
            "help": "sparse upcycling (Komatsuzaki et al. 2023): initialise from this dense "
            "fairseq checkpoint (a transformer, its encoder, or a roberta): every non-FFN weight "
            "copied, each MoE layer's experts copied from the dense FFN. Use with "
            "--moe-normalize-top-k, so that the experts' combine weights sum to 1"
        },
    )
    moe_upcycle_noise: float = field(
        default=0.0,
        metadata={
            "help": "with --moe-init-from-dense: add Gaussian noise of this many standard "
            "deviations of each dense weight to every expert copy, so experts can diverge"
        },
    )
    moe_upcycle_router_init: UPCYCLE_ROUTER_CHOICES = field(
        default="random",
        metadata={
            "help": "with --moe-init-from-dense: start the router at zero, or keep its usual "
            "random init"
        },
    )
    moe_routing: ROUTING_CHOICES = field(
        default="topk",
        metadata={
            "help": "topk (default): each token goes to its --moe-top-k experts; dense: every "
            "token goes to all experts, each weighted by its router probability, with no "
            "capacity and no drops (DyLoRA-MoE's dense collaboration; costs E expert passes)"
        },
    )
    moe_dense_routing_until: int = field(
        default=0,
        metadata={
            "help": "route densely while the update count is below this, then by --moe-routing "
            "(DyLoRA-MoE's maturity schedule, e.g. after fairseq-moe-grow-experts); the count is "
            "saved with the model, so a checkpoint routes as it was trained; 0 = off"
        },
    )
    moe_router_temperature: float = field(
        default=1.0,
        metadata={"help": "the router's softmax sees logits / this temperature (> 0)"},
    )
    moe_router_bias: bool = field(
        default=False,
        metadata={
            "help": "give the router a learned per-expert bias (fairseq-moe-grow-experts turns it "
            "on, to start new experts below the old ones)"
        },
    )
    moe_balance_loss: BALANCE_LOSS_CHOICES = field(
        default="switch",
        metadata={
            "help": "the load-balancing loss (weight: the criterion's --moe-balance-loss-weight): "
            "switch (Switch Transformer eq. 4-6) or mse (mean squared distance of the batch's "
            "mean routing probability from uniform, GLBL; = CV^2/E^2 of Shazeer et al. 2017 "
            "eq. 6); use mse with --moe-routing dense, where the Switch loss is constant"
        },
    )
    moe_usage_ema: float = field(
        default=0.0,
        metadata={
            "help": "keep an exponential moving average of each expert's load share with this "
            "decay (e.g. 0.99), updated every training batch by the MoE criteria, logged as "
            "moe_<layer>_ema_e<i> and saved in checkpoints; 0 = off"
        },
    )
    moe_fallback_expert: int = field(
        default=0,
        metadata={
            "help": "at inference (eval mode), a token whose router logits are NaN or inf goes to "
            "this expert alone, with weight 1, and is counted (fairseq-moe-serve's metrics), so "
            "that one bad input or a corrupted router cannot break the rest of a batch; -1 = off. "
            "Training never falls back"
        },
    )
    moe_int8: INT8_CHOICES = field(
        default="off",
        metadata={
            "help": "int8 inference weights, set by fairseq-moe-quantize (not a training option): "
            "dynamic = stacked experts int8 per expert and output channel and every other linear "
            "layer but the routers and heads by torch dynamic quantisation (int8 matmuls, "
            "activations quantised on the fly); weight_only = the same int8 weights, experts "
            "computed in fp32 from them; off = fp32. CPU inference only"
        },
    )
    moe_expert_placement: PLACEMENT_CHOICES = field(
        default="replace",
        metadata={
            "help": "replace (default): the MoE layer takes the FFN's place; parallel: the dense "
            "FFN stays and the MoE output is added to it, with the experts' output projections "
            "starting at zero, so that an upcycled model first computes what the dense one did "
            "(GLBL-style expert MLPs beside a frozen FFN)"
        },
    )
    moe_expert_type: EXPERT_TYPE_CHOICES = field(
        default="ffn",
        metadata={
            "help": "ffn (default): each expert is a full FFN; lora: each expert is its own "
            "low-rank deltas on fc1 and fc2 of the layer's frozen dense FFN (DyLoRA-MoE), mixed "
            "at each linear layer by the router weights (MoLoRA): the frozen FFN runs once per "
            "token with weight 1, so with top-1 or dense routing the model starts as the dense "
            "one"
        },
    )
    moe_lora_rank: int = field(
        default=8, metadata={"help": "with --moe-expert-type lora: the rank r of every delta"}
    )
    moe_lora_alpha: float = field(
        default=16.0,
        metadata={"help": "with --moe-expert-type lora: deltas are scaled by alpha / r"},
    )
    moe_lora_dropout: float = field(
        default=0.0,
        metadata={"help": "with --moe-expert-type lora: dropout on the deltas' input"},
    )
    moe_freeze_base: bool = field(
        default=False,
        metadata={
            "help": "train only the routers and the experts (LoRA deltas with --moe-expert-type "
            "lora): embeddings, attention, norms, dense FFNs, output projection and heads stay "
            "frozen, get no gradient and no optimizer state; use with --moe-init-from-dense"
        },
    )
    moe_train_heads: bool = field(
        default=False,
        metadata={
            "help": "with --moe-freeze-base: train the heads too (moe_roberta's classification "
            "heads; moe_transformer's output projection, when not tied to the embeddings)"
        },
    )
    moe_save_trainable_only: bool = field(
        default=False,
        metadata={
            "help": "with --moe-freeze-base and --moe-init-from-dense: checkpoints hold only the "
            "trained weights (routers, experts, trained heads) and the path and sha256 of the "
            "dense checkpoint, from which loading takes the frozen rest"
        },
    )
    moe_base_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "where the base checkpoint of an adapter-only checkpoint "
            "(--moe-save-trainable-only) is, when it moved since training (at inference: "
            "--model-overrides \"{'moe_base_checkpoint': 'PATH'}\"); its sha256 must match"
        },
    )
    encoder_moe_freq: int = field(
        default=2,
        metadata={
            "help": "every N-th encoder layer (layers N-1, 2N-1, ... counting from 0) has an "
            "MoE FFN; 0 = none (the dense transformer)"
        },
    )
    decoder_moe_freq: int = field(
        default=2,
        metadata={
            "help": "every N-th decoder layer (layers N-1, 2N-1, ... counting from 0) has an "
            "MoE FFN; 0 = none (the dense transformer)"
        },
    )


def moe_config_defaults(args: Namespace) -> None:
    """Fill every MoE option ``args`` lacks with the dataclass default (architectures call this
    after setting their own values, so presets can change defaults)."""
    for f in fields(MoEConfig):
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)


def moe_config_from_namespace(args: Namespace) -> MoEConfig:
    cfg = MoEConfig()
    for f in fields(MoEConfig):
        if hasattr(args, f.name):
            setattr(cfg, f.name, getattr(args, f.name))
    if cfg.moe_activation_fn is not None:
        cfg.moe_activation_fn = str(cfg.moe_activation_fn)
    return cfg


def is_moe_layer(layer_index: int, freq: int) -> bool:
    """Layer ``layer_index`` (from 0) is MoE when ``freq > 0`` and ``(layer_index + 1) % freq == 0``."""
    return freq > 0 and (layer_index + 1) % freq == 0


def validate_moe_args(args: Namespace) -> None:
    """Reject impossible MoE settings with a message that names the arch in use and the flag."""
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
    if getattr(args, "eval_bleu", False):
        fail(
            "--eval-bleu generates a different number of steps on each process, which the "
            "experts' all-to-all cannot follow; score with fairseq-generate after training"
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
