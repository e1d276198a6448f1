"""Speed and memory of the MoE layer against the dense limit and the public MoE patterns.

    fairseq-moe-benchmark-layer                    # the full grid (CPU, and GPU if any)
    fairseq-moe-benchmark-layer --tokens 8192 --experts 64 --topk 1

(or ``python scripts/benchmark_moe_layer.py ...``). For every setting (T tokens, E experts,
top-k, and the allocator set-up, see below; the sizes and their defaults are the flags, see
``--help``) it times, in one process, on identical weights and inputs
(``moe_layer_references.py``):

- ``moe``: the product's ``MoELayer`` (router, sort-based dispatch, grouped experts), dropless,
  so its expert FLOPs equal the dense limit's exactly;
- ``moe_fresh_grads``: the same with weight-gradient buffer reuse off (fwd+bwd only);
- ``dense``: the limit, one FFN of hidden size k*d_ff with the same activation, no router;
- ``grouped_mm``: dropless sort-based dispatch on ``torch.nn.functional.grouped_mm`` (or
  ``torch._grouped_mm``), torchtitan's pattern, with the router in its forward as ``moe`` has.
  Skipped, with the reason printed, where this torch has neither, where C or F rows are not
  16-byte multiples, or where its first step fails (e.g. a GPU without grouped GEMM kernels);
- ``naive_loop`` / ``naive_loop_modules``: HF Mixtral/Qwen-MoE's per-expert loop over stacked
  weights indexed per expert / over one ``nn.Linear`` pair per expert;
- ``einsum``: GShard's one-hot T x E x C dispatch/combine (fairseq's moe/nllb branches), capacity
  ``ceil(1.0 * k * T / E)`` so that its expert matmuls also do the dense FLOPs. Skipped, with the
  estimate printed, when its T x E x C tensors would not fit in half the free memory.

Protocol: each setting runs in a fresh process (so the gigabytes one setting's references
allocate do not change the allocator state the next setting starts from), with torch threads set
by ``--threads``, once per allocator set-up of ``--malloc`` (default: both, one after the other):

- ``default``: glibc's malloc as it comes. Blocks above its mmap threshold (dynamic, at most
  32 MiB) are fresh ``mmap``s, so every step's large activations are page-faulted and
  zero-filled by the kernel again;
- ``tuned``: ``TUNED_MALLOC`` (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
  16 GiB): large blocks come from the heap and freed memory stays there, so steady-state steps
  reuse resident pages (the heap can grow to a few times a step's peak first, from
  fragmentation).

The ``MALLOC_*`` variables and ``glibc.malloc.*`` tunables of the caller's environment are
removed for both (``default`` means glibc's defaults, not the caller's settings); each process
reports the malloc environment it saw (``malloc_env``, checked against the one set) and whether a
64 MiB block came from its heap (``heap_serves_large_blocks``), and every timed row the median
minor page faults per run (``minor_faults``). An allocator preloaded by ``LD_PRELOAD`` is left as
is.

``fwd`` is a forward without autograd, ``fwd+bwd`` a training step (forward, backward of a random
cotangent, then every gradient set to None as fairseq's ``zero_grad`` does); one untimed step of
``moe`` and ``dense`` when the setting's process starts, ``--warmup`` untimed runs per
measurement, then the median of ``--repeats`` timed runs (fewer, at least 3, for a reference
slower than ``--max-seconds`` per measurement). CPU runs fp32; GPU runs bf16 with the device
synchronised around each run.

Peak memory of one fwd+bwd (weight-gradient buffers cleared first, so gradients are counted):
on CPU the largest running sum of the allocations minus frees that ``torch.profiler`` records
(``profile_memory=True``) during the step, i.e. memory above what existed before it (weights,
input); on GPU ``torch.cuda.max_memory_allocated`` above the allocation before the step. The
budget is 1.1 x (the dense limit's peak without its weight gradients + the expert weights).

Router and dispatch shares (of the ``moe`` fwd+bwd time): the router alone (gate forward and
backward), the grouped experts alone, and the rest (sort, gathers, weighting, scatter-add) as
total minus the two. The experts alone run on rows already sorted by expert, with the same
tokens per expert as the setting's routing, one choice each: their plan is
``DispatchPlan.from_routing(expert_index_sorted.view(-1, 1), all kept, E)``, so its gathers are
contiguous copies and its combine an identity (what dispatch costs beyond that is in the rest).

Prints a markdown table (a row per setting and allocator set-up) and the checks of the targets
that apply (``moe_layer_report.TARGETS``: fwd+bwd at T = 8192 and 32768, E = 8, 16 and 64, k = 1
and 2, each allocator set-up on its own; a line per check naming its T, E, k and malloc), and
writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .measure import (
    free_memory_bytes,
    heap_serves_large_blocks,
    machine_info,
    malloc_env,
    peak_bytes,
    profile_top_ops,
    time_runs,
)
from .moe_layer_malloc import TUNED_MALLOC, malloc_environment, malloc_modes, replaced_environ
from .moe_layer_references import grouped_mm_skip_reason
from .moe_layer_report import (
    MALLOC_MODES,
    MODES,
    markdown_tables,
    summarise,
    target_checks,
    target_setting_text,
)
from .moe_layer_setting import Setting

IMPLS = ("moe", "moe_fresh_grads", "dense", "grouped_mm", "naive_loop", "naive_loop_modules",
         "einsum")  # fmt: skip
# The sizes of the grid and of every setting: the flags' defaults, defined here only.
DEFAULTS = {"tokens": [8192, 32768], "experts": [8, 16, 64], "topk": [1, 2], "d_model": 512,
            "d_ff": 2048, "threads": 2}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", type=int, nargs="+", default=DEFAULTS["tokens"], help="T values")
    p.add_argument("--experts", type=int, nargs="+", default=DEFAULTS["experts"], help="E values")
    p.add_argument("--topk", type=int, nargs="+", default=DEFAULTS["topk"], help="k values")
    p.add_argument("--d-model", type=int, default=DEFAULTS["d_model"], help="C")
    p.add_argument("--d-ff", type=int, default=DEFAULTS["d_ff"], help="hidden size of every expert")
    p.add_argument("--activation", default="relu")
    p.add_argument(
        "--threads", type=int, default=DEFAULTS["threads"], help="torch intra-op threads (CPU)"
    )
    p.add_argument(
        "--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, cuda if present)"
    )
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument(
        "--malloc",
        choices=(*MALLOC_MODES, "both"),
        default="both",
        help="glibc malloc set-up of each setting's process: 'default' = glibc's defaults (any "
        "MALLOC_* variables and glibc.malloc.* GLIBC_TUNABLES of your environment are removed "
        "there), 'tuned' = the same plus "
        + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
        + " (large buffers stay in the heap, not re-mmapped and zero-filled every step), "
        "'both' = each setting measured under both, one process each",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="cap on one measurement's timed runs for slow references (at least 3 runs)",
    )
    p.add_argument("--einsum-capacity-factor", type=float, default=1.0)
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="skip the einsum reference when its estimate exceeds this fraction of free memory",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one fwd+bwd of moe and of dense (torch.profiler) and print the ops "
        "that take the most self time: where the time goes",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("results/benchmark_moe_layer.json"))
    args = p.parse_args(argv)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in args.devices:
        if device not in ("cpu", "cuda"):
            p.error(f"--devices: unknown device {device!r} (expected cpu or cuda)")
        if device == "cuda" and not torch.cuda.is_available():
            p.error("--devices cuda: no CUDA device is available")
    for name in ("tokens", "experts", "topk"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name} values must be >= 1, got {getattr(args, name)}")
    for k in args.topk:
        if k > min(args.experts):
            p.error(f"--topk {k} exceeds the smallest --experts value {min(args.experts)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def run_setting(
    args, device: str, tokens: int, experts: int, k: int, malloc: str = "default"
) -> list[dict]:
    torch.set_num_threads(args.threads)
    setting = Setting(args, device, tokens, experts, k)
    common = {"device": device, "dtype": str(setting.dtype).replace("torch.", "")}
    common.update(tokens=tokens, experts=experts, k=k, d_model=args.d_model, d_ff=args.d_ff)
    # What this process's malloc runs with, as it sees it: its environment, and whether a block
    # above glibc's dynamic mmap threshold comes from the heap.
    common.update(malloc=malloc, malloc_env=malloc_env())
    common["heap_serves_large_blocks"] = heap_serves_large_blocks()
    if malloc == "tuned" and common["heap_serves_large_blocks"] is False:
        print(f"  warning: {TUNED_MALLOC} had no effect: large blocks are still mmapped")

    def times(fn, faults=None):
        return time_runs(fn, device, args.warmup, args.repeats, args.max_seconds, faults)

    rows = []
    load = setting.load()
    for impl in ("moe", "dense"):  # a new process: touch the allocator before anything is timed
        if impl in args.impls:
            setting.step(impl, "fwd+bwd")()
    for impl in args.impls:
        row_base = dict(common, impl=impl)
        reason = None
        if impl == "einsum":
            need, free = setting.einsum_estimate(), free_memory_bytes(device)
            if need > args.memory_fraction * free:
                reason = (
                    f"skipped: its T x E x C tensors need about {need / 2**30:.1f} GiB, more than "
                    f"{args.memory_fraction:.0%} of the {free / 2**30:.1f} GiB free"
                )
        if impl == "grouped_mm":
            reason = grouped_mm_skip_reason(args.d_model, args.d_ff, setting.dtype)
            if reason is None:
                try:  # grouped_mm's support differs by backend, dtype and torch version
                    setting.step(impl, "fwd+bwd")()
                except RuntimeError as e:
                    reason = f"grouped_mm failed: {str(e).splitlines()[0]}"
            reason = reason and f"skipped: {reason}"
        if reason is not None:
            print(f"  {impl:20s} {reason}", flush=True)
            rows.append(dict(row_base, skipped=reason))
            continue
        for mode in MODES:
            if impl == "moe_fresh_grads" and mode == "fwd":
                continue  # identical to moe's forward
            step = setting.step(impl, mode)
            faults = []
            runs = times(step, faults)
            median = statistics.median(runs)
            row = dict(row_base, mode=mode, median_s=median, runs=len(runs))
            row["tokens_per_s"] = tokens / median
            row["minor_faults"] = statistics.median(faults)  # per timed run
            if mode == "fwd+bwd" and not args.no_memory:
                setting.set_grad_buffer_reuse(impl != "moe_fresh_grads", clear=True)
                row["peak_bytes"] = peak_bytes(step, device)
            if impl == "moe":
                row["load"] = load
            if impl == "moe" and mode == "fwd+bwd":
                row.update(setting.breakdown(times))
            print(
                f"  {impl:20s} {mode:8s} {median * 1e3:10.1f} ms  {row['tokens_per_s']:12,.0f} tok/s"
                f"  {row['minor_faults']:9,.0f} faults"
                + (f"  peak {row['peak_bytes'] / 2**20:8.1f} MiB" if "peak_bytes" in row else ""),
                flush=True,
            )
            rows.append(row)
    if args.profile:
        for row in rows:
            if row["impl"] in ("moe", "dense") and row.get("mode") == "fwd+bwd":
                step = setting.step(row["impl"], "fwd+bwd")
                step()  # warm
                row["profile"] = profile_top_ops(step, device, top=8)
                print(f"  profile of one {row['impl']} fwd+bwd (self time, top ops):")
                for op in row["profile"]:
                    print(
                        f"    {op['op']:40s} {op['ms']:9.1f} ms {op['share']:6.1%} {op['calls']:6d} calls"
                    )
    params = setting.layer.experts
    expert_bytes = sum(p.numel() * p.element_size() for p in params.parameters())
    dense_grad_bytes = sum(p.numel() * p.element_size() for p in setting.dense.parameters())
    for row in rows:
        row["expert_weight_bytes"] = expert_bytes
        row["dense_weight_bytes"] = dense_grad_bytes
    return rows


def run_in_fresh_process(
    args, device: str, tokens: int, experts: int, k: int, malloc: str = "default"
) -> list[dict]:
    """``run_setting`` in a new interpreter (spawned, so no allocator or CUDA state is shared)
    whose environment has the malloc settings of ``malloc`` (``malloc_environment``); glibc reads
    them when that process starts. Raises RuntimeError if the process saw other settings."""
    env = malloc_environment(malloc, os.environ)
    context = multiprocessing.get_context("spawn")
    with replaced_environ(env):  # the worker is spawned at submit, inheriting os.environ
        with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
            rows = pool.submit(run_setting, args, device, tokens, experts, k, malloc).result()
    for row in rows:
        if row["malloc_env"] != malloc_env(env):
            raise RuntimeError(
                f"malloc {malloc}: the setting's process saw {row['malloc_env']}, "
                f"expected {malloc_env(env)}"
            )
    return rows


def main(argv=None) -> int:
    """CLI entry point; returns 0 (argument errors exit 2, as argparse does)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(
        f"benchmark_moe_layer: {info['cpu']}, {info['cpus_available']} of {info['cpu_count']} "
        f"cores available, torch {info['torch']} with {args.threads} threads"
        + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        flush=True,
    )
    tuned = " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
    used = {"default": "default (glibc's defaults)", "tuned": f"tuned ({tuned})"}
    removed = {
        k: v
        for k, v in info["malloc_env"].items()
        if malloc_environment("default", {k: v}) != {k: v}
    }
    print(
        f"malloc: {', '.join(used[m] for m in malloc_modes(args))}, each setting in a process "
        "of its own" + (f"; removed from its environment: {removed}" if removed else ""),
        flush=True,
    )
    rows = []
    for device in args.devices:
        for tokens in args.tokens:
            for experts in args.experts:
                for k in args.topk:
                    if k > experts:
                        continue
                    for malloc in malloc_modes(args):
                        print(f"{device} T={tokens} E={experts} k={k} malloc={malloc}", flush=True)
                        rows.extend(run_in_fresh_process(args, device, tokens, experts, k, malloc))
    summary = summarise(rows)
    checks = target_checks(summary, args)
    tables = markdown_tables(summary)
    print(tables)
    if checks:
        print(f"\nTargets ({target_setting_text()}; CPU runs fp32):")
        for c in checks:
            status = "INFO" if "ok" not in c else ("PASS" if c["ok"] else "FAIL")
            print(f"  [{status}] {c['check']}: {c['value']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "summary": summary,
        "targets": checks,
        "markdown": tables,
    }
    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
