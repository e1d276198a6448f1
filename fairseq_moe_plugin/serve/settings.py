"""The app's limits and switches (flags of fairseq-moe-serve), shared by the app and by every
version's batcher."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """The app's limits (flags of fairseq-moe-serve)."""

    max_wait_ms: float = 5.0  # --max-wait-ms: each version's batching window
    max_texts: int = 64  # --max-texts
    max_body_bytes: int = 1 << 20  # --max-body-bytes
    max_queue_texts: int = 4096  # --max-queue-texts: per version
    reload_on_sighup: bool = False  # SIGHUP re-reads the registry (the command line sets it)
