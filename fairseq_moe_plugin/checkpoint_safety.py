"""Allow-list what fairseq checkpoints contain for ``torch.load(weights_only=True)``.

torch >= 2.6 loads checkpoints with ``weights_only=True``: its unpickler refuses every global that
is not allow-listed, so a checkpoint cannot run code when loaded. fairseq checkpoints hold more
than tensors: the training config (an ``argparse.Namespace`` for the legacy models), and, when
trained with ``--eval-bleu`` or another best-checkpoint metric computed by numpy, numpy scalars
and arrays. We allow-list exactly those globals, and never turn weights-only loading off.

One more place unpickles: when several processes resume, fairseq's rank 0 loads the checkpoint
file (weights-only, as above) and broadcasts it to the others, pickled, with the configuration
turned into omegaconf containers and its tensors replaced by placeholders. The omegaconf and
placeholder classes those receivers need (``BROADCAST_GLOBALS``) are allowed only while they
unpickle such a broadcast from their own job's rank 0 (``fairseq_fixes``), never for a file.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _numpy_globals() -> list[object]:
    found: list[object] = [np.ndarray, np.dtype]
    try:  # numpy >= 2 moved the pickled helpers under numpy._core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    found += [_reconstruct, scalar]
    # The dtype classes pickled with arrays/scalars (``numpy.dtypes.Float64DType``, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in (
            "Float64DType",
            "Float32DType",
            "Float16DType",
            "Int64DType",
            "Int32DType",
            "Int16DType",
            "Int8DType",
            "UInt8DType",
            "BoolDType",
        ):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                found.append(cls)
    return found


SAFE_GLOBALS: list[object] = [argparse.Namespace] + _numpy_globals()


def allow_fairseq_checkpoint_globals() -> None:
    """Register ``SAFE_GLOBALS`` with torch's weights-only unpickler (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no weights-only default, nothing to do
        add(SAFE_GLOBALS)


def broadcast_globals() -> list[object]:
    """What fairseq's ``broadcast_object`` pickles beyond ``SAFE_GLOBALS`` (see the module doc)."""
    import typing
    from collections import defaultdict

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict,
            list, int, defaultdict, _TensorPlaceholder]  # fmt: skip
