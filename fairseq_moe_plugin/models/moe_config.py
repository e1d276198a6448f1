"""The MoE options of ``moe_transformer`` and ``moe_roberta``: one dataclass, with help text (the
flags and docs/reference/flags.md are generated from it)."""

import logging
from argparse import Namespace
from dataclasses import dataclass, field, fields
from typing import List, Optional  # noqa: UP035  (fairseq parses typing.List)

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import get_available_activation_fns

from ..modules.expert_kinds import EXPERT_KINDS, INT8_KINDS, PLACEMENTS
from ..modules.gate import BALANCE_LOSSES
from ..modules.grouped_gemm import IMPLS
from ..modules.routing import ROUTING_METHODS
from ..modules.routing.capacity import CAPACITY_PRIORITIES

# The validation table lives in config_rules.py; the models import it from here.
from .config_rules import decoder_routing, validate_moe_args  # noqa: E402, F401

logger = logging.getLogger(__name__)

ACTIVATION_CHOICES = ChoiceEnum(get_available_activation_fns())
UPCYCLE_ROUTER_CHOICES = ChoiceEnum(["random", "zero"])
EXPERT_IMPL_CHOICES = ChoiceEnum(list(IMPLS))
ROUTING_CHOICES = ChoiceEnum(list(ROUTING_METHODS))
BALANCE_LOSS_CHOICES = ChoiceEnum(list(BALANCE_LOSSES))
PLACEMENT_CHOICES = ChoiceEnum(list(PLACEMENTS))
CAPACITY_PRIORITY_CHOICES = ChoiceEnum(list(CAPACITY_PRIORITIES))
INT8_MODES = ("off", *INT8_KINDS)
INT8_CHOICES = ChoiceEnum(list(INT8_MODES))
EXPERT_TYPE_CHOICES = ChoiceEnum(list(EXPERT_KINDS))
CHECKPOINT_FORMAT_CHOICES = ChoiceEnum(["consolidated", "sharded"])


def _moe_freq(side: str):
    help = f"every N-th {side} layer (layers N-1, 2N-1, ... from 0) is MoE; 0 = none (dense)"
    return field(default=2, metadata={"help": help})


def _provenance(writer: str, what: str):  # written by the tools (models/provenance.py)
    return field(default=None, metadata={"help": f"written by {writer} (provenance): {what}"})


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
            "(docs/performance.md measures it) but keeps those buffers allocated "
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
    moe_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each MoE layer (fullgraph, dynamic shapes; the experts run "
            "as one operator, docs/performance.md): needs dropless top-k or dense routing "
            "on one process"
        },
    )
    moe_expert_parallel_size: int = field(
        default=1,
        metadata={
            "help": "expert parallelism: shard every MoE layer's experts over groups of this many "
            "processes (E/P experts each; tokens travel to their experts by all-to-all); the "
            "W/P groups are data-parallel replicas. Must divide --moe-expert-count and the "
            "number of processes; 1 = every process holds all experts. Checkpoints load with "
            "any other value, and on one process (see --moe-checkpoint-format)"
        },
    )
    moe_checkpoint_format: CHECKPOINT_FORMAT_CHOICES = field(
        default="consolidated",
        metadata={
            "help": "consolidated (default): each checkpoint is one file, the experts and their "
            "optimizer state gathered on rank 0, which fairseq's tools and torch.load read "
            "anywhere; sharded: every process writes its own experts and optimizer state, and "
            "dense tensors are written once, through torch.distributed.checkpoint, into a folder "
            "beside a small checkpoint file (no process ever holds the whole model). Both load "
            "at any number of processes and any --moe-expert-parallel-size, and on one "
            "process; fairseq-moe-consolidate turns one into the other"
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
            "capacity and no drops (DyLoRA-MoE's dense collaboration; costs E expert passes); "
            "expert_choice: each expert takes its top C tokens (Zhou et al. 2022; C from "
            "--moe-expert-capacity-factor), tokens no expert takes pass through the residual "
            "alone; encoder and moe_roberta only (not causal), and a token's routing depends on "
            "the rest of its batch, in training and at inference"
        },
    )
    moe_decoder_routing: Optional[ROUTING_CHOICES] = field(
        default=None,
        metadata={
            "help": "routing of the decoder's MoE layers (topk or dense); default: --moe-routing. "
            "Set it to topk to use --moe-routing expert_choice in the encoder of "
            "moe_transformer: expert choice is not causal and is refused in a decoder"
        },
    )
    moe_expert_capacity_factor: float = field(
        default=2.0,
        metadata={
            "help": "with --moe-routing expert_choice: every expert takes its top C = "
            "ceil(factor * tokens / E) tokens of the batch, so a token gets `factor` experts on "
            "average (Zhou et al. 2022's capacity factor c; > 0)"
        },
    )
    moe_capacity_priority: CAPACITY_PRIORITY_CHOICES = field(
        default="rank_prob",
        metadata={
            "help": "which assignments an expert keeps when --moe-capacity-factor binds in "
            "training: rank_prob (default): first choices before second choices, then by gate "
            "probability (batch-prioritised routing, Riquelme et al. 2021); random: a random "
            "order (Zoph et al. 2022's random-token-selection ablation). Eval mode always uses "
            "rank_prob, so that generation is reproducible"
        },
    )
    moe_shared_experts: int = field(
        default=0,
        metadata={
            "help": "N always-on shared experts (DeepSeekMoE, Dai et al. 2024; Qwen-MoE): every "
            "token passes through them and their output is added to the routed experts'; each is "
            "an FFN of --moe-expert-ffn-dim (default: the layer's FFN size); 0 = none"
        },
    )
    moe_shared_expert_gate: bool = field(
        default=False,
        metadata={
            "help": "with --moe-shared-experts: scale the shared experts' output per token by a "
            "learned sigmoid(w . x) (Qwen-MoE's shared-expert gate)"
        },
    )
    moe_bias_balancing_rate: float = field(
        default=0.0,
        metadata={
            "help": "auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3) with "
            "this update rate u: a per-expert bias, added to the router logits for the top-k "
            "selection only (combine weights use the unbiased probabilities), moves after every "
            "update by u * sign(mean load - load_i), loads summed over the update and all "
            "workers; saved in checkpoints, logged as moe_<layer>_bias_e<i>. Use with "
            "--moe-balance-loss-weight 0 for the loss-free method; 0 = off"
        },
    )
    moe_eom: float = field(
        default=0.0,
        metadata={
            "help": "expert output masking (NLLB Team 2022, EOM): in training, each token's "
            "routed-expert output is zeroed with this probability (the kept ones scaled by "
            "1/(1-p), as dropout); shared experts and the dense branch are not masked; 0 = off"
        },
    )
    moe_cmr: bool = field(
        default=False,
        metadata={
            "help": "conditional MoE routing (NLLB Team 2022, CMR): each MoE layer keeps a dense "
            "FFN beside the experts and mixes them per token, (1 - g) * FFN(x) + g * MoE(x), with "
            "a learned gate g = sigmoid(w . x)"
        },
    )
    moe_cmr_gate_dropout: float = field(
        default=0.0,
        metadata={
            "help": "with --moe-cmr: dropout on the gate g in training (NLLB's CMR gate drop)"
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
    encoder_moe_freq: int = _moe_freq("encoder")
    decoder_moe_freq: int = _moe_freq("decoder")
    moe_upcycled_from: Optional[str] = _provenance(
        "--moe-init-from-dense", "the dense checkpoint the model was upcycled from"
    )
    moe_base_new: Optional[List[str]] = _provenance(  # noqa: UP006  (fairseq parses typing.List)
        "--moe-init-from-dense",
        "the tensors the dense checkpoint lacked (adapter-only checkpoints keep them)",
    )
    moe_base_sha256: Optional[str] = _provenance(
        "--moe-save-trainable-only", "the sha256 of an adapter-only checkpoint's base checkpoint"
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
