"""The global-batch balance loss (``--moe-balance-scope global``; Qiu et al. 2025): the expert
frequencies f_i of the Switch loss counted over the whole update, every micro-batch on every
data-parallel worker, before any micro-batch's loss is formed.

fairseq runs an update's micro-batches (``--update-freq``) one after the other, forward then
backward, so when the first one's loss is formed the others have not been routed yet. Hence, in
``Trainer.train_step`` (applied when the plugin is imported; it acts only when the criterion has
``moe_balance_scope == "global"``):

- **One micro-batch per worker** (``--update-freq 1``): each worker's criterion all-reduces its
  micro-batch's counts over the data-parallel workers (the sample carries
  ``ALLREDUCE_KEY``): every micro-batch of the update is being computed at that moment, so the
  sum is the update's. Where a worker has no data left and fairseq gives it a dummy batch (at an
  epoch's end), the update takes the pre-pass below instead, so that no dummy is counted (one
  all-reduce of a flag per update tells).
- **Several micro-batches**: a pre-pass runs every micro-batch's forward, in training mode and
  with autograd on (the same kernels as the real forwards; the graph is dropped, there is no
  backward), from the seed fairseq sets for the update (``Trainer._set_seed``, which its own
  forwards then start from again: dropout, jitter and random capacity priorities draw the same
  numbers, so the routing is the one the real forwards compute), sums the router's counts
  (``moe_routing_counts``; a dummy batch counts zero), all-reduces them once, and hands them to
  each micro-batch's criterion in its sample (``COUNTS_KEY``).

The counts travel in the sample the criterion receives, never through an attribute read later.
Either way, W workers with ``--update-freq u`` and one process with ``--update-freq W·u`` form
the same loss: the same f over the same global batch, each micro-batch's own P.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

BALANCE_SCOPES = ("micro_batch", "global")
COUNTS_KEY = "moe_global_counts"
ALLREDUCE_KEY = "moe_global_counts_allreduce"


def global_scope_applies(record) -> bool:
    """Whether a layer's balance loss takes global counts: top-k routing with the Switch loss
    (dense routing and expert choice balance by construction; the MSE loss has no f)."""
    return (
        record.balance_type == "switch"
        and not getattr(record, "dense", False)
        and not getattr(record, "expert_choice", False)
    )


def _all_reduce_counts(counts: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """``counts`` summed over the processes of ``group`` (one collective, layers stacked in the
    same order on every worker)."""
    if not counts or not (dist.is_available() and dist.is_initialized()):
        return counts
    names = list(counts)
    stacked = torch.stack([counts[n].long() for n in names])  # L x E
    if dist.get_backend(group) != "nccl":
        stacked = stacked.cpu()
    dist.all_reduce(stacked, group=group)
    device = counts[names[0]].device
    return {n: stacked[i].to(device) for i, n in enumerate(names)}


def global_counts_of(sample, records) -> dict[str, torch.Tensor] | None:
    """The update's global counts for ``records`` (a training forward of ``sample``): handed
    over in the sample, or all-reduced now; None when the sample carries neither (a dummy batch,
    or one process with one micro-batch, whose own counts are the global ones)."""
    if not isinstance(sample, dict):
        return None
    counts = sample.get(COUNTS_KEY)
    if counts is not None:
        return counts
    if sample.get(ALLREDUCE_KEY):
        local = {r.layer: r.expert_counts_routed for r in records if global_scope_applies(r)}
        return _all_reduce_counts(local)
    return None


def _any_worker(trainer, flag: bool) -> bool:
    """Whether ``flag`` holds on any data-parallel worker (one all-reduce)."""
    from fairseq.distributed import utils as distributed_utils

    value = torch.tensor([float(flag)], device=trainer.device)
    group = trainer.data_parallel_process_group
    return bool(distributed_utils.all_reduce(value, group=group).item())


def update_counts(trainer, samples) -> dict[str, torch.Tensor]:
    """The pre-pass of the module doc: ``{layer: E}`` the router's counts over every
    micro-batch of ``samples`` (dummy batches count zero) on every data-parallel worker."""
    criterion = trainer.get_criterion()
    trainer._set_seed()  # fairseq's train_step sets it again: the real forwards redraw the same
    trainer.model.train()
    trainer.criterion.train()
    trainer.get_model().set_num_updates(trainer.get_num_updates())  # as task.train_step does
    total: dict[str, torch.Tensor] = {}
    for raw in samples:  # with autograd, as the real forwards: the same kernels, the same bits
        sample, is_dummy = trainer._prepare_sample(raw)
        for layer, counts in criterion.moe_routing_counts(trainer.model, sample).items():
            counts = counts.detach().long() * (0 if is_dummy else 1)
            total[layer] = total[layer] + counts if layer in total else counts
    return _all_reduce_counts(total, trainer.data_parallel_process_group)


def _is_dummy(raw) -> bool:
    return raw is None or len(raw) == 0


def _tagged(raw, **tags):
    return raw if _is_dummy(raw) else {**raw, **tags}


def count_balance_over_the_update() -> None:
    """Apply the module doc to fairseq's ``Trainer.train_step`` (idempotent)."""
    from fairseq.trainer import Trainer

    if getattr(Trainer.train_step, "__fairseq_moe_patched__", False):
        return
    train_step = Trainer.train_step

    @functools.wraps(train_step)
    def new_train_step(self, samples, raise_oom=False):
        scope = getattr(self.get_criterion(), "moe_balance_scope", "micro_batch")
        world = self.data_parallel_world_size
        if scope != "global" or (world == 1 and len(samples) == 1):
            return train_step(self, samples, raise_oom)
        if len(samples) == 1 and not _any_worker(self, _is_dummy(samples[0])):
            return train_step(self, [_tagged(samples[0], **{ALLREDUCE_KEY: True})], raise_oom)
        counts = update_counts(self, samples)
        return train_step(self, [_tagged(s, **{COUNTS_KEY: counts}) for s in samples], raise_oom)

    new_train_step.__fairseq_moe_patched__ = True
    Trainer.train_step = new_train_step
