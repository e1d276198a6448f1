"""The training iterator's position in global batches (``distributed/iterator_position.py``): a
mid-epoch state saved with W workers continues at W' on the batches the uninterrupted run would
have taken next, and a resume that would skip or repeat data is refused with the reason."""

import numpy as np
import pytest
import torch
from fairseq.data.iterators import EpochBatchIterator

import fairseq_moe_plugin  # noqa: F401  (applies the iterator patch)
from fairseq_moe_plugin.distributed.iterator_position import ResumeError, note_saved_world_size


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __getitem__(self, i):
        return i

    def __len__(self):
        return self.n


def _batches(sizes):
    """Consecutive index batches of the given sizes."""
    starts = np.cumsum([0] + list(sizes))
    return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


SIZES = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]  # 17 batches, 82 sentences


def _iterator(world, rank, sizes=SIZES, **kwargs):
    batches = _batches(sizes)
    return EpochBatchIterator(_Items(sum(sizes)), collate_fn=list, batch_sampler=batches,
                              seed=5, num_shards=world, shard_id=rank, epoch=1, **kwargs)  # fmt: skip


def _global_order(sizes=SIZES):
    """The epoch's batches as one worker takes them (the order they are dealt in)."""
    return [list(b) for b in _iterator(1, 0, sizes).next_epoch_itr(shuffle=True)]


def _consume(world, per_worker):
    """``world`` workers each take ``per_worker`` batches; worker 0's state."""
    states = []
    for rank in range(world):
        itr = _iterator(world, rank)
        epoch = itr.next_epoch_itr(shuffle=True)
        for _ in range(per_worker):
            next(epoch)
        states.append(itr.state_dict())
    assert all(s == states[0] for s in states)  # every worker saves the same state
    return states[0]


def _rest(world, state, **kwargs):
    """What each of ``world`` workers takes after loading ``state``."""
    rest = []
    for rank in range(world):
        itr = _iterator(world, rank, **kwargs)
        itr.load_state_dict(state)
        rest.append([list(b) for b in itr.next_epoch_itr(shuffle=True)])
    return rest


@pytest.mark.parametrize("world", [4, 3, 2, 1, 5])
def test_mid_epoch_state_of_four_workers_continues_at_any_world_size(world):
    state = _consume(4, 2)  # 8 of the 17 batches taken
    order = _global_order()
    assert state["moe_global_batches"] == 8 and state["moe_world_size"] == 4
    assert state["moe_global_samples"] == sum(len(b) for b in order[:8])
    rest = _rest(world, state)
    for rank in range(world):  # round-robin over the batches after the 8th, [] filling the end
        expected = order[8:][rank::world]
        assert [b for b in rest[rank] if b] == expected, rank
    # no batch skipped, none repeated
    taken = sorted(i for worker in rest for b in worker for i in b)
    assert taken == sorted(i for b in order[8:] for i in b)


def test_position_after_a_resume_at_another_world_size_counts_from_where_it_resumed():
    state = _consume(4, 1)  # 4 batches
    itr = _iterator(3, 0)  # 3 workers: 4 is not a multiple of 3, the global-offset path
    itr.load_state_dict(state)
    epoch = itr.next_epoch_itr(shuffle=True)
    next(epoch)
    next(epoch)  # each of the 3 workers took 2 more: 4 + 6
    again = itr.state_dict()
    assert again["moe_global_batches"] == 10 and again["moe_world_size"] == 3
    rest = _rest(2, again)
    order = _global_order()
    assert [b for b in rest[0] if b] == order[10:][0::2]
    assert [b for b in rest[1] if b] == order[10:][1::2]


def test_a_fairseq_state_without_the_position_is_read_with_its_configs_world_size():
    state = _consume(4, 2)
    fairseq_state = {k: v for k, v in state.items() if not k.startswith("moe_")}
    checkpoint = {"extra_state": {"train_iterator": fairseq_state},
                  "cfg": {"distributed_training": {"distributed_world_size": 4}}}  # fmt: skip
    note_saved_world_size(checkpoint)
    assert fairseq_state["moe_world_size"] == 4
    rest = _rest(3, fairseq_state)
    order = _global_order()
    assert [b for b in rest[1] if b] == order[8:][1::3]


def test_end_of_epoch_state_starts_the_next_epoch_at_any_world_size():
    itr = _iterator(4, 0)
    epoch = itr.next_epoch_itr(shuffle=True)
    for _ in epoch:
        pass
    state = itr.state_dict()
    assert state["epoch"] == 2 and state["iterations_in_epoch"] == 0
    assert "moe_global_batches" not in state
    fresh = _iterator(2, 1)
    fresh.load_state_dict(state)
    assert fresh.next_epoch_itr(shuffle=True).n == 0 and fresh.epoch == 2


def test_resumes_that_would_skip_or_repeat_data_are_refused():
    state = _consume(4, 2)
    with pytest.raises(ResumeError, match=r"the checkpoint's epoch has 17 batches, this run's 16"):
        _iterator(2, 0, sizes=SIZES[:-1]).load_state_dict(state)
    other = [s + 1 for s in SIZES]  # 17 batches again, but other ones (another --max-tokens)
    with pytest.raises(ResumeError, match=r"after 8 batches holding \d+ sentences, but this run"):
        _iterator(2, 0, sizes=other).load_state_dict(state)
    grouped = []
    for rank in range(4):
        itr = _iterator(4, rank, grouped_shuffling=True)
        epoch = itr.next_epoch_itr(shuffle=True)
        next(epoch)
        grouped.append(itr.state_dict())
    with pytest.raises(ResumeError, match=r"--grouped-shuffling orders the epoch's batches"):
        _iterator(2, 0, grouped_shuffling=True).load_state_dict(grouped[0])
    same = _iterator(4, 0, grouped_shuffling=True)
    same.load_state_dict(grouped[0])  # the same world size: fairseq's own resume, accepted
