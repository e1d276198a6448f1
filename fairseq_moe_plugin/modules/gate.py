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
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``expert_index`` (any shape) name each expert: E long.

    ``torch.bincount`` would do, but on CUDA it reads the largest index back to size its output
    (a host sync per call); a scatter-add into E zeros does not."""
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss.

    Fedus, Zoph & Shazeer (2021), "Switch Transformers", eq. 4-6:
    ``loss = E * sum_i f_i * P_i`` where ``f_i`` is the fraction of routing choices sent to expert
    ``i`` (counted over all k choices of every token, divided by k, before capacity drops) and
    ``P_i`` the mean router probability of expert ``i`` (the full softmax). Both are over the
    tokens given, which must be non-padding tokens. It equals 1.0 when routing is uniform.

    Args:
        probs: N x E softmax probabilities (fp32).
        expert_index: N x k chosen experts.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    k = expert_index.shape[1]
    counts = expert_counts(expert_index, num_experts)
    f = counts.to(probs.dtype) / (num_tokens * k)  # E
    p = probs.mean(dim=0)  # E
    return num_experts * torch.sum(f * p)


def mse_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the batch's mean routing probability and uniform:
    ``mean_i (P_i - 1/E)^2`` with ``P_i = mean_tokens probs[:, i]``.

    The balance loss of the GLBL design (expert MLPs added to a frozen pretrained model, with a
    global load balance over the batch). It is the squared coefficient of variation of expert
    importance of Shazeer et al. (2017), "Outrageously Large Neural Networks", eq. 6-7
    (``CV(Importance)^2`` with ``Importance_i = sum_tokens probs[:, i]``), divided by ``E^2``:
    ``CV^2 = Var(P) / mean(P)^2 = E^2 * mean_i (P_i - 1/E)^2``. It is 0 when the mean routing
    probability is uniform, and, unlike the Switch loss, it has a gradient under dense routing.

    Args:
        probs: N x E softmax probabilities (fp32), non-padding tokens only.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    return (probs.mean(dim=0) - 1.0 / num_experts).pow(2).mean()


BALANCE_LOSSES = ("switch", "mse")
ROUTINGS = ("topk", "dense")


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss, ST-MoE (Zoph et al., 2022, "ST-MoE: Designing Stable and Transferable
    Sparse Expert Models"), eq. 5: ``mean_tokens( logsumexp_j(logits_j) ^ 2 )``.

    Args:
        logits: N x E router logits (fp32), non-padding tokens only.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``-sum_j p_j log p_j`` of the router distribution (nats); N -> N."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1)


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


class RouterLosses:
    """The router statistics that only training and analysis read, computed on first access
    from the ``logits``, ``probs`` and ``expert_index`` of the class using it (``GateOutput``,
    ``MoERecord``), so that inference (a decoding step) pays for none of them."""

    logits: torch.Tensor  # N x E
    probs: torch.Tensor  # N x E
    expert_index: torch.Tensor  # N x k
    balance_type: str  # "switch" or "mse" (BALANCE_LOSSES)

    @cached_property
    def logits_finite(self) -> torch.Tensor:
        """Scalar bool: no logit is NaN or inf (checked by the criterion), counting the tokens
        whose non-finite logits the fallback expert replaced (eval mode: validation must still
        see a broken router)."""
        finite = torch.isfinite(self.logits.detach()).all()
        fallback = getattr(self, "fallback_tokens", None)
        if fallback is not None:
            finite = finite & (fallback == 0)
        return finite

    @cached_property
    def balance_loss(self) -> torch.Tensor:
        """Scalar, differentiable: Switch eq. 4-6 (``load_balance_loss``), or the MSE to uniform
        (``mse_balance_loss``) when ``balance_type`` is ``mse``."""
        if self.balance_type == "mse":
            return mse_balance_loss(self.probs)
        return load_balance_loss(self.probs, self.expert_index)

    @cached_property
    def z_loss(self) -> torch.Tensor:
        """Scalar, differentiable: ST-MoE eq. 5 (``router_z_loss``)."""
        return router_z_loss(self.logits)


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
    ):
        super().__init__()
        check_routing_options(num_experts, k, jitter_eps)
        check_router_options(routing, dense_until, temperature, balance_loss, usage_ema)
        check_fallback_expert(fallback_expert, num_experts)
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
        """fairseq calls this before every update (``BaseFairseqModel.set_num_updates``); only
        the maturity schedule (``dense_until``) reads it."""
        if self.dense_until > 0:
            self.routing_updates.fill_(int(num_updates))

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
            top_prob, top_index = torch.topk(probs, self.k, dim=-1)  # N x k, best first
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(x.shape[0], self.num_experts, self.k, factor)
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
            f"usage_ema={self.usage_ema_decay}, fallback_expert={self.fallback_expert}"
        )
