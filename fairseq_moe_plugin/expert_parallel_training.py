"""What fairseq's trainer and optimizers do for sharded experts (``--moe-expert-parallel-size``
P > 1), applied when the plugin is imported; nothing changes while no model holds sharded
experts. Expert shards carry ``p.expert = True`` (fairseq's marker, which its fp16 optimizers copy
to their fp32 parameters); the layout comes from ``modules/expert_parallel.py``.

- **Gradients.** Data-parallel all-reduce leaves expert shards out (``legacy_ddp`` skips
  ``.expert`` parameters; ``c10d``/``pytorch_ddp`` is told to ignore them when the model is built).
  An expert's gradient on its rank already sums every token of its expert-parallel group (the
  all-to-all's backward brings them there); ``reduce_expert_grads`` sums it over the replica group
  and divides by W, the data-parallel world size, which is the average every other gradient gets
  from DDP. fairseq's later ``multiply_grads(W / sample_size)`` then gives every parameter
  ``sum of gradients / sample_size``, as one process would.
- **Gradient norm.** fairseq's ``clip_grad_norm_`` leaves ``.expert`` gradients out of the norm.
  Here the norm is ``sqrt(|dense|^2 + sum over the expert-parallel group of |shard|^2)``: every
  expert counted once, the same value on every worker (fairseq's cross-worker check compares it),
  and clipping scales every gradient by it.
- **Checkpoints.** The model's state dict gathers the expert shards into full stacks
  (``StackedExperts``); the optimizer's state dict does the same for the expert entries of its
  state (Adam's moments, ...), and its ``load_state_dict`` keeps this rank's rows of a full stack.
  fairseq calls ``Trainer.state_dict`` on the saving rank only; with sharded experts every rank
  calls it (``always_call_state_dict_during_save_checkpoint``), since the gathers are collective.
  So a checkpoint is one consolidated file, whatever W and P, loadable by any other layout and by
  one process with no tool.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .modules.expert_parallel import active_expert_parallel_groups, gathers_expert_state


def _is_shard(p) -> bool:
    return getattr(p, "expert", False) is True


def reduce_expert_grads(module) -> None:
    """Sum every expert shard's gradient over its replica group and divide by W."""
    groups = active_expert_parallel_groups()
    if groups is None:
        return
    for p in module.parameters():
        if _is_shard(p):
            if p.grad is None:  # every rank takes part in every reduction
                p.grad = torch.zeros_like(p)
            if groups.num_replicas > 1:
                dist.all_reduce(p.grad, group=groups.replica_group)
            p.grad.div_(groups.world_size)


def grad_norm_with_shards(params, max_norm: float) -> torch.Tensor:
    """The module doc's gradient norm over ``params``, and clipping to ``max_norm`` (> 0)."""
    groups = active_expert_parallel_groups()
    grads = [p.grad for p in params if p.grad is not None]
    dense = [p.grad for p in params if p.grad is not None and not _is_shard(p)]
    shards = [p.grad for p in params if p.grad is not None and _is_shard(p)]
    device = grads[0].device if grads else torch.device("cpu")

    def squares(tensors):
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in tensors:
            total += torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
        return total

    shard_squares = squares(shards)
    dist.all_reduce(shard_squares, group=groups.group)  # every expert of the group, once
    total_norm = (squares(dense) + shard_squares).sqrt()
    if max_norm > 0 and grads:
        clip_coef = (max_norm / (total_norm + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(grads, clip_coef)
    return total_norm


def _expert_entries(params, optimizer_state: dict):
    """(index, parameter) of the expert shards that have optimizer state; torch keys the state
    by each parameter's position in the param groups, which is the order of ``params``."""
    for index, p in enumerate(params):
        if _is_shard(p) and index in optimizer_state["state"]:
            yield index, p


def gather_optimizer_state(state: dict, params) -> dict:
    """A copy of an optimizer state dict whose expert entries hold the full stacks."""
    groups = active_expert_parallel_groups()
    state = {**state, "state": dict(state["state"])}  # never write into the live state
    for index, p in _expert_entries(params, state):
        entry = dict(state["state"][index])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() and value.shape[0] == p.shape[0]:
                full = value.new_empty(p.shape[0] * groups.size, *value.shape[1:])
                dist.all_gather_into_tensor(full, value.contiguous(), group=groups.group)
                entry[key] = full
        state["state"][index] = entry
    return state


def slice_optimizer_state(state: dict, params) -> dict:
    """A copy of an optimizer state dict whose full expert stacks are cut to this rank's rows."""
    groups = active_expert_parallel_groups()
    state = {**state, "state": dict(state["state"])}
    for index, p in _expert_entries(params, state):
        local = p.shape[0]
        first = groups.rank * local
        entry = dict(state["state"][index])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() and value.shape[0] == local * groups.size:
                entry[key] = value[first : first + local].clone()
        state["state"][index] = entry
    return state


def keep_shards_out_of_ddp(model: torch.nn.Module) -> None:
    """Tell torch's DDP (fairseq's ``c10d``/``pytorch_ddp``), when it wraps ``model``, to neither
    broadcast nor all-reduce the expert shards (``legacy_ddp`` skips them by their marker)."""
    names = [name for name, p in model.named_parameters() if _is_shard(p)]
    if names:
        DDP = torch.nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)


def _patched(method, replacement):
    replacement = functools.wraps(method)(replacement)
    replacement.__fairseq_moe_patched__ = True
    return replacement


def train_sharded_experts_with_fairseq() -> None:
    """Apply the module doc to fairseq's optimizer and trainer classes (idempotent)."""
    from fairseq.optim.fairseq_optimizer import FairseqOptimizer
    from fairseq.trainer import Trainer

    if getattr(FairseqOptimizer.all_reduce_grads, "__fairseq_moe_patched__", False):
        return
    all_reduce_grads = FairseqOptimizer.all_reduce_grads
    clip_grad_norm = FairseqOptimizer.clip_grad_norm
    state_dict = FairseqOptimizer.state_dict
    load_state_dict = FairseqOptimizer.load_state_dict
    always_call = Trainer.always_call_state_dict_during_save_checkpoint

    def sharded():
        return active_expert_parallel_groups() is not None

    def new_all_reduce_grads(self, module):
        all_reduce_grads(self, module)
        reduce_expert_grads(module)

    def new_clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        params = list(self.params)
        if not (sharded() and any(_is_shard(p) for p in params)):
            return clip_grad_norm(self, max_norm, aggregate_norm_fn)
        return grad_norm_with_shards(params, max_norm)

    def new_state_dict(self):
        state = state_dict(self)
        if sharded() and gathers_expert_state():
            return gather_optimizer_state(state, list(self.params))
        return state

    def new_load_state_dict(self, state, optimizer_overrides=None):
        if sharded():
            state = slice_optimizer_state(state, list(self.params))
        return load_state_dict(self, state, optimizer_overrides)

    FairseqOptimizer.all_reduce_grads = _patched(all_reduce_grads, new_all_reduce_grads)
    FairseqOptimizer.clip_grad_norm = _patched(clip_grad_norm, new_clip_grad_norm)
    FairseqOptimizer.state_dict = _patched(state_dict, new_state_dict)
    FairseqOptimizer.load_state_dict = _patched(load_state_dict, new_load_state_dict)

    def new_always_call(self):
        return always_call.fget(self) or sharded()

    new_always_call.__fairseq_moe_patched__ = True
    Trainer.always_call_state_dict_during_save_checkpoint = property(new_always_call)
