"""A toy routing method, added in one file: the worked example of ``docs/contributing/extending.md``.

``SampledTopK`` samples each token's k experts from its router distribution in training
(without replacement, by the Gumbel-top-k trick: Kool et al. 2019, "Stochastic Beams and Where
to Find Them", sec. 2), which explores experts the router does not yet favour, and picks the k
most probable ones in eval mode, so that inference is what top-k computes. It is a
token-choice method: capacity, the balance losses, FLOPs, ONNX export (eval is top-k) and the
routing analysis handle it through what it declares, with no other change.

To make it a ``--moe-routing`` choice, add one line to the registry in
``fairseq_moe_plugin/modules/routing/__init__.py``::

    from .sampled_topk import SampledTopK   # after moving this file into modules/routing/
    ... SampledTopK(), ...                  # in ROUTING_METHODS

``tests/modules/test_extending_example.py`` registers it for the duration of a test instead.
"""

from __future__ import annotations

import torch

from fairseq_moe_plugin.modules.routing.base import RoutingMethod
from fairseq_moe_plugin.modules.routing.capacity import capacity_keep_mask, expert_capacity
from fairseq_moe_plugin.modules.routing.output import GateOutput, RoutingMode


class SampledTopK(RoutingMethod):
    name = "sampled_topk"
    label = "sampled top-k"
    mode = RoutingMode.TOKEN_CHOICE  # expert_index is N x k, keep marks what capacity kept
    has_capacity = True  # --moe-capacity-factor applies

    def route(self, gate, logits, probs, finite_rows) -> GateOutput:
        num_tokens = probs.shape[0]
        if gate.training:  # Gumbel-top-k: k experts sampled without replacement from probs
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
            index = torch.topk(logits + gumbel, gate.k, dim=-1).indices  # N x k
        else:
            index = torch.topk(probs, gate.k, dim=-1).indices  # N x k, best first
        prob = probs.gather(1, index)  # N x k
        factor = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        capacity = expert_capacity(num_tokens, gate.num_experts, gate.k, factor)
        keep = capacity_keep_mask(index, prob.detach(), gate.num_experts, capacity)  # N x k
        weight = prob / prob.sum(-1, keepdim=True) if gate.normalize_top_k else prob
        return GateOutput(
            logits=logits,
            probs=probs,
            expert_index=index,
            expert_weight=weight * keep.to(weight.dtype),
            kept=keep,
            capacity=capacity,
            balance_type=gate.balance_type,
            mode=self.mode,
            finite_rows=finite_rows,
        )
