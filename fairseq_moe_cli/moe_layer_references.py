"""Reference MoE FFN implementations that ``benchmark_moe_layer.py`` times against the product's
``MoELayer``. They are baselines, not product code: each reproduces a public implementation's
pattern, computes the same function as ``MoELayer`` (``tests/test_benchmark_moe_layer.py``
checks that), and takes its weights from the product layer so all run on identical parameters.

Tokens are flattened, ``T x C`` (T tokens, C = d_model); F = d_ff; E experts; k experts per token.

- ``DenseFFN``: the limit. One FFN of hidden size ``k * F`` does the same active FLOPs as top-k of
  E experts of size F, with the same activation, and no routing at all.
- ``NaiveLoopMoE``: the per-expert loop of HF Transformers' Mixtral/Qwen-MoE blocks: one-hot
  expert mask, ``torch.where`` per hit expert, run it on its tokens, ``index_add_`` back. With
  ``per_expert_modules=False`` it indexes the stacked weights per expert (``weight[e]``, as HF's
  current stacked-expert code does); with True it holds one ``nn.Linear`` pair per expert (as
  HF's older ``nn.ModuleList`` experts do).
- ``EinsumMoE``: GShard's one-hot dispatch/combine (Lepikhin et al., 2020, "GShard: Scaling Giant
  Models with Conditional Computation and Automatic Sharding", Algorithm 1 and the top-2 gating
  of its appendix), with one group: a ``T x E x C`` combine tensor built from cumulative-sum
  positions, ``einsum("sec,sm->ecm")`` to dispatch, batched expert matmuls, and
  ``einsum("sec,ecm->sm")`` to combine. It is the pattern of fairseq's moe/nllb branches.
- ``GroupedMMMoE``: dropless sort-based dispatch on torch's grouped GEMM
  (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` in older torch), the pattern of
  torchtitan's dropless MoE: the T*k assignments sorted by expert (stable), the tokens gathered
  once, one grouped GEMM per FFN layer over the experts' contiguous slices (``offs`` = cumulative
  counts), the biases repeated per row, then weighted and ``index_add_``-ed back. Autograd differentiates everything (grouped_mm has a backward). It
  needs the rows' byte strides (``C`` and ``F`` times the element size) to be multiples of 16;
  ``grouped_mm_skip_reason`` says when it cannot run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_moe_plugin.modules.experts import get_activation_fn
from fairseq_moe_plugin.modules.moe_layer import MoELayer


def _route(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product gate's top-k decision without capacity: (T x k experts, T x k weights)."""
    gate = layer.gate
    logits = F.linear(x.float(), gate.wg.weight.float())  # T x E, fp32 as the product's gate
    probs = torch.softmax(logits, dim=-1)
    weight, index = torch.topk(probs, gate.k, dim=-1)  # T x k each, best first
    if gate.normalize_top_k:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return index, weight


class DenseFFN(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden size ``hidden``: the FLOP-matched dense limit."""

    def __init__(self, d_model: int, hidden: int, activation: str = "relu"):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.activation_fn = get_activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # T x C -> T x C
        return self.fc2(self.activation_fn(self.fc1(x)))


class NaiveLoopMoE(nn.Module):
    """HF Mixtral's eager expert loop over the product layer's router and expert weights."""

    def __init__(self, layer: MoELayer, per_expert_modules: bool = False):
        super().__init__()
        self.layer = layer  # shares the router (and, if not per_expert_modules, the experts)
        experts = layer.experts
        self.activation_fn = experts.activation_fn
        self.per_expert_modules = per_expert_modules
        if per_expert_modules:
            self.expert_modules = nn.ModuleList()
            for e in range(experts.num_experts):
                fc1 = nn.Linear(experts.d_model, experts.d_ff)
                fc2 = nn.Linear(experts.d_ff, experts.d_model)
                with torch.no_grad():
                    fc1.weight.copy_(experts.fc1_weight[e])
                    fc1.bias.copy_(experts.fc1_bias[e])
                    fc2.weight.copy_(experts.fc2_weight[e])
                    fc2.bias.copy_(experts.fc2_bias[e])
                self.expert_modules.append(nn.Sequential(fc1, fc2))
            self.expert_modules.to(experts.fc1_weight.dtype)

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.per_expert_modules:
            fc1, fc2 = self.expert_modules[e]
            return fc2(self.activation_fn(fc1(h)))
        ex = self.layer.experts
        h = self.activation_fn(F.linear(h, ex.fc1_weight[e], ex.fc1_bias[e]))
        return F.linear(h, ex.fc2_weight[e], ex.fc2_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # T x C -> T x C
        index, weight = _route(self.layer, x)  # T x k each
        out = x.new_zeros(x.shape)  # T x C
        num_experts = self.layer.num_experts
        expert_mask = F.one_hot(index, num_experts).permute(2, 1, 0)  # E x k x T
        hit = (expert_mask.sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        for e in hit:
            rank, token = torch.where(expert_mask[e])  # the tokens routed to e, and as which choice
            y = self._expert(e, x[token]) * weight[token, rank, None].to(x.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out


class EinsumMoE(nn.Module):
    """GShard one-hot dispatch/combine with capacity ``ceil(capacity_factor * k * T / E)``.

    Assignments are placed rank by rank (every first choice before any second choice), each
    expert's slots filled in token order, as GShard's top-2 gating does; those past capacity are
    dropped. With a capacity of at least T it drops nothing and equals the dropless product layer.
    """

    def __init__(self, layer: MoELayer, capacity_factor: float = 1.0):
        super().__init__()
        self.layer = layer
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        gate = self.layer.gate
        if self.capacity_factor <= 0:
            return num_tokens
        return int(math.ceil(self.capacity_factor * gate.k * num_tokens / gate.num_experts))

    def combine_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T x E x C combine weights, T x E x C dispatch mask in x's dtype)."""
        num_tokens, num_experts = x.shape[0], self.layer.num_experts
        capacity = self.capacity(num_tokens)
        index, weight = _route(self.layer, x)  # T x k
        combine = x.new_zeros(num_tokens, num_experts, capacity, dtype=torch.float32)
        dispatch = x.new_zeros(num_tokens, num_experts, capacity)
        filled = x.new_zeros(num_experts, dtype=torch.long)  # slots taken by earlier ranks
        for j in range(index.shape[1]):
            mask = F.one_hot(index[:, j], num_experts)  # T x E
            location = torch.cumsum(mask, dim=0) - 1 + filled  # T x E, slot in the expert
            mask = mask * (location < capacity)  # drop past capacity
            filled = filled + mask.sum(dim=0)
            slot = (location * mask).sum(dim=1)  # T
            slot_onehot = F.one_hot(slot, capacity).float()  # T x C
            sec = mask.float().unsqueeze(2) * slot_onehot.unsqueeze(1)  # T x E x C, 0/1
            combine = combine + weight[:, j, None, None] * sec
            dispatch = dispatch + sec.to(dispatch.dtype)
        return combine, dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # T x C -> T x C
        ex = self.layer.experts
        combine, dispatch = self.combine_weights(x)  # T x E x C each
        expert_in = torch.einsum("sec,sm->ecm", dispatch, x)  # E x C x M
        h = torch.einsum("ecm,efm->ecf", expert_in, ex.fc1_weight) + ex.fc1_bias.unsqueeze(1)
        h = ex.activation_fn(h)  # E x C x F
        expert_out = torch.einsum("ecf,emf->ecm", h, ex.fc2_weight) + ex.fc2_bias.unsqueeze(1)
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), expert_out)  # T x M


def grouped_mm_function():
    """``torch.nn.functional.grouped_mm``, else ``torch._grouped_mm`` (older torch), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_skip_reason(d_model: int, d_ff: int, dtype: torch.dtype) -> str | None:
    """Why ``GroupedMMMoE`` cannot run with these sizes in this torch, or None if it can."""
    if grouped_mm_function() is None:
        return (
            f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm "
            "nor torch._grouped_mm"
        )
    item = torch.finfo(dtype).bits // 8
    if (d_model * item) % 16 or (d_ff * item) % 16:
        return (
            f"grouped_mm needs row strides in multiples of 16 bytes; d_model {d_model} and "
            f"d_ff {d_ff} in {str(dtype).replace('torch.', '')} are not"
        )
    return None


class GroupedMMMoE(nn.Module):
    """Dropless sort-based dispatch with grouped GEMMs over the product layer's router and
    stacked experts (see the module doc)."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer  # shares the router and the stacked experts
        self.grouped_mm = grouped_mm_function()
        if self.grouped_mm is None:
            raise RuntimeError(grouped_mm_skip_reason(1, 1, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # T x C -> T x C
        ex = self.layer.experts
        index, weight = _route(self.layer, x)  # T x k each
        k = index.shape[1]
        expert_sorted, order = torch.sort(index.reshape(-1), stable=True)  # M = T*k, by expert
        counts = torch.bincount(expert_sorted, minlength=self.layer.num_experts)  # E
        offs = torch.cumsum(counts, 0).to(torch.int32)  # E, end of each expert's rows
        rows = order.numel()  # M
        token = torch.div(order, k, rounding_mode="floor")  # M, the token of each row
        xs = x.index_select(0, token)  # M x C, grouped by expert
        h = self.grouped_mm(xs, ex.fc1_weight.transpose(1, 2), offs=offs)  # M x F
        h = ex.activation_fn(h + ex.fc1_bias.repeat_interleave(counts, 0, output_size=rows))
        o = self.grouped_mm(h, ex.fc2_weight.transpose(1, 2), offs=offs)  # M x C
        o = o + ex.fc2_bias.repeat_interleave(counts, 0, output_size=rows)
        o = o * weight.reshape(-1)[order, None].to(o.dtype)  # M x C, weighted
        return x.new_zeros(x.shape).index_add_(0, token, o)  # T x C


def einsum_peak_bytes_estimate(
    num_tokens: int, num_experts: int, k: int, capacity_factor: float, dtype_bytes: int
) -> int:
    """A lower estimate of ``EinsumMoE``'s forward+backward memory in its T x E x C tensors:
    the combine weights (fp32), their gradient and the next rank's partial sum, the dispatch
    mask, and one fp32 slot tensor (the expert activations come on top)."""
    if capacity_factor <= 0:
        capacity = num_tokens
    else:
        capacity = math.ceil(capacity_factor * k * num_tokens / num_experts)
    elements = num_tokens * num_experts * capacity
    return elements * (4 * 4 + dtype_bytes)
