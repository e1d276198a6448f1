"""Generation latency and throughput of a checkpoint on a data split, at several batch sizes.

    fairseq-moe-benchmark-generate DATA --path checkpoint.pt --beam 5 --bench-batch-sizes 1,32

(or ``python scripts/benchmark_generate.py ...``). Takes fairseq-generate's own arguments (data,
--path, --task, --source-lang, --beam, ...), parsed by fairseq's generation parser, plus:

    --bench-batch-sizes 1,32   batch sizes to time (each over the same sentences, in order)
    --bench-max-sentences N    time only the first N sentences of the split (0 = all)
    --bench-json FILE          write the figures as JSON
    --bench-threads N          torch threads (default: all cores)
    --bench-profile            also profile generation at the first batch size (torch.profiler)
                               and print the ops with the most self time: where the time goes

For each batch size it reports, over the split's sentences in dataset order (one warm-up batch
first, not timed): per-batch latency p50/p95 in ms (at batch size 1, the latency of one
sentence), mean ms per sentence (total time / sentences), sentences/s and generated tokens/s.
Timing covers ``task.inference_step`` (encoder, beam search, decoder), not data loading.
Percentiles are numpy's (linear interpolation between the closest ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import fairseq_moe_plugin  # noqa: F401  (allow-lists checkpoint globals, registers the models)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {sizes}")
    return sizes


def bench_parser() -> argparse.ArgumentParser:
    """This tool's own options (fairseq-generate's are parsed by fairseq)."""
    parser = argparse.ArgumentParser(
        prog="benchmark_generate", description=__doc__, add_help=False, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--bench-batch-sizes", type=_batch_sizes, default=[1, 32])
    parser.add_argument("--bench-max-sentences", type=int, default=0)
    parser.add_argument("--bench-json", default=None)
    parser.add_argument("--bench-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bench-profile", action="store_true")
    return parser


def split_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this tool's ``--bench-*`` options, the rest: fairseq-generate's arguments)."""
    return bench_parser().parse_known_args(argv)


def time_batch_size(task, generator, models, dataset, ids, batch_size, device="cpu"):
    """Time generation over ``ids`` in batches of ``batch_size``; return the figures. On
    ``cuda`` each batch is copied to the GPU before its timer starts (as fairseq-generate copies
    it), and the GPU is synchronised before the timer stops."""
    from fairseq import utils

    def collate(batch):
        sample = dataset.collater([dataset[i] for i in batch])
        return utils.move_to_cuda(sample) if device == "cuda" else sample

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    with torch.no_grad():
        task.inference_step(generator, models, collate(batches[0]))
    latencies, tokens = [], 0
    for batch in batches:
        sample = collate(batch)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            hypos = task.inference_step(generator, models, sample)
        sync()
        latencies.append(time.perf_counter() - start)
        tokens += sum(int(h[0]["tokens"].numel()) for h in hypos)
    total = sum(latencies)
    return {
        "batch_size": batch_size,
        "sentences": len(ids),
        "batches": len(batches),
        "batch_latency_ms_p50": 1000 * float(np.percentile(latencies, 50)),
        "batch_latency_ms_p95": 1000 * float(np.percentile(latencies, 95)),
        "batch_latency_ms_mean": 1000 * statistics.fmean(latencies),
        "ms_per_sentence": 1000 * total / len(ids),
        "sentences_per_s": len(ids) / total,
        "tokens_per_s": tokens / total,
        "generated_tokens": tokens,
    }


def profile_generation(task, generator, models, dataset, ids, batch_size, device, top=12):
    """``measure.profile_top_ops`` over one more pass of ``time_batch_size``."""
    from .measure import profile_top_ops

    def run():
        time_batch_size(task, generator, models, dataset, ids, batch_size, device)

    return profile_top_ops(run, device, top)


def main(argv=None) -> int:
    """CLI entry point; returns 0 (argument errors exit 2, as argparse does)."""
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    bench, rest = split_arguments(sys.argv[1:] if argv is None else list(argv))
    if {"-h", "--help"} & set(rest):  # this tool's options first, then fairseq-generate's
        print(bench_parser().format_help())
    sizes, max_sentences = bench.bench_batch_sizes, bench.bench_max_sentences
    out_json, threads = bench.bench_json, bench.bench_threads

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=rest)
    cfg = convert_namespace_to_omegaconf(args)
    if not cfg.common_eval.path or not os.path.isfile(cfg.common_eval.path):
        raise SystemExit(f"benchmark_generate: --path {cfg.common_eval.path}: no such checkpoint")
    torch.set_num_threads(threads)
    utils.import_user_module(cfg.common)

    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble(
        utils.split_paths(cfg.common_eval.path), task=task
    )
    device = "cuda" if torch.cuda.is_available() and not cfg.common.cpu else "cpu"
    for model in models:
        model.eval()
        if cfg.common.fp16:
            model.half()
        if cfg.common.bf16:
            model.bfloat16()
        if device == "cuda":
            model.cuda()
    task.load_dataset(cfg.dataset.gen_subset)
    dataset = task.dataset(cfg.dataset.gen_subset)
    ids = list(range(len(dataset)))[: max_sentences or None]
    generator = task.build_generator(models, cfg.generation)

    results = {
        "checkpoint": cfg.common_eval.path,
        "subset": cfg.dataset.gen_subset,
        "beam": cfg.generation.beam,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "device": device,
        "torch": torch.__version__,
        "runs": [time_batch_size(task, generator, models, dataset, ids, b, device) for b in sizes],
    }
    print("| batch | sentences | p50 ms/batch | p95 ms/batch | ms/sentence | sent/s | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["runs"]:
        print(
            f"| {r['batch_size']} | {r['sentences']} | {r['batch_latency_ms_p50']:.1f} | "
            f"{r['batch_latency_ms_p95']:.1f} | {r['ms_per_sentence']:.1f} | "
            f"{r['sentences_per_s']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    if bench.bench_profile:
        results["profile"] = profile_generation(
            task, generator, models, dataset, ids, sizes[0], device
        )
        print(f"\nprofile at batch size {sizes[0]} (self time, top ops):")
        for op in results["profile"]:
            print(f"  {op['op']:45s} {op['ms']:9.1f} ms {op['share']:6.1%} {op['calls']:7d} calls")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
