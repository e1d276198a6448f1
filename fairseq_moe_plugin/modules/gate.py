"""``TopKGate``: the MoE layer's router module, composed of the pieces in ``routing/``.

Everything here takes plain arguments and works without fairseq. Tokens are flattened: ``N``
non-padding tokens, ``E`` experts, ``k`` experts per token. Padding never reaches the gate: the
MoE layer removes it first, so every statistic is over real tokens only.

    x (N x C) --router.py--> logits, probs (N x E, fp32) --method.route--> GateOutput

The routing method (``routing/topk.py``, ``dense.py``, ``expert_choice.py``, looked up in the
``routing`` registry by name) decides; capacity (``routing/capacity.py``) and the training state
(``routing/balancing.py``: selection bias, usage EMA; ``routing/dense.py``: the maturity
schedule) are separate pieces the gate holds. The gate checks its own arguments only; rules
across options live in ``models/config_rules.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .routing import ROUTING_METHODS, GateOutput, RoutingMethod, RoutingMode, routing_method
from .routing.balancing import BiasBalancing, UsageEMA
from .routing.capacity import CAPACITY_PRIORITIES
from .routing.dense import Dense, DenseSchedule
from .routing.router import fallback_row, router_logits

BALANCE_LOSSES = ("switch", "mse")
DENSE = Dense()  # what the maturity schedule routes by while it runs


def check_routing_options(
    num_experts: int, k: int = 1, jitter_eps: float = 0.0, expert_parallel_size: int = 1
) -> None:
    """The check of the routing sizes (the gate and the experts call it).

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
    """The check of the router's other options; ValueError naming the flag."""
    routing_method(routing)
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


def check_method_options(
    routing: str = "topk",
    expert_capacity_factor: float = 2.0,
    capacity_priority: str = "rank_prob",
    bias_balancing_rate: float = 0.0,
) -> None:
    """The check of the routing methods' own options; ValueError naming the flag."""
    if capacity_priority not in CAPACITY_PRIORITIES:
        raise ValueError(
            f"--moe-capacity-priority must be one of {CAPACITY_PRIORITIES}, "
            f"got {capacity_priority!r}"
        )
    if not expert_capacity_factor > 0:
        raise ValueError(
            f"--moe-expert-capacity-factor must be > 0 (the mean number of experts per token "
            f"under expert choice), got {expert_capacity_factor}"
        )
    if not bias_balancing_rate >= 0:
        raise ValueError(
            f"--moe-bias-balancing-rate must be >= 0 (0 = off), got {bias_balancing_rate}"
        )
    method = routing_method(routing)
    if bias_balancing_rate > 0 and not method.bias_balancing:
        raise ValueError(
            f"--moe-bias-balancing-rate balances the top-k selection; it does not apply to "
            f"--moe-routing {routing} ({method.reason('bias_balancing')})"
        )


class TopKGate(nn.Module):
    """Linear router d_model -> E in fp32, softmax, then the routing method.

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
        routing: a registered routing method (``routing.ROUTING_METHODS``): ``topk``, ``dense``
            (every token to all E experts, each weighted by its probability, no capacity; k is
            then E) or ``expert_choice``.
        dense_until: route densely while the update count (``set_num_updates``) is below this,
            then by ``routing`` (DyLoRA-MoE's maturity schedule for new experts); 0 = off. The
            count is a buffer (``routing_updates``), so a checkpoint routes as it was trained.
        temperature: the softmax sees ``logits / temperature`` (> 0); the logits this gate
            reports (and the z-loss reads) are the divided ones.
        router_bias: a learned per-expert bias in the router (``wg.bias``); expert growth
            (``models/grow.py``) uses it to start new experts below the old ones.
        balance_loss: which balance loss the outputs' ``balance_loss`` computes: ``switch``
            (Switch Transformer eq. 4-6) or ``mse`` (``mse_balance_loss``).
        usage_ema: decay of the EMA of each expert's load share (``routing.balancing.UsageEMA``,
            buffer ``usage_ema``), updated with ``update_usage_ema``; 0 = off.
        fallback_expert: in eval mode, a token whose router logits are not all finite (NaN or
            inf: a corrupted router, or an input that overflows it) is routed to this expert
            alone, with weight 1, and counted in ``fallback_tokens``, so that one bad token
            cannot poison the routing of the rest of its batch; -1 turns this off. Training
            never falls back: there a non-finite router must surface (the criteria check it).
        expert_capacity_factor: under expert choice, every expert takes ``ceil(factor * N / E)``
            tokens (``routing.expert_choice``).
        capacity_priority: ``rank_prob`` (``routing.capacity``'s documented priority) or
            ``random``, used in training when capacity binds; eval mode always uses
            ``rank_prob``, so that inference is reproducible.
        bias_balancing_rate: auxiliary-loss-free balancing (``routing.balancing.BiasBalancing``,
            buffers ``balance_bias`` and ``balance_load``); 0 = off.
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
        self.num_experts, self.k = num_experts, k
        self.routing = str(routing)
        self.method: RoutingMethod = ROUTING_METHODS[self.routing]
        self.normalize_top_k = normalize_top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.expert_capacity_factor = expert_capacity_factor
        self.capacity_priority = capacity_priority
        self.jitter_eps = jitter_eps
        self.temperature = temperature
        self.fallback_expert = fallback_expert
        self.balance_type = balance_loss
        self.dense_until = dense_until
        self.usage_ema_decay = usage_ema
        self.bias_balancing_rate = bias_balancing_rate
        self.wg = nn.Linear(d_model, num_experts, bias=router_bias)
        if fallback_expert >= 0:  # built once, not in every decoding step; not saved
            row = fallback_row(num_experts, fallback_expert)
            self.register_buffer("fallback_logits", row, persistent=False)
        if router_bias:
            nn.init.zeros_(self.wg.bias)
        self.schedule = DenseSchedule(self, dense_until) if dense_until > 0 else None
        self.usage = UsageEMA(self, num_experts, usage_ema) if usage_ema > 0 else None
        self.balancing = (
            BiasBalancing(self, num_experts, bias_balancing_rate)
            if bias_balancing_rate > 0
            else None
        )

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every training batch (``FairseqTask.train_step``) and when
        it loads a checkpoint, on every worker alike: the maturity schedule reads the count; bias
        balancing applies the previous update's loads when the count moves on."""
        if self.schedule is not None:
            self.schedule.set_num_updates(num_updates)
        if self.balancing is not None:
            self.balancing.set_num_updates(num_updates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.balancing is not None:
            self.balancing.loaded()

    def accumulate_balance_load(self, load: torch.Tensor) -> None:
        """Add one training batch's E expert loads (the router's assignments, before capacity)
        to ``balance_load`` (``BiasBalancing.accumulate``)."""
        self.balancing.accumulate(load)

    def update_usage_ema(self, load: torch.Tensor) -> None:
        """Fold one batch's E expert loads into ``usage_ema`` (``UsageEMA.update``)."""
        if self.usage is None:
            raise ValueError("update_usage_ema needs a gate built with usage_ema > 0")
        self.usage.update(load)

    def selection_bias(self) -> torch.Tensor | None:
        """E: the bias added to the logits when top-k selects (aux-loss-free balancing)."""
        return None if self.balancing is None else self.balancing.bias

    @property
    def routes_densely(self) -> bool:
        """Whether this forward routes densely: dense routing, or the maturity schedule still
        runs (one host read of the update count, only when the schedule is on)."""
        return self.active_method.mode is RoutingMode.DENSE

    @property
    def active_method(self) -> RoutingMethod:
        """The method this forward routes by: ``dense`` while the maturity schedule runs."""
        if self.schedule is not None and self.schedule.running:
            return DENSE
        return self.method

    def experts_per_token(self) -> float:
        """The mean number of experts a token is computed by (k; E under dense routing; the
        expert capacity factor, at most E, under expert choice)."""
        return self.method.experts_per_token(self)

    @property
    def expert_choice_factor(self) -> float | None:
        """The capacity factor c when experts choose their tokens, else None."""
        return self.method.capacity_factor(self)

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x: N x C non-padding tokens (any dtype). Routing is computed in fp32."""
        logits, probs, finite_rows = router_logits(
            x,
            self.wg,
            self.jitter_eps,
            self.temperature,
            self.fallback_expert,
            self.training,
            getattr(self, "fallback_logits", None),
        )  # N x E, N x E
        return self.active_method.route(self, logits, probs, finite_rows)

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
