"""Provenance that the MoE models write into their own ``args`` when built, so that fairseq saves
it with every checkpoint: where the weights came from (upcycling's dense checkpoint) and, for
adapter-only checkpoints, the base checkpoint's path and sha256.

Every field written here is declared in ``MoEConfig`` (``moe_upcycled_from``, ``moe_base_new``,
``moe_base_checkpoint``, ``moe_base_sha256``), with a default that means "not recorded", so that
it round-trips through fairseq's dataclass conversion and an older checkpoint that lacks it
loads with that default. ``upcycle.py`` and ``adapter_checkpoint.py`` both import this module,
neither the other for it.
"""

from __future__ import annotations

import hashlib
import logging

logger = logging.getLogger(__name__)


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_base(args, path) -> None:
    """Put the base checkpoint's path and sha256 in ``args`` (saved with every checkpoint)."""
    args.moe_base_checkpoint = str(path)
    args.moe_base_sha256 = sha256_file(path)
    logger.info(f"adapter-only checkpoints: base {path} (sha256 {args.moe_base_sha256[:16]}...)")


def record_upcycling(args, path, new) -> None:
    """Record in ``args`` that the model was upcycled from the dense checkpoint ``path`` and
    clear ``--moe-init-from-dense``, so that loading the trained MoE model later does not read
    the dense checkpoint again. ``new``: the model's tensors that the dense checkpoint did not
    provide (new heads, LoRA deltas, ...), which an adapter-only checkpoint keeps even when
    frozen, as no base can give them back."""
    args.moe_upcycled_from = str(path)
    args.moe_init_from_dense = None
    args.moe_base_new = list(new)
