"""Latency and exactness of an exported ``moe_roberta`` classifier: PyTorch eager against
onnxruntime with each ``--moe-op`` formulation (a benchmark, not a test).

    fairseq-moe-benchmark-onnx CHECKPOINT --out-dir DIR [--data DATA_BIN] [--split test] \\
        [--ops plain,fused,qmoe] [--threads 2] [--batch-sizes 1,32] [--timed-batches 50]

(or ``python scripts/benchmark_onnx.py ...``). Each formulation is exported to
``DIR/classifier_<op>.onnx``; on every sentence of the binarised split (batches of 32, in dataset
order, padded as fairseq pads them) it reports the largest |logit difference| to PyTorch and the
share of equal predictions; then, for each batch size, ``--timed-batches`` consecutive batches of
the split (cycled when the split is shorter) are run by every engine in turn, batch by batch, so
that a load change on a shared machine hits all engines alike, and the per-batch latency is
reported as p50/p95 in ms. PyTorch and onnxruntime get the same intra-op thread count
(``--threads``; onnxruntime's inter-op pool is 1). Writes ``DIR/benchmark_onnx.json`` and
``DIR/benchmark_onnx.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROG = "fairseq-moe-benchmark-onnx"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="a trained moe_roberta checkpoint with a classification head")
    p.add_argument("--out-dir", required=True, help="writes the .onnx files, JSON and markdown")
    p.add_argument("--data", help="the task's data folder (default: the one saved)")
    p.add_argument("--split", default="test")
    p.add_argument("--head", default=None, help="classification head (default: the criterion's)")
    p.add_argument("--decrypt-key-file", help="key file of an encrypted checkpoint")
    p.add_argument("--ops", default="plain,fused,qmoe", help="comma-separated --moe-op values")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, both runtimes")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--timed-batches", type=int, default=50, help="per batch size (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per engine first")
    return p


def _percentiles(ms: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(np.mean(ms)), "n": len(ms)}  # fmt: skip


def benchmark(args) -> dict:
    """Export, check and time; returns the report."""
    import onnxruntime
    import torch

    from fairseq_moe_cli.export_onnx import head_name, load, require_serve_extra, split_batches
    from fairseq_moe_plugin.deploy import onnx_export as ox

    require_serve_extra()
    ops = [o for o in args.ops.split(",") if o]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.threads < 1 or args.timed_batches < 1 or not sizes or min(sizes) < 1:
        raise ValueError("--threads, --timed-batches and --batch-sizes must be >= 1")
    torch.set_num_threads(args.threads)
    model, cfg, task = load(args.checkpoint, args.decrypt_key_file, args.data)
    if ox.model_kind(model) != "classifier":
        raise ValueError(f"{args.checkpoint}: the benchmark needs a moe_roberta classifier")
    head = head_name(cfg, args.head)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_positions = int(model.max_positions())
    inputs = ox.example_inputs("classifier", task.source_dictionary, max_positions)
    sessions, report = {}, {"checkpoint": str(args.checkpoint), "split": args.split,
                            "threads": args.threads, "engines": {}}  # fmt: skip
    check_batches = split_batches(task, args.split, 32, 0)
    pad = task.source_dictionary.pad()
    expected = {}

    def reference(tokens):
        key = id(tokens)
        if key not in expected:
            expected[key] = ox.reference(model, "classifier", head, tokens)
        return expected[key]

    for op in ops:
        module = ox.build_export_module(model, "classifier", head, op)
        path = ox.export_onnx(module, out_dir / f"classifier_{op}.onnx", inputs, "classifier",
                              max_positions)  # fmt: skip
        sessions[op] = ox.ort_session(path, args.threads)
        figures = ox.compare(sessions[op], "classifier", check_batches, reference, 1e-4, pad)
        report["engines"][f"onnxruntime {op}"] = {
            "file_mib": path.stat().st_size / 2**20,
            **figures,
        }
        print(f"{PROG}: {op}: max |logits diff| {figures['max_abs_diff']:.3g}, equal "
              f"predictions {figures['agreement']:.2%} ({figures['sentences']} sentences)",
              flush=True)  # fmt: skip
    report["engines"] = {"pytorch eager": {"max_abs_diff": 0.0, "agreement": 1.0},
                         **report["engines"]}  # fmt: skip

    def engines(tokens):
        feeds = {"src_tokens": tokens.numpy()}
        yield "pytorch eager", lambda: model(tokens, features_only=True,
                                             classification_head_name=head)  # fmt: skip
        for op, session in sessions.items():
            yield f"onnxruntime {op}", lambda s=session: s.run(None, feeds)

    # Each engine is timed in a block of its own: onnxruntime's threads spin for a while after
    # a run, which on a small machine would slow down whichever engine ran next.
    for size in sizes:
        batches = split_batches(task, args.split, size, 0)
        timings: dict[str, list[float]] = {}
        names = [name for name, _ in engines(batches[0])]
        with torch.no_grad():
            for engine in names:
                for i in range(args.warmup + args.timed_batches):
                    call = dict(engines(batches[i % len(batches)]))[engine]
                    start = time.perf_counter()
                    call()
                    elapsed = (time.perf_counter() - start) * 1e3
                    if i >= args.warmup:
                        timings.setdefault(engine, []).append(elapsed)
        for name, ms in timings.items():
            report["engines"][name][f"batch_{size}"] = _percentiles(ms)
            print(f"{PROG}: batch {size}: {name}: p50 {np.percentile(ms, 50):.2f} ms, "
                  f"p95 {np.percentile(ms, 95):.2f} ms", flush=True)  # fmt: skip
    report["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                          "python": platform.python_version(), "cpu": platform.processor()}  # fmt: skip
    return report


def markdown(report: dict, sizes: list[int]) -> str:
    head = "| engine | max abs logit diff | equal predictions |"
    rule = "| --- | ---: | ---: |"
    for b in sizes:
        head += f" p50 ms (batch {b}) | p95 ms (batch {b}) |"
        rule += " ---: | ---: |"
    rows = [head, rule]
    for name, e in report["engines"].items():
        row = f"| {name} | {e['max_abs_diff']:.2g} | {e['agreement']:.2%} |"
        for b in sizes:
            t = e.get(f"batch_{b}", {})
            row += f" {t.get('p50_ms', float('nan')):.2f} | {t.get('p95_ms', float('nan')):.2f} |"
        rows.append(row)
    note = (f"\n{report['checkpoint']}, split {report['split']}, {report['threads']} intra-op "
            f"threads; torch {report['versions']['torch']}, onnxruntime "
            f"{report['versions']['onnxruntime']}.\n")  # fmt: skip
    return "\n".join(rows) + "\n" + note


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = benchmark(args)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    (out_dir / "benchmark_onnx.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, [int(b) for b in args.batch_sizes.split(",") if b])
    (out_dir / "benchmark_onnx.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
