"""The sparse MoE feed-forward layer: gate -> dispatch -> experts -> combine.

Dispatch is sort-based (as MegaBlocks and Tutel's dropless path do): the (token, expert)
assignments that survive capacity are sorted by expert (``DispatchPlan``), each expert runs on its
contiguous slice, and each token sums its weighted outputs (``dispatch.py``). No one-hot
``tokens x experts x capacity`` tensor is ever built, so memory grows with the number of
assignments, not with T*E*C.

Beside the routed experts the layer may hold shared experts (``shared_experts.py``; DeepSeekMoE,
Dai et al. 2024, eq. 9: ``y = sum_shared FFN(x) + sum_routed g FFN(x)``) and apply expert output
masking to the routed part in training (EOM, NLLB Team 2022, "No Language Left Behind", sec. 6.2:
each token's routed output is zeroed with probability p, the kept ones scaled by 1/(1-p), as
dropout of whole tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .compiled_experts import compiled_experts_call, register_experts
from .dispatch import DispatchPlan
from .expert_parallel import expert_parallel_ffn
from .expert_protocol import Experts
from .gate import TopKGate
from .record import MoERecord
from .shared_experts import SharedExperts


class MoELayer(nn.Module):
    """A top-k MoE FFN: ``y = m * sum_{j<k} w_j * expert_{e_j}(x) + shared(x)`` per token, zero
    for padding; dropped assignments add nothing; ``m`` is the EOM mask (1 outside training).

    Args:
        gate: the router.
        experts: the routed experts, any kind of ``expert_kinds.EXPERT_KINDS``
            (``experts.num_experts == gate.num_experts``).
        name: the name put in this layer's routing records.
        shared: shared experts every token passes through (``--moe-shared-experts``), or None
            (no module: the state dict and the output are the plain MoE layer's).
        eom: expert output masking probability p in [0, 1) (``--moe-eom``): in training each
            token's routed output is zeroed with probability p and the kept ones are scaled by
            1/(1-p); the shared experts are not masked. No random draw at p = 0 or in eval.
    """

    def __init__(
        self,
        gate: TopKGate,
        experts: Experts,
        name: str = "moe",
        shared: SharedExperts | None = None,
        eom: float = 0.0,
        compile: bool = False,
    ):
        super().__init__()
        if gate.num_experts != experts.num_experts:
            raise ValueError(
                f"gate has {gate.num_experts} experts but experts has {experts.num_experts}"
            )
        if not 0.0 <= eom < 1.0:
            raise ValueError(f"expert output masking (--moe-eom) must be in [0, 1), got {eom}")
        self.gate = gate
        self.experts = experts
        self.name = name
        self.shared = shared  # a submodule only when present: else the state dict is unchanged
        self.eom = eom
        self.compile = compile
        # ``--moe-compile``: the whole forward as one graph, the experts behind an operator
        # (``compiled_experts.py``); built on first use (nothing to compile for a layer never run).
        self._compiled = None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoERecord]:
        """The layer; with ``compile``, ``torch.compile(fullgraph=True, dynamic=True)`` of it."""
        if not self.compile or torch.compiler.is_compiling():
            if self.compile:
                self._experts_key = register_experts(self.experts)
            return self._forward(x, padding_mask, via_operator=self.compile)
        if self._compiled is None:
            self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=True)
        self._experts_key = register_experts(self.experts)  # read in the graph as a constant
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return self._compiled(x, padding_mask, via_operator=True)

    def _forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, via_operator: bool
    ) -> tuple[torch.Tensor, MoERecord]:
        """
        Args:
            x: ... x C, any leading shape (fairseq passes T x B x C).
            padding_mask: the leading shape of x (e.g. T x B), True at padding; or None.
        Returns:
            y with the shape of x, and the layer's routing record.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T*B) x C, flattened tokens
        if padding_mask is not None:
            if padding_mask.shape != shape[:-1]:
                raise ValueError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, "
                    f"expected {tuple(shape[:-1])}"
                )
            token_index = (~padding_mask.reshape(-1)).nonzero().squeeze(1)  # N
            tokens = x.index_select(0, token_index)  # N x C, padding removed
        else:
            token_index = None
            tokens = x

        gate_out = self.gate(tokens)  # N x k experts and weights, fp32
        groups = self.experts.expert_parallel
        if via_operator:  # the experts as one operator (compiled_experts.py): no graph break
            y_tokens, offsets = compiled_experts_call(
                self.experts,
                self._experts_key,
                tokens,
                gate_out.expert_weight,
                gate_out.expert_index,
                gate_out.kept,
            )  # N x C, E
        else:
            plan = DispatchPlan.from_routing(gate_out.expert_index, gate_out.kept, self.num_experts)
            offsets = plan.offsets
            if groups is None:
                y_tokens = self.experts(tokens, plan, gate_out.expert_weight)  # N x C
            else:  # the experts are sharded over ranks: tokens travel to them and back
                y_tokens = expert_parallel_ffn(
                    tokens, plan, gate_out.expert_weight, self.experts, groups
                )
        if self.training and self.eom > 0:
            y_tokens = expert_output_mask(y_tokens, self.eom)
        if self.shared is not None:
            y_tokens = y_tokens + self.shared(tokens).to(y_tokens.dtype)  # N x C

        if token_index is not None:
            y = y_tokens.new_zeros(x.shape).index_copy(0, token_index, y_tokens)
        else:
            y = y_tokens
        record = MoERecord(
            layer=self.name,
            routing=gate_out,
            expert_offsets=offsets,
            token_index=token_index,
            input_shape=tuple(shape[:-1]),
        )
        return y.view(shape), record

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + (f", eom={self.eom}" if self.eom > 0 else "")


def expert_output_mask(y: torch.Tensor, p: float) -> torch.Tensor:
    """EOM (NLLB Team 2022, sec. 6.2): each row (token) of y (N x C) zeroed with probability
    p, the kept rows scaled by 1/(1-p), so the expected output is unchanged."""
    keep = torch.empty(y.shape[0], 1, device=y.device, dtype=y.dtype).bernoulli_(1.0 - p)
    return y * keep / (1.0 - p)  # N x C
