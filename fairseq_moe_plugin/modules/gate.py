"""Top-k router ("gate") for sparse Mixture-of-Experts layers, and its auxiliary losses.

Everything here takes plain arguments and works without fairseq. Tokens are flattened:
``N`` non-padding tokens, ``E`` experts, ``k`` experts per token. Padding never reaches the gate:
the MoE layer removes it first, so every statistic below is over real tokens only.

Capacity policy (documented, deterministic). When ``capacity = ceil(capacity_factor * k * N / E)``
binds, each expert keeps the assignments with the best priority and drops the rest, where the
priority orders assignments by

1. choice rank (all first choices before any second choice, ...), as in batch-prioritised
   routing (Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of Experts", sec. 4.1) and
   fairseq's nllb top-2 gate;
2. then gate probability, highest first;
3. then token position in the flattened batch, first first (ties only).

So the kept set never depends on a random draw, and a token that an expert values most is the
last to be dropped. A capacity factor <= 0 means dropless: nothing is ever dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router_losses import (  # noqa: F401 (re-exported: the gate's public names)
    RouterLosses,
    expert_counts,
    load_balance_loss,
    mse_balance_loss,
    router_z_loss,
    routing_entropy,
)
from .routing_methods import (
    CAPACITY_PRIORITIES,  # noqa: F401 (re-exported)
    bias_balancing_step,
    check_method_options,
    expert_choice_capacity,
    expert_choice_keep,
    random_keep_mask,
)

BALANCE_LOSSES = ("switch", "mse")
ROUTINGS = ("topk", "dense", "expert_choice")


def check_routing_options(
    num_experts: int, k: int = 1, jitter_eps: float = 0.0, expert_parallel_size: int = 1
) -> None:
    """The one check of the routing sizes (the gate, the experts and the model config call it).

    Raises ValueError naming the option both ways, as the gate's argument and as the flag, e.g.
    ``top-k (--moe-top-k) must be between 1 and the number of experts (4), got 5``; the model
    config prefixes the arch in use."""
    if num_experts < 1:
        raise ValueError(
            f"the number of experts num_experts (--moe-expert-count) must be >= 1, got {num_experts}"
        )
    if not 1 <= k <= num_experts:
        raise ValueError(
            f"top-k (--moe-top-k) must be between 1 and the number of experts ({num_experts}), "
            f"got {k}"
        )
    if not 0.0 <= jitter_eps < 1.0:
        raise ValueError(f"jitter_eps (--moe-jitter-eps) must be in [0, 1), got {jitter_eps}")
    if expert_parallel_size < 1 or num_experts % expert_parallel_size:
        raise ValueError(
            f"--moe-expert-parallel-size {expert_parallel_size} must be >= 1 and divide the "
            f"number of experts (--moe-expert-count) {num_experts}"
        )


def check_router_options(
    routing: str = "topk",
    dense_until: int = 0,
    temperature: float = 1.0,
    balance_loss: str = "switch",
    usage_ema: float = 0.0,
) -> None:
    """The one check of the router's other options; ValueError naming the flag."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing (--moe-routing) must be one of {ROUTINGS}, got {routing!r}")
    if dense_until < 0:
        raise ValueError(f"--moe-dense-routing-until must be >= 0, got {dense_until}")
    if not temperature > 0:
        raise ValueError(f"--moe-router-temperature must be > 0, got {temperature}")
    if balance_loss not in BALANCE_LOSSES:
        raise ValueError(
            f"--moe-balance-loss must be one of {BALANCE_LOSSES}, got {balance_loss!r}"
        )
    if not 0.0 <= usage_ema < 1.0:
        raise ValueError(f"--moe-usage-ema must be in [0, 1) (0 = off), got {usage_ema}")


def check_fallback_expert(fallback_expert: int, num_experts: int) -> None:
    """ValueError naming the flag unless -1 (off) or an expert id."""
    if not -1 <= fallback_expert < num_experts:
        raise ValueError(
            f"--moe-fallback-expert must be -1 (off) or an expert id in [0, {num_experts}), "
            f"got {fallback_expert}"
        )


# The logit the other experts get for a token that falls back: exp(-1e4) is 0 in fp32, so the
# fallback expert's probability is exactly 1 and every other expert's exactly 0.
FALLBACK_OTHER_LOGIT = -1.0e4


def fallback_nonfinite(
    logits: torch.Tensor, fallback_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the logits of every token that has a NaN or inf logit by a one-hot choice of
    ``fallback_expert`` (0 there, ``FALLBACK_OTHER_LOGIT`` elsewhere).

    Args:
        logits: N x E router logits (fp32).
    Returns:
        the N x E logits, finite everywhere, and a 0-dim long tensor: how many tokens fell back.
        No host sync: the replacement is a ``where`` over all tokens.
    """
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)  # N x 1
    onehot = torch.full_like(logits[:1], FALLBACK_OTHER_LOGIT)  # 1 x E
    onehot[0, fallback_expert] = 0.0
    return torch.where(bad, onehot, logits), bad.sum()


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * k * num_tokens / num_experts)``, or ``num_tokens`` (every
    assignment fits) when ``capacity_factor <= 0`` (dropless)."""
    if capacity_factor <= 0:
        return num_tokens
    return int(math.ceil(capacity_factor * k * num_tokens / num_experts))


def capacity_keep_mask(
    expert_index: torch.Tensor, expert_prob: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which assignments fit under ``capacity`` with the module's documented priority.

    Args:
        expert_index: N x k chosen experts, column j being every token's (j+1)-th choice.
        expert_prob: N x k their softmax probabilities (the priority within a choice rank).
        capacity: the most assignments an expert may keep.
    Returns:
        N x k bool, True where the assignment is kept.
    """
    num_tokens, k = expert_index.shape
    if capacity >= num_tokens:  # an expert gets at most one assignment per token
        return torch.ones_like(expert_index, dtype=torch.bool)
    # Lay assignments out rank-major (all first choices, then all second choices, ...), so that a
    # stable sort keeps rank order and then token order among equal probabilities.
    expert_rm = expert_index.t().reshape(-1)  # (k*N), rank-major
    prob_rm = expert_prob.t().reshape(-1)  # (k*N)
    order = torch.sort(prob_rm, descending=True, stable=True).indices
    rank_of = torch.arange(k, device=expert_index.device).repeat_interleave(num_tokens)
    order = order[torch.sort(rank_of[order], stable=True).indices]
    order = order[torch.sort(expert_rm[order], stable=True).indices]
    # order now lists assignments grouped by expert, best priority first within each expert.
    counts = expert_counts(expert_rm, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(order.numel(), device=order.device) - starts[expert_rm[order]]
    keep_rm = torch.empty_like(expert_rm, dtype=torch.bool)
    keep_rm[order] = position < capacity
    return keep_rm.view(k, num_tokens).t()


@dataclass
class GateOutput(RouterLosses):
    """What the gate decides for N tokens (all fp32); the losses are ``RouterLosses``'."""

    logits: torch.Tensor  # N x E router logits
    probs: torch.Tensor  # N x E softmax over all experts
    expert_index: torch.Tensor  # N x k chosen experts, best first
    expert_weight: torch.Tensor  # N x k combine weights (renormalised if asked), 0 where dropped
    keep: torch.Tensor  # N x k bool, False where capacity dropped the assignment
    capacity: int  # per-expert capacity used (N when dropless)
    balance_type: str = "switch"  # which balance loss ``balance_loss`` computes
    dense: bool = False  # dense routing: k = E, every expert weighted by its probability
    # expert choice: expert_index is N x E (every expert), keep marks the tokens each expert took
    expert_choice: bool = False
    # 0-dim long: tokens whose router logits were not finite and went to the fallback expert
    # (eval only, ``fallback_expert >= 0``); None when no fallback is applied.
    fallback_tokens: torch.Tensor | None = None

    @property
    def all_kept(self) -> bool:
        """True when capacity cannot bind (dropless, or capacity >= N): ``keep`` is all True."""
        return self.capacity >= self.expert_index.shape[0]

    @property
    def dropped_token_mask(self) -> torch.Tensor:
        """N bool: tokens none of whose k assignments survived capacity (FFN output is zero)."""
        return ~self.keep.any(dim=-1)


class TopKGate(nn.Module):
    """Linear router d_model -> E in fp32, softmax, top-k, capacity.

    Args:
        d_model: token width.
        num_experts: E >= 1.
        k: experts per token, 1 <= k <= E.
        normalize_top_k: rescale the k chosen probabilities to sum to 1 (Mixtral, GShard top-2);
            if False they are the raw softmax probabilities (Switch).
        capacity_factor: training capacity factor; <= 0 is dropless.
        eval_capacity_factor: capacity factor in eval mode; <= 0 (default) is dropless, so that a
            token's routing never depends on the rest of the batch.
        jitter_eps: multiplicative jitter on the router input in training, x * U(1-eps, 1+eps)
            (Switch Transformer, sec. 2.4); 0 disables it.
        routing: ``topk``, or ``dense``: every token goes to all E experts, each weighted by its
            probability, with no capacity (DyLoRA-MoE's "dense collaboration"; k is then E).
        dense_until: route densely while the update count (``set_num_updates``) is below this,
            then by ``routing`` (DyLoRA-MoE's maturity schedule for new experts); 0 = off. The
            count is a buffer (``routing_updates``), so a checkpoint routes as it was trained.
        temperature: the softmax sees ``logits / temperature`` (> 0); the logits this gate
            reports (and the z-loss reads) are the divided ones.
        router_bias: a learned per-expert bias in the router (``wg.bias``); expert growth
            (``models/grow.py``) uses it to start new experts below the old ones.
        balance_loss: which balance loss the outputs' ``balance_loss`` computes: ``switch``
            (Switch Transformer eq. 4-6) or ``mse`` (``mse_balance_loss``).
        usage_ema: decay of an exponential moving average of each expert's load share, kept in
            the buffer ``usage_ema`` (saved in checkpoints) and updated with
            ``update_usage_ema`` (the MoE criteria do, once per training batch); 0 = off.
        fallback_expert: in eval mode, a token whose router logits are not all finite (NaN or
            inf: a corrupted router, or an input that overflows it) is routed to this expert
            alone, with weight 1, and counted in ``fallback_tokens``, so that one bad token
            cannot poison the routing of the rest of its batch; -1 turns this off. Training
            never falls back: there a non-finite router must surface (the criteria check it).
        expert_capacity_factor: under ``routing="expert_choice"``, every expert takes
            ``ceil(factor * N / E)`` tokens (``routing_methods.expert_choice_keep``).
        capacity_priority: ``rank_prob`` (the module's documented priority) or ``random``
            (``routing_methods.random_keep_mask``), used in training when capacity binds; eval
            mode always uses ``rank_prob``, so that inference is reproducible.
        bias_balancing_rate: auxiliary-loss-free balancing (``routing_methods.
            bias_balancing_step``): a per-expert bias (buffer ``balance_bias``) added to the
            logits for the top-k selection only; the loads of an update are accumulated with
            ``accumulate_balance_load`` (buffer ``balance_load``, the MoE criteria do it after
            each training forward) and applied when fairseq starts the next update
            (``set_num_updates``), summed over all workers first; 0 = off.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 1,
        normalize_top_k: bool = False,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 0.0,
        jitter_eps: float = 0.0,
        routing: str = "topk",
        dense_until: int = 0,
        temperature: float = 1.0,
        router_bias: bool = False,
        balance_loss: str = "switch",
        usage_ema: float = 0.0,
        fallback_expert: int = 0,
        expert_capacity_factor: float = 2.0,
        capacity_priority: str = "rank_prob",
        bias_balancing_rate: float = 0.0,
    ):
        super().__init__()
        check_routing_options(num_experts, k, jitter_eps)
        check_router_options(routing, dense_until, temperature, balance_loss, usage_ema)
        check_fallback_expert(fallback_expert, num_experts)
        check_method_options(
            routing, expert_capacity_factor, capacity_priority, bias_balancing_rate
        )
        self.expert_capacity_factor = expert_capacity_factor
        self.capacity_priority = capacity_priority
        self.bias_balancing_rate = bias_balancing_rate
        if bias_balancing_rate > 0:
            self.register_buffer("balance_bias", torch.zeros(num_experts))
            self.register_buffer("balance_load", torch.zeros(num_experts))
        self._balance_seen_update: int | None = None  # the update whose loads balance_load holds
        self.fallback_expert = fallback_expert
        self.num_experts = num_experts
        self.k = k
        self.normalize_top_k = normalize_top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.jitter_eps = jitter_eps
        self.routing = routing
        self.dense_until = dense_until
        self.temperature = temperature
        self.balance_type = balance_loss
        self.usage_ema_decay = usage_ema
        self.wg = nn.Linear(d_model, num_experts, bias=router_bias)
        if router_bias:
            nn.init.zeros_(self.wg.bias)
        if dense_until > 0:
            self.register_buffer("routing_updates", torch.zeros((), dtype=torch.long))
        if usage_ema > 0:
            self.register_buffer("usage_ema", torch.full((num_experts,), 1.0 / num_experts))

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every training batch (``FairseqTask.train_step``) and when
        it loads a checkpoint, on every worker alike. The maturity schedule (``dense_until``)
        reads the count; bias balancing applies the previous update's loads when the count
        moves on (``apply_balance_update``)."""
        if self.dense_until > 0:
            self.routing_updates.fill_(int(num_updates))
        if self.bias_balancing_rate > 0 and num_updates != self._balance_seen_update:
            if self._balance_seen_update is not None or bool(self.balance_load.any()):
                self.apply_balance_update()
            self._balance_seen_update = num_updates

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A loaded ``balance_load`` holds the loads of the update the checkpoint was saved
        after, whose bias step is still due: the next ``set_num_updates`` applies it."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._balance_seen_update = None

    @torch.no_grad()
    def accumulate_balance_load(self, load: torch.Tensor) -> None:
        """Add one training batch's E expert loads (the router's assignments, before capacity)
        to ``balance_load``; the criterion calls it after the forward, so a recomputed forward
        (activation checkpointing) cannot count a batch twice."""
        self.balance_load.add_(load.to(self.balance_load.dtype))

    @torch.no_grad()
    def apply_balance_update(self) -> None:
        """One bias step from the loads accumulated since the last one (summed over all workers
        when torch.distributed is initialised: every worker calls this at the same update), then
        start accumulating afresh. No host sync."""
        load = self.balance_load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(load)
        self.balance_bias.copy_(
            bias_balancing_step(self.balance_bias, load, self.bias_balancing_rate)
        )
        self.balance_load.zero_()

    @property
    def routes_densely(self) -> bool:
        """Whether this forward routes densely: ``routing == "dense"``, or the maturity schedule
        still runs (one host read of the update count, only when the schedule is on)."""
        if self.routing == "dense":
            return True
        return self.dense_until > 0 and int(self.routing_updates) < self.dense_until

    @torch.no_grad()
    def update_usage_ema(self, load: torch.Tensor) -> None:
        """``ema = decay * ema + (1 - decay) * load / sum(load)``; load: E expert loads (counts
        or probability mass) of one batch. A batch without tokens changes nothing."""
        if self.usage_ema_decay <= 0:
            raise ValueError("update_usage_ema needs a gate built with usage_ema > 0")
        load = load.to(self.usage_ema.dtype)
        total = load.sum()
        share = load / total.clamp_min(1e-12)
        updated = self.usage_ema * self.usage_ema_decay + share * (1.0 - self.usage_ema_decay)
        # No host read of the total (a sync per layer and batch on GPU): keep the EMA on device.
        self.usage_ema.copy_(torch.where(total > 0, updated, self.usage_ema))

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x: N x C non-padding tokens (any dtype). Routing is computed in fp32."""
        device_type = x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = x.float()
            if self.training and self.jitter_eps > 0:
                noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
                x = x * noise
            bias = None if self.wg.bias is None else self.wg.bias.float()
            logits = F.linear(x, self.wg.weight.float(), bias)  # N x E
            if self.temperature != 1.0:
                logits = logits / self.temperature
            fallback_tokens = None
            if not self.training and self.fallback_expert >= 0:
                logits, fallback_tokens = fallback_nonfinite(logits, self.fallback_expert)
            probs = torch.softmax(logits, dim=-1)  # N x E
            if self.routes_densely:
                return self._dense(logits, probs, fallback_tokens)
            if self.routing == "expert_choice":
                return self._expert_choice(logits, probs, fallback_tokens)
            if self.bias_balancing_rate > 0:  # the bias picks the experts, never weighs them
                select = logits + self.balance_bias  # N x E
                top_index = torch.topk(select, self.k, dim=-1).indices  # N x k, best first
                top_prob = probs.gather(1, top_index)  # N x k, unbiased
            else:
                top_prob, top_index = torch.topk(probs, self.k, dim=-1)  # N x k, best first
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(x.shape[0], self.num_experts, self.k, factor)
            if self.training and self.capacity_priority == "random":
                keep = random_keep_mask(top_index, self.num_experts, capacity)
            else:
                keep = capacity_keep_mask(top_index, top_prob.detach(), self.num_experts, capacity)
            weight = top_prob
            if self.normalize_top_k:
                weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
            if capacity < x.shape[0]:  # capacity can bind: dropped choices weigh 0
                weight = weight * keep.to(weight.dtype)
            return GateOutput(
                logits=logits,
                probs=probs,
                expert_index=top_index,
                expert_weight=weight,
                keep=keep,
                capacity=capacity,
                balance_type=self.balance_type,
                fallback_tokens=fallback_tokens,
            )

    def _expert_choice(
        self, logits: torch.Tensor, probs: torch.Tensor, fallback_tokens: torch.Tensor | None
    ) -> GateOutput:
        """Each expert takes its top-C tokens by probability (``expert_choice_keep``); a token's
        weight for an expert that took it is its probability (renormalised over the experts
        that took it with ``normalize_top_k``), 0 elsewhere (logits, probs: N x E)."""
        num_tokens = probs.shape[0]
        capacity = expert_choice_capacity(num_tokens, self.num_experts, self.expert_capacity_factor)
        keep = expert_choice_keep(probs.detach(), capacity)  # N x E
        weight = probs * keep.to(probs.dtype)  # N x E
        if self.normalize_top_k:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        index = torch.arange(self.num_experts, device=probs.device)
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=index.expand(num_tokens, -1),  # N x E
            expert_weight=weight,
            keep=keep,
            capacity=capacity,
            balance_type=self.balance_type,
            expert_choice=True,
            fallback_tokens=fallback_tokens,
        )

    def _dense(
        self, logits: torch.Tensor, probs: torch.Tensor, fallback_tokens: torch.Tensor | None
    ) -> GateOutput:
        """Every token to every expert, weighted by its probability (logits, probs: N x E)."""
        num_tokens = probs.shape[0]
        index = torch.arange(self.num_experts, device=probs.device)
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=index.expand(num_tokens, -1),  # N x E
            expert_weight=probs,  # N x E
            keep=torch.ones_like(probs, dtype=torch.bool),
            capacity=num_tokens,
            balance_type=self.balance_type,
            dense=True,
            fallback_tokens=fallback_tokens,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, normalize_top_k={self.normalize_top_k}, "
            f"capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, jitter_eps={self.jitter_eps}, "
            f"routing={self.routing}, dense_until={self.dense_until}, "
            f"temperature={self.temperature}, balance_loss={self.balance_type}, "
            f"usage_ema={self.usage_ema_decay}, fallback_expert={self.fallback_expert}, "
            f"expert_capacity_factor={self.expert_capacity_factor}, "
            f"capacity_priority={self.capacity_priority}, "
            f"bias_balancing_rate={self.bias_balancing_rate}"
        )
