"""E LoRA experts sharing one frozen feed-forward network (``--moe-expert-type lora``).

Each expert is the frozen dense FFN of the layer plus its own low-rank deltas on fc1 and fc2, as
in DyLoRA-MoE (Liu et al. 2024, "Dynamic LoRA-based Mixture of Experts"), which puts LoRA
adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3:
``h = W0 x + dW x = W0 x + B A x``, scaled by ``alpha / r`` as in their Sec. 4.1) in the place of
experts. With ``s = alpha / r`` and dropout on the LoRA input as PEFT applies it, expert e is::

    h_e = fc1(x) + s * B1_e A1_e drop(x)       # d_ff
    a_e = act(h_e)                             # then fairseq's activation dropout
    y_e = fc2(a_e) + s * B2_e A2_e drop(a_e)   # d_model

and a token's output is ``y = sum_j w_j y_{e_j}`` over its kept choices (zero with none).

What this adds over running E PEFT-wrapped FFNs: the shared base is computed once per token,
not once per (token, expert) assignment. ``fc1(x)`` is taken for the N tokens and gathered to
the M assignments; fc2 is linear and shared, so it is applied once per token to the combined
activations, ``fc2.weight @ sum_j w_j a_j + (sum_j w_j) fc2.bias``. Only the low-rank deltas are
computed per expert, as grouped matmuls over the expert-contiguous slices of a ``DispatchPlan``
(the tokens routed to each expert).

Parameters (state-dict names under ``P.experts.``), ``C`` = d_model, ``F`` = d_ff, ``r`` = rank:

- ``fc1.weight`` F x C, ``fc1.bias`` F, ``fc2.weight`` C x F, ``fc2.bias`` C: the frozen base
  FFN (``requires_grad`` False from construction). Its values come from the dense model's FFN
  (upcycling, ``--moe-init-from-dense``); the init here is only ``nn.Linear``'s.
- ``lora_a1`` E x r x C, ``lora_b1`` E x F x r, ``lora_a2`` E x r x F, ``lora_b2`` E x C x r: the
  trainable deltas, A kaiming-uniform (``a=sqrt(5)``, PEFT's init: U(+-1/sqrt(fan_in))), B zero,
  so that a fresh expert is exactly the frozen FFN.

Expert parallelism is not supported: every rank holds all E experts (``expert_parallel`` is
None). Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import expert_generators, get_activation_fn
from .gate import check_routing_options
from .grouped_ffn import DispatchPlan, _combine, cast_once, check_plan

_LORA = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    """Raise ValueError naming the flag of a bad LoRA option."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank (--moe-lora-rank) must be an integer >= 1, got {rank!r}")
    if not alpha > 0:  # also rejects nan
        raise ValueError(f"LoRA alpha (--moe-lora-alpha) must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout (--moe-lora-dropout) must be in [0, 1), got {dropout}")


class LoRAExperts(nn.Module):
    """E experts = one frozen FFN + per-expert low-rank deltas on fc1 and fc2 (module doc).

    Args:
        num_experts: E.
        d_model: input/output width C.
        d_ff: hidden width F of the shared FFN.
        rank: r, the LoRA rank (``--moe-lora-rank``).
        alpha: the LoRA scale numerator; deltas are scaled by ``alpha / rank``
            (``--moe-lora-alpha``).
        lora_dropout: dropout on the input of each LoRA delta (``--moe-lora-dropout``).
        activation_fn: a name from fairseq's activations (``relu``, ``gelu``, ...).
        activation_dropout: dropout after the activation (fairseq's ``--activation-dropout``).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        rank: int = 8,
        alpha: float = 16.0,
        lora_dropout: float = 0.0,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
    ):
        super().__init__()
        check_routing_options(num_experts)
        check_lora_options(rank, alpha, lora_dropout)
        if d_ff < 1:
            raise ValueError(f"expert FFN size must be >= 1, got {d_ff}")
        self.num_experts = num_experts  # E
        self.num_local_experts = num_experts  # no expert parallelism: all E held here
        self.first_expert = 0
        self.expert_parallel = None
        self.d_model = d_model
        self.d_ff = d_ff
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank  # s
        self.lora_dropout = lora_dropout
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.activation_dropout = activation_dropout
        self.fc1 = nn.Linear(d_model, d_ff)  # frozen base, loaded from the dense FFN
        self.fc2 = nn.Linear(d_ff, d_model)
        self.fc1.requires_grad_(False)
        self.fc2.requires_grad_(False)
        self.lora_a1 = nn.Parameter(torch.empty(num_experts, rank, d_model))  # E x r x C
        self.lora_b1 = nn.Parameter(torch.empty(num_experts, d_ff, rank))  # E x F x r
        self.lora_a2 = nn.Parameter(torch.empty(num_experts, rank, d_ff))  # E x r x F
        self.lora_b2 = nn.Parameter(torch.empty(num_experts, d_model, rank))  # E x C x r
        self.reset_parameters()

    @property
    def local_expert_ids(self) -> range:
        """Every expert id: LoRA experts are never sharded."""
        return range(self.num_experts)

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """The base FFN as ``nn.Linear`` (or, with ``std``, N(0, std) weights and zero biases, as
        BERT's); each expert's A as PEFT (``kaiming_uniform_(a=sqrt(5))``, U(+-1/sqrt(fan_in))),
        drawn from its own generator seeded by one global draw and e, as
        ``StackedExperts.reset_parameters``; every B zero."""
        for linear in (self.fc1, self.fc2):
            if std is None:
                linear.reset_parameters()
            else:
                linear.weight.normal_(0.0, std)
                linear.bias.zero_()
        for e, _, generator in expert_generators(self.local_expert_ids):
            for a in (self.lora_a1, self.lora_a2):
                w = torch.empty(a.shape[1:])  # r x fan_in
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                a[e].copy_(w)
        self.lora_b1.zero_()
        self.lora_b2.zero_()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on a LoRA delta's input (identity outside training)."""
        return F.dropout(x, p=self.lora_dropout, training=self.training)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on x, the plain formula: M x d_model -> M x d_model."""
        s = self.scaling
        h = self.fc1(x) + s * self._drop(x) @ self.lora_a1[e].t() @ self.lora_b1[e].t()  # M x F
        a = F.dropout(self.activation_fn(h), p=self.activation_dropout, training=self.training)
        return self.fc2(a) + s * self._drop(a) @ self.lora_a2[e].t() @ self.lora_b2[e].t()

    def forward(
        self, x: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The experts over the assignments of ``plan``, combined per token.

        Args:
            x: N x d_model tokens.
            plan: where each kept (token, choice) assignment goes (``DispatchPlan``).
            weight: N x k combine weights; None means 1. Dropped choices add nothing, whatever
                their weight.
        Returns:
            N x d_model: row t is ``sum_j weight[t, j] * expert_{e_j}(x[t])`` over t's kept
            choices (zero for a token with none), in the compute dtype (the autocast dtype under
            autocast, else the weights').
        """
        check_plan(plan, x, weight, self.num_experts)
        names = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", *_LORA)
        x, weight, cast = cast_once(x, weight, tuple(self.get_parameter(n) for n in names))
        params = dict(zip(names, cast, strict=True))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x, plan, weight, params)

    def _forward(
        self,
        x: torch.Tensor,  # N x C
        plan: DispatchPlan,
        weight: torch.Tensor | None,  # N x k
        params: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        rows = plan.num_rows  # M
        kept = plan.combine_index < rows  # N x k, False where dropped
        base = F.linear(x, params["fc1.weight"], params["fc1.bias"])  # N x F, once per token
        x_rows = x.index_select(0, plan.token_index)  # M x C
        base_rows = base.index_select(0, plan.token_index)  # M x F
        out = self._expert_rows(x_rows, base_rows, plan, params)  # (M+1) x (F+C), last row 0
        combined = _combine(out, plan.combine_index, weight, inplace=False)  # N x (F+C)
        acts, delta = combined.split([self.d_ff, self.d_model], dim=1)  # N x F, N x C
        # sum_j w_j over the kept choices: how many times fc2.bias is added.
        total = kept.to(x.dtype) if weight is None else weight * kept  # N x k
        y = F.linear(acts, params["fc2.weight"]) + delta  # N x C
        y = torch.addcmul(y, total.sum(dim=1, keepdim=True), params["fc2.bias"])  # N x C
        if rows == 0 and torch.is_grad_enabled():
            # No expert ran: give the LoRA parameters zero gradients (not None), as
            # StackedExperts does, so that every rank's data-parallel reduction sees them.
            y = y + sum(params[n].sum() for n in _LORA) * 0.0
        return y

    def _expert_rows(
        self,
        x_rows: torch.Tensor,  # M x C, each assignment's token
        base_rows: torch.Tensor,  # M x F, fc1(x) of each assignment's token
        plan: DispatchPlan,
        params: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Per assignment, its expert's activation a_e and fc2 delta s * B2_e A2_e drop(a_e),
        side by side: (M+1) x (F+C), expert by expert, and a last zero row (dropped choices)."""
        s = self.scaling
        # unbind: one E x ... gradient for the stack, not one per expert slice taken.
        a1, b1, a2, b2 = (params[n].unbind(0) for n in _LORA)  # E of r x C, F x r, r x F, C x r
        x_rows = self._drop(x_rows)  # M x C, each assignment its own mask
        pieces = []
        start = 0
        for e, count in enumerate(plan.tokens_per_expert):
            if count == 0:
                continue
            end = start + count
            low = x_rows[start:end] @ a1[e].t()  # count x r
            h = torch.addmm(base_rows[start:end], low, b1[e].t(), alpha=s)  # count x F
            a = self.activation_fn(h)
            a = F.dropout(a, p=self.activation_dropout, training=self.training)  # count x F
            delta = (self._drop(a) @ a2[e].t()) @ b2[e].t() * s  # count x C
            pieces.append(torch.cat([a, delta], dim=1))  # count x (F+C)
            start = end
        pieces.append(x_rows.new_zeros(1, self.d_ff + self.d_model))  # the dropped choices' row
        return torch.cat(pieces)  # (M+1) x (F+C)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"rank={self.rank}, alpha={self.alpha}, lora_dropout={self.lora_dropout}, "
            f"activation={self.activation_name}, activation_dropout={self.activation_dropout}"
        )
