"""Naive, loop-based reference implementations of the MoE routing and layer, for the tests.

Everything here is written for clarity, not speed: Python loops over tokens and assignments, so
that it shares no vectorised code path (sorting, scatter, bincount) with the modules under test.
"""

from __future__ import annotations

import torch

from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.routing import GateOutput


def naive_keep_mask(
    expert_index: torch.Tensor, expert_prob: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """The documented capacity policy, one expert at a time.

    Each expert ranks its assignments by (choice rank, -probability, token index) and keeps the
    first ``capacity``.

    Args:
        expert_index: N x k chosen experts (column j = every token's (j+1)-th choice).
        expert_prob: N x k their probabilities.
    Returns:
        N x k bool keep mask.
    """
    num_tokens, k = expert_index.shape
    expert_prob = expert_prob.detach()
    keep = torch.zeros(num_tokens, k, dtype=torch.bool)  # N x k
    for e in range(num_experts):
        assignments = [
            (j, -float(expert_prob[t, j]), t)
            for t in range(num_tokens)
            for j in range(k)
            if int(expert_index[t, j]) == e
        ]
        for j, _, t in sorted(assignments)[:capacity]:
            keep[t, j] = True
    return keep


def naive_combine_weights(
    probs: torch.Tensor, expert_index: torch.Tensor, keep: torch.Tensor, normalize_top_k: bool
) -> torch.Tensor:
    """w_j = p_{e_j} (or p_{e_j} / sum_i p_{e_i} over the k choices), zeroed where dropped.

    Args:
        probs: N x E softmax probabilities.
        expert_index: N x k chosen experts.
        keep: N x k bool.
    Returns:
        N x k combine weights (differentiable w.r.t. probs).
    """
    num_tokens, k = expert_index.shape
    rows: list[torch.Tensor] = []
    for t in range(num_tokens):
        chosen = [probs[t, int(expert_index[t, j])] for j in range(k)]
        total = sum(chosen)
        row = []
        for j in range(k):
            w = chosen[j] / total if normalize_top_k else chosen[j]
            row.append(w if bool(keep[t, j]) else w * 0.0)
        rows.append(torch.stack(row))
    if not rows:
        return probs.new_zeros(0, k)
    return torch.stack(rows)  # N x k


def naive_moe(
    experts: StackedExperts,
    x: torch.Tensor,
    gate_out: GateOutput,
    normalize_top_k: bool,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loop: y_t = sum_{j kept} w_j * expert_{e_j}(x_t).

    Args:
        experts: the stacked experts (``expert_forward`` is used, one token at a time).
        x: N x C non-padding tokens.
        gate_out: the gate's decisions for x; ``probs``, ``expert_index`` and ``keep`` are used
            (the combine weights are recomputed from ``probs``).
        keep: N x k keep mask to use instead of ``gate_out.keep``.
    Returns:
        N x C.
    """
    keep = gate_out.keep if keep is None else keep
    weights = naive_combine_weights(gate_out.probs, gate_out.expert_index, keep, normalize_top_k)
    num_tokens, k = gate_out.expert_index.shape
    outputs = []
    for t in range(num_tokens):
        y_t = x.new_zeros(x.shape[-1])  # C
        for j in range(k):
            if not bool(keep[t, j]):
                continue
            e = int(gate_out.expert_index[t, j])
            out = experts.expert_forward(e, x[t : t + 1])[0]  # C
            y_t = y_t + weights[t, j].to(out.dtype) * out
        outputs.append(y_t)
    if not outputs:
        return x.new_zeros(0, x.shape[-1])
    return torch.stack(outputs)  # N x C
