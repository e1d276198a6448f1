"""E feed-forward experts with stacked weights, computed on expert-contiguous token slices.

Weights are stored stacked, expert-major, in ``nn.Linear`` layout:

- ``fc1_weight``: E x d_ff x d_model, ``fc1_bias``: E x d_ff
- ``fc2_weight``: E x d_model x d_ff, ``fc2_bias``: E x d_model

so that expert ``e`` is exactly ``fc2(dropout(act(fc1(x))))`` with ``fc1.weight = fc1_weight[e]``,
and so that the stack can be computed as grouped matrix multiplies or sharded along dim 0.
Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS = ("relu", "relu_squared", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear")


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activations fairseq's ``utils.get_activation_fn`` knows, without importing fairseq."""
    if name == "relu":
        return F.relu
    if name == "relu_squared":
        return lambda x: F.relu(x).pow(2)
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
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if d_ff < 1:
            raise ValueError(f"expert FFN size must be >= 1, got {d_ff}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.activation_dropout = activation_dropout
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
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """Grouped FFN.

        Args:
            x: M x d_model tokens sorted by expert: the first ``tokens_per_expert[0]`` rows go to
                expert 0, the next to expert 1, and so on.
            tokens_per_expert: E counts summing to M.
        Returns:
            M x d_model, row i the output of its expert on row i of x.
        """
        counts = (
            tokens_per_expert.tolist()
            if torch.is_tensor(tokens_per_expert)
            else list(tokens_per_expert)
        )
        if len(counts) != self.num_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"tokens_per_expert must have {self.num_experts} entries summing to {x.shape[0]},"
                f" got {counts}"
            )
        outputs = []
        for e, chunk in enumerate(torch.split(x, counts, dim=0)):
            if counts[e] > 0:  # only experts that received tokens are visited
                outputs.append(self.expert_forward(e, chunk))
        if not outputs:
            return x.new_zeros(0, self.d_model)
        return torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation_name}, activation_dropout={self.activation_dropout}"
        )
