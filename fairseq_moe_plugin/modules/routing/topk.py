"""Top-k token-choice routing: each token picks its k most probable experts (Shazeer et al.
2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021, with k = 1), under the capacity
policy of ``capacity.py``; an optional selection bias (``balancing.BiasBalancing``) steers the
choice without weighing the outputs."""

from __future__ import annotations

import torch

from .base import RoutingMethod
from .capacity import capacity_keep_mask, expert_capacity, random_keep_mask
from .output import GateOutput, RoutingMode


class TopK(RoutingMethod):
    name = "topk"
    label = "top-k"
    mode = RoutingMode.TOKEN_CHOICE
    has_capacity = True
    bias_balancing = True

    def route(self, gate, logits, probs, finite_rows) -> GateOutput:
        num_tokens = probs.shape[0]
        bias = gate.selection_bias()  # E, or None without bias balancing
        if bias is not None:  # the bias picks the experts, never weighs them
            top_index = torch.topk(logits + bias, gate.k, dim=-1).indices  # N x k, best first
            top_prob = probs.gather(1, top_index)  # N x k, unbiased
        else:
            top_prob, top_index = torch.topk(probs, gate.k, dim=-1)  # N x k, best first
        factor = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        capacity = expert_capacity(num_tokens, gate.num_experts, gate.k, factor)
        if capacity >= num_tokens:  # an expert gets at most one assignment per token
            keep = None  # every assignment is kept
        elif gate.training and gate.capacity_priority == "random":
            keep = random_keep_mask(top_index, gate.num_experts, capacity)
        else:
            keep = capacity_keep_mask(top_index, top_prob, gate.num_experts, capacity)
        weight = top_prob
        if gate.normalize_top_k:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        if capacity < num_tokens:  # capacity can bind: dropped choices weigh 0
            weight = weight * keep.to(weight.dtype)
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=top_index,
            expert_weight=weight,
            kept=keep,
            capacity=capacity,
            balance_type=gate.balance_type,
            mode=self.mode,
            finite_rows=finite_rows,
        )
