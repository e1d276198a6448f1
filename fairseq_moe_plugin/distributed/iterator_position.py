"""The training iterator's position as global batches and samples, so that a mid-epoch checkpoint
resumes at another world size on the data the uninterrupted run would have seen next.

fairseq's ``EpochBatchIterator`` deals one epoch's batches (a list that does not depend on the
number of workers W: ``frozen_batches``, shuffled with ``seed + epoch``) round-robin to the
workers, batch ``i`` to worker ``i % W``, and saves the number of batches *this worker* consumed,
n. Resumed at W', it skips n batches per worker: ``n·W'`` batches instead of the ``n·W`` that
were consumed, so it repeats data (W' < W) or skips it (W' > W), silently.

Here (applied when the plugin is imported) the iterator's state also records:

- ``moe_global_batches`` (``n·W`` plus where the epoch was resumed from) and
  ``moe_global_samples`` (the sentences in those batches): the position in the epoch's global
  order;
- ``moe_world_size`` W, ``moe_epoch_batches`` and ``moe_epoch_samples`` (the epoch's size), which
  a resume checks.

Loading a mid-epoch position at W' continues from global batch g: where ``g`` is a multiple of
W' it is fairseq's own fast-forward (``g / W'`` batches per worker); otherwise every worker takes
its round-robin share of the batches after g (``ordered_batches`` below). A checkpoint saved
without these fields (by fairseq, or before this plugin recorded them) is read with W from its
config (``note_saved_world_size``). A resume is refused, with the reason, where the epoch's
batches are not the ones the checkpoint counted (another ``--max-tokens``, ``--batch-size``,
``--seed`` or data: the recorded samples differ) or where they depend on W
(``--grouped-shuffling``, ``--fix-batches-to-gpus``) and W changed: continuing would skip or
repeat data. End-of-epoch checkpoints (position 0 of the next epoch) need none of this.
"""

from __future__ import annotations

import functools
import logging

from ..checkpoint_fields import saved_option

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A mid-epoch position that cannot be continued without skipping or repeating data."""


def note_saved_world_size(state) -> None:
    """Record in a loaded checkpoint's iterator state the world size it was saved at, taken
    from its config, when the state does not record it itself."""
    if not isinstance(state, dict):
        return
    itr = (state.get("extra_state") or {}).get("train_iterator")
    if not isinstance(itr, dict) or "moe_world_size" in itr:
        return
    world = saved_option(state, "distributed_training", "distributed_world_size")
    if world:
        itr["moe_world_size"] = int(world)


def _global_order(itr, epoch: int, shuffle: bool):
    """The epoch's batches in the order they are dealt to the workers (before sharding), or
    None where that order depends on the number of workers (grouped shuffling) or on the
    dataset's prefetching."""
    if itr.grouped_shuffling or itr._supports_prefetch:
        return None
    num_shards, shard_id = itr.num_shards, itr.shard_id
    itr.num_shards, itr.shard_id = 1, 0  # fairseq's own order, dealt to one worker
    try:
        return _ORIGINAL["ordered_batches"](itr, epoch, False, shuffle)
    finally:
        itr.num_shards, itr.shard_id = num_shards, shard_id


def _samples(batches) -> int:
    return int(sum(len(b) for b in batches))


_ORIGINAL: dict = {}


def _state_dict(self):
    state = _ORIGINAL["state_dict"](self)
    state["moe_world_size"] = self.num_shards
    n = state["iterations_in_epoch"]
    if n > 0:
        # resumed from global batch ``base`` (0 after fairseq's own fast-forward, whose n
        # counts the skipped batches too), each worker has consumed n of its own since
        position = getattr(self, "_moe_global_base", 0) + n * self.num_shards
        state["moe_global_batches"] = position
        state["moe_epoch_batches"] = len(self.frozen_batches)
        order = _global_order(self, self.epoch, self.shuffle)
        if order is not None:
            state["moe_global_samples"] = _samples(order[:position])
            state["moe_epoch_samples"] = _samples(order)
    return state


def _check_position(itr, state: dict, position: int) -> None:
    epoch = state["epoch"]
    expected = state.get("moe_epoch_batches")
    if expected is not None and expected != len(itr.frozen_batches):
        raise ResumeError(
            f"cannot resume in the middle of epoch {epoch}: the checkpoint's epoch has "
            f"{expected} batches, this run's {len(itr.frozen_batches)}: the batching changed "
            "(--max-tokens, --batch-size, --required-batch-size-multiple, the data). Resume "
            "with the batching it was trained with, or start the epoch over (--reset-dataloader)"
        )
    samples = state.get("moe_global_samples")
    if samples is None:
        return
    order = _global_order(itr, epoch, state.get("shuffle", True))
    if order is not None and _samples(order[:position]) != samples:
        raise ResumeError(
            f"cannot resume in the middle of epoch {epoch}: the checkpoint was saved after "
            f"{position} batches holding {samples} sentences, but this run's first {position} "
            f"batches hold {_samples(order[:position])}: the epoch's order changed (the data, "
            "--seed or the batching). Resume with what it was trained with, or start the "
            "epoch over (--reset-dataloader)"
        )


def _load_state_dict(self, state):
    n = state.get("iterations_in_epoch", 0)
    saved_world = state.get("moe_world_size")
    self._moe_global_base, self._moe_base_epoch = 0, None
    if n == 0 or saved_world is None:
        return _ORIGINAL["load_state_dict"](self, state)
    position = int(state.get("moe_global_batches", n * saved_world))
    world = self.num_shards
    if saved_world != world and self.grouped_shuffling:
        raise ResumeError(
            f"cannot resume in the middle of epoch {state['epoch']} with {world} workers: the "
            f"checkpoint was saved with {saved_world}, and --grouped-shuffling orders the "
            "epoch's batches in groups of the number of workers. Resume with "
            f"{saved_world} workers, or start the epoch over (--reset-dataloader)"
        )
    _check_position(self, state, position)
    if saved_world != world:
        logger.info(
            f"resuming epoch {state['epoch']} after {position} global batches "
            f"(saved with {saved_world} workers, now {world})"
        )
        self._moe_other_world = True
    if position % world == 0:  # fairseq's own fast-forward, position / W batches per worker
        return _ORIGINAL["load_state_dict"](
            self, {**state, "iterations_in_epoch": position // world}
        )
    self._moe_global_base, self._moe_base_epoch = position, state["epoch"]
    return _ORIGINAL["load_state_dict"](self, {**state, "iterations_in_epoch": 0})


def _ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
    if fix_batches_to_gpus and getattr(self, "_moe_other_world", False):
        raise ResumeError(
            "cannot resume in the middle of an epoch at another number of workers with "
            "--fix-batches-to-gpus (each worker's batches are shuffled by its rank); resume "
            "with the number of workers it was saved with, or --reset-dataloader"
        )
    base = getattr(self, "_moe_global_base", 0)
    if not base or getattr(self, "_moe_base_epoch", None) != epoch:
        return _ORIGINAL["ordered_batches"](self, epoch, fix_batches_to_gpus, shuffle)
    from fairseq.data.iterators import ShardedIterator

    order = _global_order(self, epoch, shuffle)
    return list(ShardedIterator(order[base:], self.num_shards, self.shard_id, fill_value=[]))


def record_global_position() -> None:
    """Apply the module doc to fairseq's ``EpochBatchIterator`` (idempotent)."""
    from fairseq.data.iterators import EpochBatchIterator

    if _ORIGINAL:
        return
    for name, replacement in (("state_dict", _state_dict), ("load_state_dict", _load_state_dict),
                              ("ordered_batches", _ordered_batches)):  # fmt: skip
        original = getattr(EpochBatchIterator, name)
        _ORIGINAL[name] = original
        patched = functools.wraps(original)(replacement)
        patched.__fairseq_moe_patched__ = True
        setattr(EpochBatchIterator, name, patched)
