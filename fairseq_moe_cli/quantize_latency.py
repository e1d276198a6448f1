"""The latency protocol of ``benchmark_quantize``: fixed batches of consecutive test sentences,
every checkpoint's runner timed on the same batches taking turns per repeat, and the p50/p95/mean
of the timed batches (numpy's linear interpolation), in ms.
"""

from __future__ import annotations

import time

import numpy as np


def latency_stats(seconds: list[float], tokens: int | None = None) -> dict:
    ms = 1000 * np.asarray(seconds)
    stats = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
             "mean_ms": float(ms.mean()), "timed_batches": len(ms)}  # fmt: skip
    if tokens is not None:  # beam search: the work done depends on the hypotheses' lengths
        stats["output_tokens_per_pass"] = tokens
    return stats


def time_all(runners: dict, batches: list, repeats: int, warmup: int) -> dict[str, dict]:
    """runners: {name: fn(batch) -> output tokens or None}; every runner on the same batches,
    taking turns per repeat."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, int | None] = {}
    with torch.no_grad():
        for fn in runners.values():
            for i in range(warmup):
                fn(batches[i % len(batches)])
        for _ in range(repeats):
            for name, fn in runners.items():
                counts = []
                for batch in batches:
                    start = time.perf_counter()
                    counts.append(fn(batch))
                    times[name].append(time.perf_counter() - start)
                tokens[name] = None if None in counts else sum(counts)
    return {name: latency_stats(t, tokens[name]) for name, t in times.items()}


def fixed_batches(dataset, batch_size: int, count: int) -> list:
    """``count`` collated batches of consecutive sentences (fewer if the split is short)."""
    n = min(len(dataset), batch_size * count)
    starts = range(0, n - batch_size + 1, batch_size) if n >= batch_size else [0]
    return [dataset.collater([dataset[i] for i in range(s, min(s + batch_size, n))])
            for s in starts]  # fmt: skip
