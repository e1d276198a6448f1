"""Expert growth: add N experts to every MoE layer of a trained model's state dict.

DyLoRA-MoE (Liu et al. 2024, "Dynamic LoRA-based Mixture of Experts") adds experts during
training; this does it between two runs, on a checkpoint's weights, for every expert kind of
``modules/expert_kinds.EXPERT_KINDS`` (``ffn`` and ``lora``), whose tensors the kind declares
(``STACKED``, ``SHARED_STATE``, ``GROW_ZERO``). Pure functions on a state dict and a model
config; torch only.

Every MoE layer ``P`` (a key ``P.gate.wg.weight``, e.g. ``encoder.layers.1.moe``) gets ``N`` new
router rows and ``N`` new experts, and always a router bias ``P.gate.wg.bias`` (zeros for the old
experts when the checkpoint has none), so the grown model is built with ``--moe-router-bias``.
Two initialisations:

- ``offset`` (default): new router rows are zero and the new experts' bias is the smallest old
  bias minus ``offset`` (times the router temperature, so the gap is ``offset`` in the softmax's
  input). Their probability is about ``exp(-offset)`` of the least likely old expert's (for
  router logits spread by less than ``offset``): top-k routing never picks them and dense
  routing gives them ~e^-30 of the mass, so the grown model computes what the old one did.
  New ffn experts get ``nn.Linear``'s init (U(+-1/sqrt(fan_in)), weights and biases, as
  ``StackedExperts.reset_parameters``); new lora experts get A kaiming-uniform (``a=sqrt(5)``,
  PEFT's init, U(+-1/sqrt(fan_in))) and B zero.
- ``copy``: new expert ``i`` copies expert ``source_experts[i]`` (default ``i mod E``): router
  row, bias and expert weights. A source ``j`` copied ``c`` times, and its copies, all get
  ``bias_j - log(1 + c)``: the softmax mass of ``j`` is split exactly in ``1 + c`` equal parts,
  so in dense routing, without noise, the output is unchanged. ``noise`` adds Gaussian noise of
  ``noise`` standard deviations of the source's slice to the copy's router row and to its
  expert weight matrices (biases are copied exactly, as in sparse upcycling), so that copies can
  diverge from their source.

Buffers: ``P.gate.usage_ema`` (the EMA of the load shares, summing to 1) is extended, not
renormalised: ``offset`` gives the new experts 0 (they have had no load; the old shares still
sum to 1); ``copy`` splits a source's share equally between it and its copies, as the routing
mass is split. ``P.gate.routing_updates`` (the maturity schedule's update count) is kept as is.
With auxiliary-loss-free balancing, ``P.gate.balance_bias`` (the selection bias) gives a new
expert the smallest old bias (``offset``: it stays below every old expert) or its source's
(``copy``), and ``P.gate.balance_load`` (the loads of the update in progress) 0.

Shared experts (``P.shared.*``) and the CMR gate do not depend on the number of experts and are
kept as they are. Expert-choice routing is refused: each expert takes ``ceil(c N / E)`` tokens,
so adding experts changes which tokens the old ones take, and the grown model would not compute
what the old one did.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..modules.expert_kinds import EXPERT_KINDS, Experts
from ..modules.experts import StackedExperts
from ..modules.lora_experts import LoRAExperts
from ..modules.routing import routing_method

ROUTER_SUFFIX = ".gate.wg.weight"
FFN_STACKS = StackedExperts.STACKED  # E x ...
LORA_STACKS = LoRAExperts.STACKED  # E x ...
LORA_SHARED = LoRAExperts.SHARED_STATE  # the frozen FFN, not per expert
GATE_KEYS = ("wg.weight", "wg.bias", "usage_ema", "routing_updates", "balance_bias", "balance_load")
ROUTER_INITS = ("offset", "copy")


def config_value(cfg, name: str, default=None):
    """``cfg.name`` of a Namespace, dict or DictConfig (None: ``default``)."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    value = getattr(cfg, name, default)
    return default if value is None else value


def moe_layer_prefixes(state: dict) -> list[str]:
    """The MoE layers ``P`` of a state dict (keys ``P.gate.wg.weight``), sorted."""
    return sorted(k[: -len(ROUTER_SUFFIX)] for k in state if k.endswith(".moe" + ROUTER_SUFFIX))


def expert_type(state: dict, prefix: str) -> str:
    """The layer's expert kind (``ffn`` or ``lora``: the ``EXPERT_KINDS`` whose first stacked
    tensor it has); ValueError for anything else."""
    for name, kind in EXPERT_KINDS.items():
        if f"{prefix}.experts.{kind.STACKED[0]}" in state:
            return name
    kinds = " nor ".join(
        f"{name} experts ({prefix}.experts.{kind.STACKED[0]})"
        for name, kind in EXPERT_KINDS.items()
    )
    raise ValueError(f"MoE layer {prefix} has neither {kinds}")


def layer_keys(state: dict, prefix: str, verb: str = "grow") -> tuple[type[Experts], list[str]]:
    """The layer's expert kind and per-expert stack names; ValueError naming a key under
    ``P.gate.`` or ``P.experts.`` that growth (or pruning: ``verb``) does not know how to
    resize."""
    expert_class = EXPERT_KINDS[expert_type(state, prefix)]
    kind = expert_class.kind
    stacks = list(expert_class.STACKED)
    known = {f"{prefix}.experts.{s}" for s in stacks} | {f"{prefix}.gate.{g}" for g in GATE_KEYS}
    known |= {f"{prefix}.experts.{s}" for s in expert_class.SHARED_STATE}
    for key in state:
        if key.startswith((f"{prefix}.gate.", f"{prefix}.experts.")) and key not in known:
            raise ValueError(
                f"cannot {verb} {key}: not a router or {kind} expert tensor known here"
            )
    missing = [s for s in stacks if f"{prefix}.experts.{s}" not in state]
    if missing:
        raise ValueError(f"MoE layer {prefix} lacks its {kind} expert tensors {missing}")
    return expert_class, stacks


def expert_count(state: dict, prefixes: list[str], cfg,
                 gate_keys=("wg.weight", "wg.bias", "usage_ema"), verb: str = "grow") -> int:  # fmt: skip
    """E, checked to agree across every router, expert stack, per-expert gate buffer
    (``gate_keys``) and the config."""
    counts = {}
    for prefix in prefixes:
        _, stacks = layer_keys(state, prefix, verb)
        keys = [f"{prefix}.gate.{g}" for g in gate_keys]
        keys += [f"{prefix}.experts.{s}" for s in stacks]
        counts.update({k: int(state[k].shape[0]) for k in keys if k in state})
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise ValueError(f"inconsistent expert counts in the checkpoint ({listing})")
    count = next(iter(counts.values()))
    configured = config_value(cfg, "moe_expert_count")
    if configured is not None and int(configured) != count:
        raise ValueError(
            f"the checkpoint's config says moe_expert_count={configured} but its MoE layers "
            f"have {count} experts"
        )
    return count


def _check_args(num_new, router_init, offset, noise, source_experts, num_experts, cfg) -> list:
    """Validate the options; returns the source expert of every new expert (copy) or []."""
    if num_new < 1:
        raise ValueError(f"the number of new experts (--num-new) must be >= 1, got {num_new}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init must be one of {ROUTER_INITS}, got {router_init!r}")
    if not offset > 0:
        raise ValueError(f"--offset must be > 0, got {offset}")
    if not noise >= 0:
        raise ValueError(f"--noise must be >= 0, got {noise}")
    parts = int(config_value(cfg, "moe_expert_parallel_size", 1))
    total = num_experts + num_new
    if total % parts:
        raise ValueError(
            f"the checkpoint's --moe-expert-parallel-size {parts} does not divide the grown "
            f"expert count {num_experts} + {num_new} = {total}"
        )
    if router_init == "offset":
        if source_experts is not None:
            raise ValueError("--source-experts applies to --router-init copy only")
        return []
    sources = [i % num_experts for i in range(num_new)]
    if source_experts is not None:
        sources = [int(j) for j in source_experts]
        if len(sources) != num_new:
            raise ValueError(
                f"--source-experts names {len(sources)} experts but --num-new is {num_new}: "
                "give one source per new expert"
            )
    bad = [j for j in sources if not 0 <= j < num_experts]
    if bad:
        raise ValueError(
            f"--source-experts {bad} out of range: the checkpoint has experts 0..{num_experts - 1}"
        )
    return sources


def _noisy(rows: torch.Tensor, noise: float, generator: torch.Generator, dims) -> torch.Tensor:
    """rows (n x ...) plus N(0, (noise * std of each row)^2) noise, std over ``dims``."""
    if noise <= 0:
        return rows.clone()
    std = rows.std(dim=dims, keepdim=True) if rows[0].numel() > 1 else torch.zeros_like(rows)
    return rows + noise * std * torch.randn(rows.shape, generator=generator, dtype=rows.dtype)


def _new_experts(stack: torch.Tensor, name: str, fan_in: int, sources: list, num_new: int,
                 noise: float, generator, zero: bool = False) -> torch.Tensor:  # fmt: skip
    """The ``num_new`` new rows (n x ...) of the per-expert stack ``name`` (E x ...), in fp32;
    ``fan_in`` is the input width of the expert's weight (of the bias's weight for a bias);
    ``zero``: fresh rows start at zero (the kind's ``GROW_ZERO``, e.g. LoRA's B)."""
    old = stack.float().cpu()
    if sources:  # copy: the sources' rows, weights with noise, biases exact
        rows = old[sources]  # n x ...
        if name.endswith("_bias"):
            return rows.clone()
        return _noisy(rows, noise, generator, dims=tuple(range(1, rows.dim())))
    shape = (num_new, *old.shape[1:])
    if zero:  # e.g. LoRA B starts at zero (PEFT)
        return torch.zeros(shape)
    # nn.Linear's init (kaiming-uniform with a=sqrt(5) for the weights, PEFT's for LoRA A):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too.
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _grow_experts(state, new, prefix, kind, sources, num_new, noise, generator) -> None:
    for name in kind.STACKED:
        key = f"{prefix}.experts.{name}"
        weight = state[key.replace("_bias", "_weight")]  # E x out x in
        zero = name in kind.GROW_ZERO
        rows = _new_experts(state[key], name, weight.shape[-1], sources, num_new, noise, generator,
                            zero)  # fmt: skip
        new[key] = torch.cat([state[key], rows.to(state[key])], dim=0)  # its dtype and device


def _grow_router(state, new, prefix, sources, num_new, offset, noise, generator, temperature):
    weight = state[f"{prefix}.gate.wg.weight"]  # E x C
    num_experts = weight.shape[0]
    bias = state.get(f"{prefix}.gate.wg.bias")
    bias = torch.zeros(num_experts) if bias is None else bias.float().cpu()  # E
    if sources:  # copy, the source's mass split in 1 + c equal parts
        rows = _noisy(weight.float().cpu()[sources], noise, generator, dims=(1,))  # n x C
        copies = Counter(sources)
        split = torch.tensor([math.log(1 + copies.get(j, 0)) for j in range(num_experts)])
        old_bias = bias - split  # E
        new_bias = old_bias[sources]  # n
    else:  # offset: zero rows, far below every old expert
        rows = torch.zeros(num_new, weight.shape[1])
        old_bias = bias
        new_bias = torch.full((num_new,), float(bias.min()) - offset * temperature)
    new[f"{prefix}.gate.wg.weight"] = torch.cat([weight, rows.to(weight)], dim=0)
    bias_dtype = state.get(f"{prefix}.gate.wg.bias", weight).dtype
    new[f"{prefix}.gate.wg.bias"] = torch.cat([old_bias, new_bias]).to(weight.device, bias_dtype)
    ema = state.get(f"{prefix}.gate.usage_ema")
    if ema is not None:  # E: shares summing to 1; see the module doc
        shares = ema.float().cpu()
        extra = torch.zeros(num_new)
        if sources:
            shares = shares / split.exp()
            extra = shares[sources]
        new[f"{prefix}.gate.usage_ema"] = torch.cat([shares, extra]).to(ema)
    balance_bias = state.get(f"{prefix}.gate.balance_bias")
    if balance_bias is not None:  # E: the bias-balancing selection bias
        old = balance_bias.float().cpu()
        added = old[sources] if sources else torch.full((num_new,), float(old.min()))
        new[f"{prefix}.gate.balance_bias"] = torch.cat([old, added]).to(balance_bias)
    load = state.get(f"{prefix}.gate.balance_load")
    if load is not None:  # E: the loads accumulated in the update in progress
        new[f"{prefix}.gate.balance_load"] = torch.cat([load, load.new_zeros(num_new)])


def grow_state_dict(state: dict, cfg, num_new: int, router_init: str = "offset",
                    offset: float = 30.0, noise: float = 0.0, source_experts=None,
                    seed: int = 0) -> tuple[dict, dict]:  # fmt: skip
    """Add ``num_new`` experts to every MoE layer of ``state`` (see the module doc).

    Args:
        state: a model state dict (``checkpoint["model"]``); not modified.
        cfg: the model config (Namespace, dict or DictConfig; may be None): its
            ``moe_expert_count`` is checked, ``moe_expert_parallel_size`` must divide the new
            count, and ``moe_router_temperature`` scales ``offset``.
        num_new: N >= 1.
        router_init: ``offset`` or ``copy``.
        offset: with ``offset``, how far (in softmax input) the new experts start below the old.
        noise: with ``copy``, noise in standard deviations of the copied weights.
        source_experts: with ``copy``, the expert each new expert copies (N of them).
        seed: seeds the new experts' init and the noise.
    Returns:
        (the grown state dict, the config updates: ``moe_expert_count``, ``moe_router_bias``).
    Raises:
        ValueError naming what is wrong: N < 1, no MoE layer, inconsistent expert counts, a
        source expert out of range, an expert-parallel size that does not divide E + N.
    """
    for key in ("moe_routing", "moe_decoder_routing"):
        method = routing_method(config_value(cfg, key) or "topk")
        if not method.growable:
            raise ValueError(f"cannot grow {method.a_label} model: {method.reason('growable')}")
    prefixes = moe_layer_prefixes(state)
    if not prefixes:
        raise ValueError(f"no MoE layer in the state dict (no key ends with .moe{ROUTER_SUFFIX})")
    num_experts = expert_count(state, prefixes, cfg)
    sources = _check_args(num_new, router_init, offset, noise, source_experts, num_experts, cfg)
    temperature = float(config_value(cfg, "moe_router_temperature", 1.0))
    generator = torch.Generator().manual_seed(seed)
    new = dict(state)
    for prefix in prefixes:
        kind, _ = layer_keys(state, prefix)
        _grow_router(state, new, prefix, sources, num_new, offset, noise, generator, temperature)
        _grow_experts(state, new, prefix, kind, sources, num_new, noise, generator)
    updates = {"moe_expert_count": num_experts + num_new, "moe_router_bias": True}
    return new, updates


def add_routing_schedule_buffers(state: dict, num_updates: int = 0) -> list[str]:
    """Give every MoE layer the maturity schedule's update count ``P.gate.routing_updates``
    (which a gate built with ``--moe-dense-routing-until`` > 0 has) when it lacks one; returns
    the keys added. Training overwrites it before every update."""
    added = []
    for prefix in moe_layer_prefixes(state):
        key = f"{prefix}.gate.routing_updates"
        if key not in state:
            state[key] = torch.tensor(int(num_updates), dtype=torch.long)
            added.append(key)
    return added
