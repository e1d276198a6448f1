"""E LoRA experts sharing one frozen feed-forward network (``--moe-expert-type lora``).

The experts are low-rank adapters of the layer's frozen dense FFN, mixed at each linear layer as
in MoLoRA (Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit: Extremely Parameter
Efficient MoE for Instruction Tuning", Sec. 3; the form LoRA-MoE / DyLoRA-MoE style adapters
use). Each adapter is LoRA's (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", eq. 3: ``h = W0 x + dW x = W0 x + B A x``, scaled by ``alpha / r`` as in their
Sec. 4.1). With ``s = alpha / r``, ``drop`` the LoRA dropout (on the delta's input, as PEFT
applies it) and token t's kept choices j (expert e_j, combine weight w_j)::

    h_t = fc1(x_t) + s * sum_j w_j * B1_{e_j} A1_{e_j} drop(x_t)    # d_ff
    a_t = act(h_t)                                                 # then activation dropout
    y_t = fc2(a_t) + s * sum_j w_j * B2_{e_j} A2_{e_j} drop(a_t)    # d_model

The frozen FFN (fc1, the activation and fc2) is the layer's base and runs once per token with
weight 1, whatever the router weights; the experts only adapt it. A token with no kept choice
(all dropped by capacity) therefore gets the plain frozen FFN, not zero.

Why mix at each linear layer rather than mix E whole "FFN + deltas" experts
(``y = sum_j w_j FFN_{e_j}(x)``): there the frozen FFN's output is scaled by the sum of the
kept weights, so an upcycled model starts from the pretrained one only if the weights are
normalised to 1, e.g. top-1 without normalisation scales the FFN by the router probability
(~1/E), while top-1 with normalisation (w = 1) gives the router no task gradient. Here, with
every B zero (a fresh or upcycled layer), the output is exactly the frozen FFN for any routing
weights (unnormalised top-1 included), and once B != 0 the router gets its task gradient
through the w_j of the deltas (unless the weights are constant, as normalised top-1's are).

What this adds over E PEFT-wrapped FFNs: the shared base is computed once per token (fc1, the
activation and fc2 on N rows, not on the M (token, expert) assignments), and only the low-rank
deltas are per assignment: grouped rank-r matmuls over the expert-contiguous slices of a
``DispatchPlan`` (the tokens routed to each expert), combined per token with the router weights
(``dispatch.combine``, dropped choices adding nothing). Matmul FLOPs:
``4 N C F + 4 M r (C + F)``. Each assignment draws its own LoRA dropout mask (each expert's
adapter has its own dropout, as in PEFT); activation dropout is drawn once per token.

Parameters (state-dict names under ``P.experts.``), ``C`` = d_model, ``F`` = d_ff, ``r`` = rank:

- ``fc1.weight`` F x C, ``fc1.bias`` F, ``fc2.weight`` C x F, ``fc2.bias`` C: the frozen base
  FFN (``requires_grad`` False from construction). Its values come from the dense model's FFN
  (upcycling, ``--moe-init-from-dense``); the init here is only ``nn.Linear``'s.
- ``lora_a1`` E x r x C, ``lora_b1`` E x F x r, ``lora_a2`` E x r x F, ``lora_b2`` E x C x r: the
  trainable deltas, A kaiming-uniform (``a=sqrt(5)``, PEFT's init: U(+-1/sqrt(fan_in))), B zero,
  so that a fresh layer is exactly the frozen FFN.

Expert parallelism is not supported: every rank holds all E experts (``expert_parallel`` is
None). The ``lora`` kind of ``expert_kinds.EXPERT_KINDS``; the hooks it cannot offer (ONNX export,
int8) raise ``ExpertKindUnsupported``. Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import get_activation_fn
from .dispatch import DispatchPlan, cast_once, check_plan, combine, expert_slices
from .expert_protocol import ExpertKindUnsupported, NoExportNoInt8, UpcycleRule
from .experts import expert_generators
from .gate import check_routing_options

_LORA = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")
_BASE = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # the frozen FFN, not per expert


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    """Raise ValueError naming the flag of a bad LoRA option."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank (--moe-lora-rank) must be an integer >= 1, got {rank!r}")
    if not alpha > 0:  # also rejects nan
        raise ValueError(f"LoRA alpha (--moe-lora-alpha) must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout (--moe-lora-dropout) must be in [0, 1), got {dropout}")


class LoRAExperts(NoExportNoInt8, nn.Module):
    """E low-rank experts adapting one frozen FFN at fc1 and fc2, mixed per linear layer
    (module doc).

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

    # The ``Experts`` protocol (``expert_protocol.py``): the dense FFN is the experts' base, so
    # no expert parallelism, no placement beside it, no shared experts, CMR or int8.
    kind = "lora"
    shares_dense_ffn = reads_lora_options = True
    supports_expert_parallel = supports_parallel_placement = False
    supports_shared_experts = supports_cmr = supports_int8 = quantized = False
    STACKED = _LORA
    SHARED_STATE = _BASE
    GROW_ZERO = ("lora_b1", "lora_b2")  # B starts at zero (PEFT)
    UPCYCLE = UpcycleRule(
        dict(zip(_BASE, _BASE, strict=True)), into_every_expert=False, new=("lora_",)
    )

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

    @classmethod
    def from_config(
        cls, moe_cfg, d_model: int, ffn_dim: int, activation_fn: str, activation_dropout: float
    ) -> LoRAExperts:
        """The experts of one layer from the model's MoE options: the dense FFN's size and
        activation, the LoRA options (``--moe-lora-rank``, ``-alpha``, ``-dropout``)."""
        return cls(
            moe_cfg.moe_expert_count,
            d_model,
            ffn_dim,
            rank=moe_cfg.moe_lora_rank,
            alpha=moe_cfg.moe_lora_alpha,
            lora_dropout=moe_cfg.moe_lora_dropout,
            activation_fn=activation_fn,
            activation_dropout=activation_dropout,
        )

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
        """The frozen FFN with expert ``e``'s deltas at weight 1 (what ``forward`` computes for a
        token routed to e alone with combine weight 1, e.g. normalised top-1), the plain
        formula: M x d_model -> M x d_model."""
        s = self.scaling
        h = self.fc1(x) + s * self._drop(x) @ self.lora_a1[e].t() @ self.lora_b1[e].t()  # M x F
        a = F.dropout(self.activation_fn(h), p=self.activation_dropout, training=self.training)
        return self.fc2(a) + s * self._drop(a) @ self.lora_a2[e].t() @ self.lora_b2[e].t()

    def forward(
        self, x: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The frozen FFN on every token, adapted at fc1 and fc2 by the deltas of its kept
        choices in ``plan``, weighted (module doc).

        Args:
            x: N x d_model tokens.
            plan: where each kept (token, choice) assignment goes (``DispatchPlan``).
            weight: N x k combine weights; None means 1. Dropped choices add nothing, whatever
                their weight.
        Returns:
            N x d_model: row t is ``fc2(a_t) + s * sum_j weight[t, j] * B2_e A2_e drop(a_t)``
            with ``a_t = act(fc1(x_t) + s * sum_j weight[t, j] * B1_e A1_e drop(x_t))``, e the
            expert of t's kept choice j (the plain frozen FFN for a token with none), in the
            compute dtype (the autocast dtype under autocast, else the weights').
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
        # unbind: one E x ... gradient for the stack, not one per expert slice taken.
        a1, b1, a2, b2 = (params[n].unbind(0) for n in _LORA)  # E of r x C, F x r, r x F, C x r
        h = F.linear(x, params["fc1.weight"], params["fc1.bias"])  # N x F, once per token
        delta1 = self._expert_deltas(x, plan, a1, b1)  # (M+1) x F, last row 0
        h = h + combine(delta1, plan.combine_index, weight, inplace=False)  # N x F
        a = self.activation_fn(h)
        a = F.dropout(a, p=self.activation_dropout, training=self.training)  # N x F
        y = F.linear(a, params["fc2.weight"], params["fc2.bias"])  # N x C, once per token
        delta2 = self._expert_deltas(a, plan, a2, b2)  # (M+1) x C, last row 0
        y = y + combine(delta2, plan.combine_index, weight, inplace=False)  # N x C
        if plan.num_rows == 0 and torch.is_grad_enabled():
            # No expert ran: give the LoRA parameters zero gradients (not None), as
            # StackedExperts does, so that every rank's data-parallel reduction sees them.
            y = y + sum(params[n].sum() for n in _LORA) * 0.0
        return y

    def _expert_deltas(
        self,
        source: torch.Tensor,  # N x D_in, the linear layer's input per token
        plan: DispatchPlan,
        lora_a: tuple[torch.Tensor, ...],  # E of r x D_in
        lora_b: tuple[torch.Tensor, ...],  # E of D_out x r
    ) -> torch.Tensor:
        """Per assignment, its expert's unweighted delta ``s * B_e A_e drop(source_t)``:
        (M+1) x D_out, expert by expert, and a last zero row (dropped choices). Each expert's
        rows are gathered in turn (no M x D_in copy of the input at once)."""
        pieces = []
        for e, start, end in expert_slices(plan):
            rows = source.index_select(0, plan.token_index[start:end])  # count x D_in
            low = (self._drop(rows) @ lora_a[e].t()) * self.scaling  # count x r, own mask
            pieces.append(low @ lora_b[e].t())  # count x D_out
        pieces.append(source.new_zeros(1, lora_b[0].shape[0]))  # the dropped choices' row
        return torch.cat(pieces)  # (M+1) x D_out

    def stacked_parameters(self) -> list[torch.Tensor]:
        """The deltas: the shared frozen FFN is not per expert."""
        return [getattr(self, name) for name in _LORA]

    def expert_macs(self, tokens: int, assignments: float) -> float:
        """The frozen FFN once per token (``2 C F``), ``2 r (C + F)`` per assignment."""
        d, f = self.d_model, self.d_ff
        return tokens * 2 * d * f + assignments * 2 * self.rank * (d + f)

    def upcycle_noise_(self, name: str, std: float) -> None:
        """No noise: the dense FFN is copied once, into the frozen base (``UPCYCLE``)."""
        raise ExpertKindUnsupported("LoRA experts copy the dense FFN once: no per-expert noise")

    def init_like_bert(self) -> None:
        """Nothing: ``init_bert_params`` initialises the base FFN (``nn.Linear``) itself; the
        deltas keep PEFT's init (B zero)."""

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"rank={self.rank}, alpha={self.alpha}, lora_dropout={self.lora_dropout}, "
            f"activation={self.activation_name}, activation_dropout={self.activation_dropout}"
        )
