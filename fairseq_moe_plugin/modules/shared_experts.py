"""What runs for every token beside the routed experts: shared experts, and the CMR gate that
mixes a dense FFN with the MoE output.

**Shared experts.**
DeepSeekMoE (Dai et al. 2024, "DeepSeekMoE: Towards Ultimate Expert Specialization in
Mixture-of-Experts Language Models", sec. 3.2, eq. 9):

    h_t = sum_{i=1..K_s} FFN_i(u_t) + sum_{i=K_s+1..N} g_{i,t} FFN_i(u_t) + u_t

The ``K_s`` shared FFNs of width F are computed as one FFN of width ``K_s * F``: its hidden
units are the shared experts' hidden units side by side, so ``fc2(act(fc1(x)))`` is the sum of
the ``K_s`` experts' outputs (each expert's fc2 bias summed into one bias), identical math.
Qwen1.5-MoE gates the shared output per token by a learned sigmoid, ``sigmoid(w . x) *
shared(x)`` (``gated=True``). The routed part and the residual ``u_t`` are the MoE layer's and
the transformer layer's (``moe_layer.py``, ``moe_transformer_layer.py``).

**Conditional MoE routing** (CMR; NLLB Team 2022, "No Language Left Behind", sec. 6.2): the
layer keeps its dense FFN beside the MoE layer and mixes them per token,

    y = (1 - g) * FFN_dense(x) + g * MoE(x),    g = sigmoid(w . x + b)

with dropout on g in training (NLLB's CMR gate drop). ``cmr_gate_values`` computes g; the
transformer layer (``moe_transformer_layer.py``) holds the gate (``cmr_gate``, d_model -> 1) and
the dense FFN.

Plain arguments; no fairseq needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import get_activation_fn


class SharedExperts(nn.Module):
    """``num_shared`` always-on FFN experts of width ``ffn_dim`` as one FFN of width
    ``num_shared * ffn_dim``, optionally gated per token (see the module doc).

    Args:
        d_model: input/output width.
        ffn_dim: hidden width F of every shared expert.
        num_shared: K_s >= 1.
        activation_fn: a name from fairseq's activations (``relu``, ``gelu``, ...).
        activation_dropout: dropout after the activation (fairseq's ``--activation-dropout``).
        gated: scale the output per token by ``sigmoid(gate(x))`` (``gate``: d_model -> 1, no
            bias; Qwen1.5-MoE's shared-expert gate).

    Parameters: ``fc1`` (d_model -> K_s*F), ``fc2`` (K_s*F -> d_model), ``gate`` when gated.
    """

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        num_shared: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        gated: bool = False,
    ):
        super().__init__()
        if num_shared < 1:
            raise ValueError(
                f"the number of shared experts (--moe-shared-experts) must be >= 1, "
                f"got {num_shared}"
            )
        if ffn_dim < 1:
            raise ValueError(f"shared expert FFN size must be >= 1, got {ffn_dim}")
        self.d_model, self.ffn_dim, self.num_shared = d_model, ffn_dim, num_shared
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.fc1 = nn.Linear(d_model, num_shared * ffn_dim)
        self.fc2 = nn.Linear(num_shared * ffn_dim, d_model)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C (flattened non-padding tokens) -> N x C."""
        h = self.activation_dropout(self.activation_fn(self.fc1(x)))  # N x (K_s*F)
        y = self.fc2(h)  # N x C
        if self.gate is not None:  # N x 1 gate per token, in fp32 as the router
            with torch.autocast(device_type=x.device.type, enabled=False):
                g = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
            y = g.to(y.dtype) * y
        return y

    def extra_repr(self) -> str:
        return (
            f"num_shared={self.num_shared}, ffn_dim={self.ffn_dim}, "
            f"activation={self.activation_name}, gated={self.gated}"
        )


def cmr_gate_values(
    h: torch.Tensor, gate: nn.Linear, dropout: float = 0.0, training: bool = False
) -> torch.Tensor:
    """The CMR mixing weight g per token (see the module doc), in fp32, then cast to h's dtype.

    Args:
        h: ... x C (the transformer layer passes T x B x C).
        gate: the CMR gate, C -> 1.
        dropout: dropout probability on g, applied in training only.
    Returns:
        ... x 1: ``sigmoid(gate(h))``, after dropout in training.
    """
    with torch.autocast(device_type=h.device.type, enabled=False):
        bias = None if gate.bias is None else gate.bias.float()
        g = torch.sigmoid(F.linear(h.float(), gate.weight.float(), bias))  # ... x 1
        if training and dropout > 0:
            g = F.dropout(g, dropout, training=True)
    return g.to(h.dtype)
