"""E feed-forward experts with stacked weights, computed on expert-contiguous token slices
(the compute itself, forward and backward, is ``grouped_ffn.grouped_expert_ffn``).

Weights are stored stacked, expert-major, in ``nn.Linear`` layout:

- ``fc1_weight``: E x d_ff x d_model, ``fc1_bias``: E x d_ff
- ``fc2_weight``: E x d_model x d_ff, ``fc2_bias``: E x d_model

so that expert ``e`` is exactly ``fc2(dropout(act(fc1(x))))`` with ``fc1.weight = fc1_weight[e]``,
and so that the stack can be computed as grouped matrix multiplies or sharded along dim 0.
Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gate import check_routing_options
from .grad_buffers import GradientBuffers
from .grouped_ffn import DispatchPlan, grouped_expert_ffn

_ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear")


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activations fairseq's ``utils.get_activation_fn`` knows, without importing fairseq."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_fast", "gelu_accurate"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(_ACTIVATIONS)}")


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
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        reuse_grad_buffers: bool = True,
    ):
        super().__init__()
        check_routing_options(num_experts)
        if d_ff < 1:
            raise ValueError(f"expert FFN size must be >= 1, got {d_ff}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.activation_dropout = activation_dropout
        self.grad_buffers = GradientBuffers(enabled=reuse_grad_buffers)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, d_ff))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as ``nn.Linear`` is (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), the
        init of fairseq's dense transformer FFN."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on x: M x d_model -> M x d_model."""
        h = self.activation_fn(F.linear(x, self.fc1_weight[e], self.fc1_bias[e]))  # M x d_ff
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])  # M x d_model

    def forward(
        self, x: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Grouped FFN over the assignments of ``plan``, combined per token.

        Args:
            x: N x d_model tokens.
            plan: where each kept (token, choice) assignment goes (``DispatchPlan``).
            weight: N x k combine weights (0 where dropped); None means 1.
        Returns:
            N x d_model: row t is ``sum_j weight[t, j] * expert(x[t])`` over t's kept choices
            (zero for a token with none), in the experts' compute dtype (the autocast dtype
            under autocast, else the weights' dtype).
        """
        num_tokens, k = plan.combine_index.shape
        if len(plan.tokens_per_expert) != self.num_experts or num_tokens != x.shape[0]:
            raise ValueError(
                f"the plan's tokens_per_expert must have {self.num_experts} entries (one per "
                f"expert) and cover the {x.shape[0]} tokens of x; it has "
                f"{len(plan.tokens_per_expert)} entries for {num_tokens} tokens"
            )
        if weight is not None and weight.shape != (num_tokens, k):
            raise ValueError(
                f"combine weights must have shape {(num_tokens, k)}, got {tuple(weight.shape)}"
            )
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast would cast op by op inside the grouped function; cast once here instead.
            dtype = torch.get_autocast_dtype(device_type)
            params = tuple(p.to(dtype) for p in params)
        else:
            dtype = self.fc1_weight.dtype
        with torch.autocast(device_type=device_type, enabled=False):
            return grouped_expert_ffn(
                x.to(dtype),
                plan,
                *params,
                activation=self.activation_name,
                weight=None if weight is None else weight.to(dtype),
                dropout_p=self.activation_dropout if self.training else 0.0,
                grad_buffers=self.grad_buffers,
            )

    def train(self, mode: bool = True) -> StackedExperts:
        if not mode:
            self.grad_buffers.clear()  # evaluation needs no gradient buffers
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation_name}, activation_dropout={self.activation_dropout}, "
            f"reuse_grad_buffers={self.grad_buffers.enabled}"
        )
