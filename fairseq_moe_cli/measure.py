"""Measurement helpers of the benchmarks: the machine, wall-clock runs, peak memory.

``peak_bytes`` is hand-written for CPU: torch has no CPU counterpart of
``torch.cuda.max_memory_allocated``, so it replays the allocation events ``torch.profiler``
records (``profile_memory=True``) and returns the largest running sum.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def machine_info(threads: int) -> dict:
    """The CPU, cores, torch version and threads (and GPU, if any) a benchmark runs on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def free_memory_bytes(device: str) -> int:
    """Free memory of ``device``: the GPU's, or the system's ``MemAvailable``."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, device: str, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    """Seconds of each timed run of ``fn`` after ``warmup`` untimed ones."""
    first = None
    for i in range(warmup):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - start
    if first is not None and first * repeats > max_seconds:
        repeats = max(3, int(max_seconds / first))
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_bytes(fn, device: str) -> int:
    """Peak memory allocated during ``fn`` above what was allocated before it (see module doc)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak
