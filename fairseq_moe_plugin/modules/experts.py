"""E feed-forward experts with stacked weights, computed on expert-contiguous token slices
(the compute itself, forward and backward, is ``expert_loop.grouped_expert_ffn``, or a
grouped GEMM, ``grouped_gemm.py``). The ``ffn`` kind of ``expert_kinds.EXPERT_KINDS``.

Weights are stored stacked, expert-major, in ``nn.Linear`` layout:

- ``fc1_weight``: E x d_ff x d_model, ``fc1_bias``: E x d_ff
- ``fc2_weight``: E x d_model x d_ff, ``fc2_bias``: E x d_model

so that expert ``e`` is exactly ``fc2(dropout(act(fc1(x))))`` with ``fc1.weight = fc1_weight[e]``,
and so that the stack can be computed as grouped matrix multiplies or sharded along dim 0.

With expert parallelism (``expert_parallel.py``) a rank holds only its E/P experts, rows
``[first_expert, first_expert + E/P)`` of the stack, and marks them ``p.expert = True`` (fairseq's
marker for parameters outside data-parallel all-reduce). What does not depend on the layout:

- initialisation: expert e is drawn from its own generator, seeded by one draw of the global RNG
  and e, so its weights are the same whatever P, and so is everything initialised after it;
- the state dict: ``state_dict()`` gathers the shards into the full E x ... stack (a collective:
  every rank of the expert-parallel group calls it, as fairseq's checkpoint saving does), and
  ``load_state_dict`` takes a full stack and keeps this rank's rows. A checkpoint saved at any P
  loads at any other, on one process too.

Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .activations import get_activation_fn
from .dispatch import DispatchPlan, cast_once, check_plan
from .expert_loop import grouped_expert_ffn
from .expert_parallel import ExpertParallelGroups, expert_parallel_groups, gathers_expert_state
from .expert_protocol import UpcycleRule
from .gate import check_routing_options
from .grad_buffers import GradientBuffers
from .grouped_gemm import IMPLS, grouped_mm_ffn, padded_ffn, pick_impl
from .int8_experts import Int8StackedExperts
from .placements import placement

__all__ = ["StackedExperts", "expert_generators", "get_activation_fn"]


def expert_generators(expert_ids: range):
    """``(local index, expert id, generator)`` for each expert held here: one draw of the global
    RNG seeds them all, expert e's generator with ``seed + e``, so what an expert draws does not
    depend on which experts a process holds (the expert-parallel layout)."""
    seed = int(torch.randint(0, 2**62, ()).item())  # one draw of the global RNG
    for local, e in enumerate(expert_ids):
        yield local, e, torch.Generator().manual_seed(seed + e)


class StackedExperts(nn.Module):
    """E two-layer FFNs ``fc2(dropout(act(fc1(x))))`` stored as stacked tensors.

    Args:
        num_experts: E.
        d_model: input/output width.
        d_ff: hidden width of every expert.
        activation_fn: a name from fairseq's activations (``relu``, ``gelu``, ...).
        activation_dropout: dropout after the activation (fairseq's ``--activation-dropout``).
        reuse_grad_buffers: on CPU, reuse the stacked weight-gradient buffers across updates when
            nothing else holds them (see ``grad_buffers.py``); they stay allocated between
            updates, and ``eval()`` frees them.
        expert_parallel: the expert-parallel layout; None (default) holds all E experts.
        impl: how the matmuls are issued (``grouped_gemm.IMPLS``): ``auto`` (default) picks
            per call, see ``grouped_gemm.pick_impl``.
        zero_output: initialise every expert's output projection (``fc2_weight``,
            ``fc2_bias``) to zero, here and in every ``reset_parameters``: the experts then add
            nothing at first (``--moe-expert-placement parallel``), and only fc2 gets a
            gradient at the first update (as a LoRA B matrix at zero).
    """

    _STACKED = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    # The ``Experts`` protocol (``expert_protocol.py``): every capability, no shared state.
    kind = "ffn"
    shares_dense_ffn = reads_lora_options = quantized = False
    supports_expert_parallel = supports_parallel_placement = True
    supports_shared_experts = supports_cmr = supports_int8 = True
    STACKED = _STACKED
    SHARED_STATE: tuple[str, ...] = ()
    GROW_ZERO: tuple[str, ...] = ()
    UPCYCLE = UpcycleRule(
        {
            "fc1_weight": "fc1.weight",
            "fc1_bias": "fc1.bias",
            "fc2_weight": "fc2.weight",
            "fc2_bias": "fc2.bias",
        },  # fmt: skip
        into_every_expert=True,
    )

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        reuse_grad_buffers: bool = True,
        expert_parallel: ExpertParallelGroups | None = None,
        impl: str = "auto",
        zero_output: bool = False,
    ):
        super().__init__()
        self.zero_output = zero_output
        if impl not in IMPLS:
            raise ValueError(f"unknown expert implementation {impl!r}; expected one of {IMPLS}")
        self.impl = impl
        parts = 1 if expert_parallel is None else expert_parallel.size
        check_routing_options(num_experts, expert_parallel_size=parts)
        if d_ff < 1:
            raise ValueError(f"expert FFN size must be >= 1, got {d_ff}")
        self.num_experts = num_experts  # E, over all ranks
        self.num_local_experts = num_experts // parts  # the experts held here
        self.first_expert = (
            0 if expert_parallel is None else expert_parallel.rank * (num_experts // parts)
        )
        self.expert_parallel = expert_parallel
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.activation_dropout = activation_dropout
        self.grad_buffers = GradientBuffers(enabled=reuse_grad_buffers)
        local = self.num_local_experts
        self.fc1_weight = nn.Parameter(torch.empty(local, d_ff, d_model))
        self.fc1_bias = nn.Parameter(torch.empty(local, d_ff))
        self.fc2_weight = nn.Parameter(torch.empty(local, d_model, d_ff))
        self.fc2_bias = nn.Parameter(torch.empty(local, d_model))
        if expert_parallel is not None:
            for p in self.parameters():
                p.expert = True  # fairseq's marker: not all-reduced with the data-parallel grads
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, moe_cfg, d_model: int, ffn_dim: int, activation_fn: str, activation_dropout: float
    ) -> StackedExperts:
        """The experts of one layer from the model's MoE options (``MoEConfig``): their own
        size and activation when set (``--moe-expert-ffn-dim``, ``--moe-activation-fn``), else
        the dense FFN's; zero output under a placement beside the dense FFN."""
        return cls(
            moe_cfg.moe_expert_count,
            d_model,
            moe_cfg.moe_expert_ffn_dim or ffn_dim,
            activation_fn=moe_cfg.moe_activation_fn or activation_fn,
            activation_dropout=activation_dropout,
            reuse_grad_buffers=not moe_cfg.moe_no_grad_buffer_reuse,
            expert_parallel=expert_parallel_groups(moe_cfg.moe_expert_parallel_size),
            impl=moe_cfg.moe_expert_impl,
            zero_output=placement(moe_cfg).experts_start_at_zero,  # adds nothing at first
        )

    @property
    def local_expert_ids(self) -> range:
        """The global ids of the experts held here."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Initialise every expert as ``nn.Linear`` is (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
        init of fairseq's dense transformer FFN), or, with ``std``, as BERT's FFNs are
        (N(0, std) weights, zero biases). Expert e draws from its own generator (see the module
        doc), so the result does not depend on the expert-parallel layout."""
        pairs = ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias))
        for local, _, generator in expert_generators(self.local_expert_ids):
            for weight, bias in pairs:
                w, b = torch.empty(weight.shape[1:]), torch.empty(bias.shape[1:])
                if std is None:
                    bound = 1.0 / math.sqrt(weight.shape[-1])
                    w.uniform_(-bound, bound, generator=generator)
                    b.uniform_(-bound, bound, generator=generator)
                else:
                    w.normal_(0.0, std, generator=generator)
                    b.zero_()
                weight[local].copy_(w)
                bias[local].copy_(b)
        if self.zero_output:
            self.fc2_weight.zero_()
            self.fc2_bias.zero_()

    @torch.no_grad()
    def add_noise_(self, name: str, std: float) -> None:
        """Add N(0, std) noise to every expert's slice of the stacked parameter ``name`` (sparse
        upcycling), expert e from its own generator as in ``reset_parameters``, so the noise
        does not depend on the expert-parallel layout."""
        param = getattr(self, name)
        for local, _, generator in expert_generators(self.local_expert_ids):
            noise = torch.randn(param.shape[1:], generator=generator) * std
            param[local].add_(noise.to(param.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.expert_parallel is None or keep_vars or not gathers_expert_state():
            return  # this process's rows (a sharded checkpoint writes them as they are)
        for name in self._STACKED:  # the full stack: every rank's shard, in expert order
            local = destination[prefix + name]
            full = local.new_empty(self.num_experts, *local.shape[1:])
            group = self.expert_parallel.group
            dist.all_gather_into_tensor(full, local.contiguous(), group=group)
            destination[prefix + name] = full

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):  # fmt: skip
        for name in self._STACKED:
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.dim() and value.shape[0] == self.num_experts:  # the full stack: our rows
                state_dict[key] = value[
                    self.first_expert : self.first_expert + self.num_local_experts
                ]
            elif value.dim() == 0 or value.shape[0] != self.num_local_experts:
                error_msgs.append(
                    f"{key}: the checkpoint holds {value.shape[0] if value.dim() else 0} experts, "
                    f"this model {self.num_experts} (--moe-expert-count)"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)  # fmt: skip

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (counted among the experts held here) on x: M x d_model -> M x d_model."""
        h = self.activation_fn(F.linear(x, self.fc1_weight[e], self.fc1_bias[e]))  # M x d_ff
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])  # M x d_model

    def forward(
        self,
        x: torch.Tensor,
        plan: DispatchPlan,
        weight: torch.Tensor | None = None,
        decide_on=None,
    ) -> torch.Tensor:
        """Grouped FFN over the assignments of ``plan``, combined per token.

        Args:
            x: N x d_model tokens.
            plan: where each kept (token, choice) assignment goes (``DispatchPlan``).
            weight: N x k combine weights (0 where dropped); None means 1.
            decide_on: the routing whose counts choose the ``auto`` path
                (``grouped_gemm.pick_impl``); default ``plan``.
        Returns:
            N x d_model: row t is ``sum_j weight[t, j] * expert(x[t])`` over t's kept choices
            (zero for a token with none), in the experts' compute dtype (the autocast dtype
            under autocast, else the weights' dtype).
        """
        check_plan(plan, x, weight, self.num_local_experts)
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        x, weight, params = cast_once(x, weight, params)
        device_type = x.device.type
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or any(p.requires_grad for p in params)
        )
        dropout_p = self.activation_dropout if self.training else 0.0
        # Tracers (fvcore's FLOP count) must see the matrix products of the real rows.
        inference = not needs_grad and dropout_p == 0
        impl = (
            "loop"
            if torch.jit.is_tracing()
            else pick_impl(self.impl, x, plan, inference, decide_on)
        )
        with torch.autocast(device_type=device_type, enabled=False):
            if impl == "grouped_mm":
                return grouped_mm_ffn(x, plan, weight, *params, self.activation_name, dropout_p)
            if impl == "padded":
                cap = None if decide_on is None else max(decide_on.tokens_per_expert, default=0)
                return padded_ffn(x, plan, weight, *params, self.activation_name, cap)
            return grouped_expert_ffn(
                x,
                plan,
                *params,
                activation=self.activation_name,
                weight=weight,
                dropout_p=dropout_p,
                grad_buffers=self.grad_buffers,
            )

    def stacked_parameters(self) -> list[torch.Tensor]:
        """Every parameter is per expert (stacked along E)."""
        return list(self.parameters())

    def expert_macs(self, tokens: int, assignments: float) -> float:
        """Two matmuls per assignment: ``2 C F`` multiply-adds each."""
        return assignments * 2 * self.d_model * self.d_ff

    def check_onnx_export(self) -> None:
        """FFN experts export (``deploy/onnx_moe.py``)."""

    def onnx_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 copies of the four stacks, E x F x C, E x F, E x C x F, E x C."""
        return tuple(getattr(self, name).detach().float() for name in self._STACKED)

    def quantized_int8(self, compute: str) -> Int8StackedExperts:
        """int8 experts (``--moe-int8 compute``) quantised from these."""
        return Int8StackedExperts.from_float(self, compute)

    def upcycle_noise_(self, name: str, std: float) -> None:
        """Sparse upcycling's noise on every expert's copy of the dense FFN (``add_noise_``)."""
        self.add_noise_(name, std)

    def init_like_bert(self) -> None:
        """N(0, 0.02) weights, zero biases, as ``init_bert_params`` does to a dense FFN."""
        self.reset_parameters(std=0.02)

    def train(self, mode: bool = True) -> StackedExperts:
        if not mode:
            self.grad_buffers.clear()  # evaluation needs no gradient buffers
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_experts={self.first_expert}-"
            f"{self.first_expert + self.num_local_experts - 1}, d_model={self.d_model}, "
            f"d_ff={self.d_ff}, "
            f"activation={self.activation_name}, activation_dropout={self.activation_dropout}, "
            f"reuse_grad_buffers={self.grad_buffers.enabled}, impl={self.impl}"
        )
