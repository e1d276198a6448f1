"""A fix to fairseq's batching that the plugin applies when imported.

fairseq's main branch (and so ``fairseq-fixed``) drops the final batch in
``data_utils.batch_by_size`` when its size is not a multiple of ``--required-batch-size-multiple``
(default 8): fairseq-generate then silently skips up to 7 test sentences and BLEU is computed on
fewer sentences than the test set has (facebookresearch/fairseq issue #5036). We keep that batch:
the sentences the original function left out are returned as one last, smaller batch. Batch
composition is otherwise unchanged.
"""

import functools
import logging

import numpy as np
from fairseq.data import data_utils

logger = logging.getLogger(__name__)


def _keeping_last_batch(batch_by_size):
    @functools.wraps(batch_by_size)
    def wrapper(indices, *args, **kwargs):
        batches = batch_by_size(indices, *args, **kwargs)
        n_batched = sum(len(b) for b in batches)
        if n_batched < len(indices):
            kept = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
            missing = np.setdiff1d(np.asarray(indices, dtype=np.int64), kept, assume_unique=False)
            # Keep the dataset's order for the recovered sentences.
            order = {int(i): pos for pos, i in enumerate(indices)}
            missing = np.array(sorted(missing.tolist(), key=order.__getitem__), dtype=np.int64)
            batches = list(batches) + [missing]
        return batches

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def keep_last_partial_batch() -> None:
    """Patch ``fairseq.data.data_utils.batch_by_size`` (idempotent)."""
    if not getattr(data_utils.batch_by_size, "__fairseq_moe_patched__", False):
        data_utils.batch_by_size = _keeping_last_batch(data_utils.batch_by_size)
