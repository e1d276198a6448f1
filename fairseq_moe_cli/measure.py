"""Measurement helpers of the benchmarks: the machine, wall-clock runs, page faults, peak
memory, and what glibc's malloc does with large blocks.

``peak_bytes`` is hand-written for CPU: torch has no CPU counterpart of
``torch.cuda.max_memory_allocated``, so it replays the allocation events ``torch.profiler``
records (``profile_memory=True``) and returns the largest running sum.

``heap_serves_large_blocks`` probes the C library's malloc: whether a block above glibc's largest
dynamic mmap threshold (32 MiB on 64-bit) comes from the heap (the mmap threshold was raised,
e.g. by ``MALLOC_MMAP_THRESHOLD_``) or from a fresh ``mmap``, which the kernel must page-fault
and zero-fill on first write, every time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
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
        "malloc_env": malloc_env(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def malloc_env(environ=None) -> dict:
    """The environment variables that set glibc's malloc: ``MALLOC_*`` and ``GLIBC_TUNABLES``."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def heap_serves_large_blocks(nbytes: int = 64 * 2**20) -> bool | None:
    """Whether glibc's malloc serves an ``nbytes`` block from its heap (True) or by a fresh
    ``mmap`` (False): one ``malloc``, never written (so nothing is faulted in), and ``free``;
    ``mallinfo2``'s mmapped bytes tell which. None where the C library is not glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = mallinfo2().hblkhd
    block = libc.malloc(nbytes)
    if not block:
        return None
    mmapped = mallinfo2().hblkhd - before >= nbytes
    libc.free(block)
    return not mmapped


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel mapped and zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def time_runs(
    fn, device: str, warmup: int, repeats: int, max_seconds: float, faults: list | None = None
) -> list[float]:
    """Seconds of each timed run of ``fn`` after ``warmup`` untimed ones; each timed run's minor
    page faults are appended to ``faults`` if given."""
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
        faults_before = minor_faults()
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if faults is not None:
            faults.append(minor_faults() - faults_before)
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


def profile_top_ops(fn, device: str, top: int) -> list[dict]:
    """The ``top`` entries by self time (ops, and ``record_function`` scopes, whose self time is
    Python) in one run of ``fn`` under ``torch.profiler``: name, ms, share of the total self
    time, and call count. On CUDA the device time is ranked."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [
        {"op": e.key, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
         "calls": e.count}
        for e in events[:top]
    ]  # fmt: skip
