"""The plugin keeps the final partial batch that fairseq's batch_by_size drops (fairseq #5036)."""

import numpy as np
import pytest
from fairseq.data import data_utils

import fairseq_moe_plugin  # noqa: F401  (applies the fix)


@pytest.mark.parametrize("with_vec", [True, False])
def test_every_sentence_is_batched_exactly_once(with_vec):
    indices = np.random.RandomState(0).permutation(100).astype(np.int64)
    kwargs = {"num_tokens_vec": np.full(100, 10)} if with_vec else {}
    batches = data_utils.batch_by_size(
        indices,
        lambda i: 10,
        max_tokens=None,
        max_sentences=32,
        required_batch_size_multiple=8,
        **kwargs,
    )
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    # The recovered tail keeps the dataset's order.
    assert batches[-1].tolist() == indices[96:].tolist()


def test_full_batches_are_untouched():
    indices = np.arange(64, dtype=np.int64)
    batches = data_utils.batch_by_size(
        indices, lambda i: 10, max_tokens=None, max_sentences=32, required_batch_size_multiple=8
    )
    assert [b.tolist() for b in batches] == [list(range(32)), list(range(32, 64))]
