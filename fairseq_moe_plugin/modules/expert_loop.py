"""The per-expert loop: gather -> E two-layer FFNs on expert-contiguous slices -> weighted
combine, as one autograd Function with a hand-written backward.

Rows are flattened tokens throughout: ``N`` tokens, ``k`` choices per token, ``M`` kept
(token, choice) assignments sorted by expert, ``E`` experts, ``C`` = d_model, ``F`` = d_ff.
Weights are stacked in ``nn.Linear`` layout (``fc1_weight`` E x F x C, ``fc2_weight`` E x C x F).

Why not let autograd differentiate a loop over ``fc1_weight[e]``: the backward of ``weight[e]``
materialises a zero ``E x F x C`` gradient for every expert and autograd sums them, so the cost
grows with E^2 (30x the dense FFN at E=64 on CPU; ``scripts/benchmark_moe_layer.py`` times that
pattern as ``naive_loop``). Here:

- each expert's weight gradient is written straight into its slice of one stacked buffer, and on
  CPU that buffer can be reused across updates (``grad_buffers.py``);
- tokens reach the experts by one gather (``token_index``) and come back by gathers through the
  inverse map (``combine_index``, with a zero row for dropped choices), not by a zero-filled
  scatter-add; the input gradient takes the same way back;
- no M x C copy of the input (or of the output gradient) is made: each expert's rows are
  gathered into one reused buffer, in forward and again in backward from ``x``, which the router
  keeps alive anyway; likewise one buffer holds each expert's activation gradient in turn;
- the combine weights' gradient ``<dL/dy_t, expert_e(x_t)>`` uses the saved unweighted expert
  outputs (M x C), so nothing is divided by a weight that may be zero;
- experts that received no rows are skipped (their gradient slices are zeroed, not computed);
- the activation's backward is exact per activation, and activation dropout keeps a bool mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .activations import activate, activation_backward, dropout_scale
from .dispatch import DispatchPlan, combine, expert_slices
from .grad_buffers import GradientBuffers


class _ExpertRows:
    """Gathers one expert's rows at a time into a reused buffer (largest expert x C), so that
    no M x C copy of the input is made, in forward or backward."""

    def __init__(self, plan: DispatchPlan):
        self.index = plan.token_index
        self.largest = max(plan.tokens_per_expert, default=0)
        self.buffer: torch.Tensor | None = None  # allocated on first use

    def rows(self, source: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Rows start:end of the plan taken from ``source`` (N x C), in the reused buffer."""
        if self.buffer is None:
            self.buffer = source.new_empty(self.largest, source.shape[1])
        out = self.buffer[: end - start]
        return torch.index_select(source, 0, self.index[start:end], out=out)


def _grouped_forward(
    x: torch.Tensor,  # N x C
    plan: DispatchPlan,
    weight: torch.Tensor | None,  # N x k combine weights (0 where dropped); None: all ones
    fc1_weight: torch.Tensor,  # E x F x C
    fc1_bias: torch.Tensor,  # E x F
    fc2_weight: torch.Tensor,  # E x C x F
    fc2_bias: torch.Tensor,  # E x C
    activation: str,
    dropout_p: float,  # 0 outside training
    for_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The forward pass as plain tensor ops (what ``torch.jit`` tracing sees, e.g. fvcore).

    Returns:
        y (N x C), the unweighted expert outputs ((M+1) x C, the last row zero), and per
        non-empty expert what the activation's backward needs and the dropout keep masks (both
        empty unless ``for_backward``, so that inference keeps one expert's activations at a
        time).
    """
    rows = plan.num_rows
    out = x.new_empty(rows + 1, fc2_weight.shape[1])  # (M+1) x C, unweighted expert outputs
    out[rows].zero_()
    gather = _ExpertRows(plan)
    saved, masks = [], []
    scale = dropout_scale(dropout_p)
    for e, start, end in expert_slices(plan):
        xe = gather.rows(x, start, end)  # count x C, expert e's tokens
        z = torch.addmm(fc1_bias[e], xe, fc1_weight[e].t())  # count x F
        a, keep = activate(activation, z)
        if dropout_p > 0:
            mask = torch.empty_like(a, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            a = a * mask * scale
            if for_backward:
                masks.append(mask)
        if for_backward:
            saved.append(keep)
        torch.addmm(fc2_bias[e], a, fc2_weight[e].t(), out=out[start:end])  # count x C
    y = combine(out, plan.combine_index, weight)  # N x C
    return y, out, saved, masks


def _inference_forward(
    x: torch.Tensor,  # N x C
    plan: DispatchPlan,
    weight: torch.Tensor | None,  # N x k
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Inference (no autograd, no dropout) in as few ops as a loop over experts allows: one
    gather of the rows, four ops per expert that received rows (a slice and two ``F.linear``
    around the activation; the stacks are unbound once per call, not indexed per expert), one
    concatenation and the combine. A decoding step has a few rows for a few
    experts, where the fixed cost per op, not the FLOPs, decides (``fairseq-moe-count-ops``)."""
    rows = x.index_select(0, plan.token_index)  # M x C, sorted by expert
    w1, b1 = fc1_weight.unbind(0), fc1_bias.unbind(0)
    w2, b2 = fc2_weight.unbind(0), fc2_bias.unbind(0)
    outs = [
        F.linear(activate(activation, F.linear(rows[start:end], w1[e], b1[e]))[0], w2[e], b2[e])
        for e, start, end in expert_slices(plan)
    ]  # count x C each
    out = torch.cat([*outs, rows.new_zeros(1, x.shape[1])])  # (M+1) x C, row M zero (dropped)
    # Combined through the inverse map, in the order the training path and expert parallelism
    # sum a token's rows, so that every path gives the same bits.
    return combine(out, plan.combine_index, weight)  # N x C


class _GroupedExpertFFN(torch.autograd.Function):
    """y[t] = sum_j weight[t, j] * fc2_e(drop(act(fc1_e(x[t])))) over t's kept choices j."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        plan,
        activation,
        dropout_p,
        grad_buffers,
    ):
        y, out, saved, masks = _grouped_forward(
            x, plan, weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p
        )
        ctx.plan, ctx.activation, ctx.dropout_p = plan, activation, dropout_p
        ctx.grad_buffers = grad_buffers
        ctx.num_saved = len(saved)
        keep_out = weight is not None and ctx.needs_input_grad[1]
        out = out if keep_out else None
        ctx.save_for_backward(
            x, weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, *saved, *masks
        )
        return y  # N x C

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):  # grad_y: N x C
        x, weight, w1, b1, w2, b2, out, *rest = ctx.saved_tensors
        saved, masks = rest[: ctx.num_saved], rest[ctx.num_saved :]
        plan: DispatchPlan = ctx.plan
        need_x, need_weight, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        rows = plan.num_rows
        grad_y = grad_y.contiguous()
        # Combine weights in expert order, and their gradient dL/dw[t, j] = <dL/dy_t, out_tj>.
        sorted_weight = None if weight is None else weight.reshape(-1)[plan.order]  # M
        grad_sorted_weight = weight.new_empty(rows) if need_weight else None  # M
        # Every slice of a weight gradient is written below, or zeroed if its expert got no rows.
        buffers = ctx.grad_buffers if ctx.grad_buffers is not None else GradientBuffers(False)
        dw1 = buffers.empty_like("fc1_weight", w1) if need_w1 else None
        db1 = torch.empty_like(b1) if need_b1 else None
        dw2 = buffers.empty_like("fc2_weight", w2) if need_w2 else None
        db2 = torch.empty_like(b2) if need_b2 else None
        for e, count in enumerate(plan.tokens_per_expert):
            if count == 0:
                for grad in (dw1, db1, dw2, db2):
                    if grad is not None:
                        grad[e].zero_()
        dxs = x.new_empty(rows + 1, x.shape[1]) if need_x else None  # (M+1) x C
        grads_out, inputs = _ExpertRows(plan), _ExpertRows(plan)
        largest = max(plan.tokens_per_expert, default=0)
        da_buffer = grad_y.new_empty(largest, w2.shape[2])  # largest expert x F
        scale = dropout_scale(ctx.dropout_p)
        for i, (e, start, end) in enumerate(expert_slices(plan)):
            ge = grads_out.rows(grad_y, start, end)  # count x C, dL/d(combined output)
            if need_weight:
                torch.linalg.vecdot(ge, out[start:end], out=grad_sorted_weight[start:end])
            if sorted_weight is not None:  # (weights come with a gathered, writable ge)
                ge = ge.mul_(sorted_weight[start:end].unsqueeze(1))  # dL/d(expert output)
            da = torch.mm(ge, w2[e], out=da_buffer[: end - start])  # count x F
            if ctx.dropout_p > 0:
                da = da.mul_(masks[i]).mul_(scale)
            a, dz = activation_backward(ctx.activation, saved[i], da)  # count x F each
            if need_w2:
                if ctx.dropout_p > 0:
                    a = a * masks[i] * scale
                torch.mm(ge.t(), a, out=dw2[e])  # C x F
            if need_b2:
                torch.sum(ge, dim=0, out=db2[e])
            if need_w1:
                torch.mm(dz.t(), inputs.rows(x, start, end), out=dw1[e])  # F x C
            if need_b1:
                torch.sum(dz, dim=0, out=db1[e])
            if need_x:
                torch.mm(dz, w1[e], out=dxs[start:end])  # count x C
        grad_weight = None
        if need_weight:
            grad_weight = weight.new_zeros(weight.numel())
            grad_weight[plan.order] = grad_sorted_weight
            grad_weight = grad_weight.view_as(weight)
        grad_x = None
        if need_x:
            dxs[rows].zero_()
            grad_x = combine(dxs, plan.combine_index, None)  # N x C
        return grad_x, grad_weight, dw1, db1, dw2, db2, None, None, None, None


def grouped_expert_ffn(
    x: torch.Tensor,
    plan: DispatchPlan,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    activation: str = "relu",
    weight: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    grad_buffers: GradientBuffers | None = None,
) -> torch.Tensor:
    """Run E stacked FFN experts on the assignments of ``plan`` and combine them per token.

    Args:
        x: N x C tokens.
        plan: the assignments, sorted by expert (``DispatchPlan``).
        fc1_weight, fc1_bias, fc2_weight, fc2_bias: E x F x C, E x F, E x C x F, E x C.
        activation: a name from ``experts.get_activation_fn``.
        weight: N x k combine weights (None: 1).
        dropout_p: activation dropout probability (pass 0 outside training).
        grad_buffers: where backward takes the weight-gradient buffers (``fc1_weight`` and
            ``fc2_weight``) from; None allocates fresh ones.
    Returns:
        N x C: row t is ``sum_j weight[t, j] * expert(x[t])`` over t's kept choices j (zero for a
        token with none).
    """
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    tensors = (x, weight, *params)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # Inference, and tracers (fvcore's FLOP count), which must see the matrix products.
    if torch.jit.is_tracing() or (not needs_grad and dropout_p > 0):
        with torch.no_grad():
            return _grouped_forward(
                x, plan, weight, *params, activation, dropout_p, for_backward=False
            )[0]
    if not needs_grad:
        with torch.no_grad():
            return _inference_forward(x, plan, weight, *params, activation)
    return _GroupedExpertFFN.apply(*tensors, plan, activation, dropout_p, grad_buffers)
