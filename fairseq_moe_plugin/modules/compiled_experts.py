"""The routed experts as one opaque torch operator, so that ``torch.compile`` traces the whole MoE
layer (router, top-k, capacity, record) as one graph (``--moe-compile``).

The experts' eager paths read the tokens per expert on the host (a loop over experts) or call a
grouped GEMM whose fake (meta) kernel in torch 2.13 accepts bf16 only, so dynamo cannot trace
them without a graph break. ``fairseq_moe::routed_ffn`` wraps them as a custom operator
(``torch.library.custom_op``): the compiler sees one call with a known output shape (N x C, and
the E int32 end rows of each expert's assignments), whatever the routing, so a new routing never
recompiles; inside, the eager experts run unchanged (the same path ``--moe-expert-impl`` picks
without compile), so outputs equal eager ones.

Backward (``register_autograd``) recomputes the experts' forward under autograd from the saved
inputs and differentiates it: the gradients are those of the eager path, at the cost of one more
expert forward (as activation checkpointing pays). With activation dropout the forward returns
the RNG state it started from, and the recomputation replays it, so the masks are the same.

What this adds to ``torch.compile`` itself: the MoE dispatch, whose shapes depend on the data,
behind a boundary with static shapes.
"""

from __future__ import annotations

import weakref

import torch

from .dispatch import DispatchPlan


def _device_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# The eager experts modules the operator calls, by id: custom operators take tensors and plain
# values, not modules; ``CompiledExperts`` registers its experts here when it is built.
_EXPERTS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()


def _run(experts_id: int, x, weight, expert_index, kept, training: bool) -> tuple:
    experts = _EXPERTS[experts_id]
    plan = DispatchPlan.from_routing(expert_index, kept, experts.num_experts)
    was_training = experts.training
    experts.train(training)
    try:
        y = experts(x, plan, weight)  # N x C
    finally:
        experts.train(was_training)
    return y, plan.offsets


@torch.library.custom_op("fairseq_moe::routed_ffn", mutates_args=())
def routed_ffn(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_index: torch.Tensor,
    kept: torch.Tensor | None,
    params: list[torch.Tensor],
    experts_id: int,
    training: bool,
    dropout: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y N x C, the E int32 end rows of each expert's assignments, the RNG state the experts
    started from, empty without dropout). ``params`` are the experts' parameters, passed so that
    autograd sees them; the module reads its own (the same tensors)."""
    state = _device_rng_state(x.device) if dropout else torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        y, offsets = _run(experts_id, x, weight, expert_index, kept, training)
    return y, offsets.clone(), state.clone()


@routed_ffn.register_fake
def _(x, weight, expert_index, kept, params, experts_id, training, dropout):
    experts = _EXPERTS[experts_id]
    size = _device_rng_state(x.device).numel() if dropout else 0
    return (
        x.new_empty(x.shape),
        expert_index.new_empty(experts.num_experts, dtype=torch.int32),
        torch.empty(size, dtype=torch.uint8),
    )


def _setup_context(ctx, inputs, output):
    x, weight, expert_index, kept, params, experts_id, training, dropout = inputs
    ctx.save_for_backward(x, weight, expert_index, *(() if kept is None else (kept,)), *params)
    ctx.has_kept, ctx.num_params = kept is not None, len(params)
    ctx.experts_id, ctx.training = experts_id, training
    ctx.rng_state = output[2]


@torch.library.custom_op("fairseq_moe::routed_ffn_grad", mutates_args=())
def routed_ffn_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_index: torch.Tensor,
    kept: torch.Tensor | None,
    params: list[torch.Tensor],
    experts_id: int,
    training: bool,
    rng_state: torch.Tensor,
) -> list[torch.Tensor]:
    """[dL/dx, dL/dweight, dL/dparam for each of ``params``]: the eager experts' forward run
    again under autograd (the RNG replayed from ``rng_state`` when not empty) and
    differentiated; an operator too, so that the compiled backward has no graph break."""
    experts = _EXPERTS[experts_id]
    inputs = [x.detach().requires_grad_(True), weight.detach().requires_grad_(True)]
    dropout = rng_state.numel() > 0
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.enable_grad(), torch.random.fork_rng(devices=devices, enabled=dropout):
        if dropout:
            _set_device_rng_state(x.device, rng_state)
        y, _ = _run(experts_id, inputs[0], inputs[1], expert_index, kept, training)
        own = list(experts.parameters())
        grads = torch.autograd.grad(y, [*inputs, *own], grad_y, allow_unused=True)
    targets = [x, weight, *params]
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads, strict=True)]


@routed_ffn_grad.register_fake
def _(grad_y, x, weight, expert_index, kept, params, experts_id, training, rng_state):
    return [torch.empty_like(t) for t in (x, weight, *params)]


def _backward(ctx, grad_y, grad_offsets, grad_state):
    saved = list(ctx.saved_tensors)
    x, weight, expert_index = saved[:3]
    kept = saved[3] if ctx.has_kept else None
    params = saved[3 + ctx.has_kept :]
    grads = routed_ffn_grad(
        grad_y, x, weight, expert_index, kept, params, ctx.experts_id, ctx.training,
        ctx.rng_state,
    )  # fmt: skip
    return grads[0], grads[1], None, None, grads[2:], None, None, None


routed_ffn.register_autograd(_backward, setup_context=_setup_context)


def register_experts(experts: torch.nn.Module) -> int:
    """The key the operator finds ``experts`` by (call it outside the compiled region; the
    registry holds the module weakly)."""
    key = id(experts)
    if _EXPERTS.get(key) is not experts:
        _EXPERTS[key] = experts
    return key


def compiled_experts_call(experts, key: int, x, weight, expert_index, kept):
    """The experts (registered under ``key``) on the routing ``expert_index`` (N x k) /
    ``kept`` (N x k bool or None) through the operator: (y N x C, the E int32 end rows of each
    expert's assignments)."""
    dropout = experts.training and getattr(experts, "activation_dropout", 0.0) > 0
    params = list(experts.parameters())
    y, offsets, _ = routed_ffn(
        x, weight, expert_index, kept, params, key, experts.training, dropout
    )
    return y, offsets
