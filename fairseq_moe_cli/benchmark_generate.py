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
    --bench-baseline FILE      a second checkpoint (same task and dictionaries, e.g. the
                               FLOP-matched dense model) timed in the same process, on the same
                               sentences and batch sizes, and compared with --path
    --bench-rounds N           timing rounds (default 1; the documented protocol is 3)
    --bench-bandwidth-gbs X    memory bandwidth for the roofline (default: measured)
    --bench-peak-gflops Y      peak compute for the roofline (default: measured)

For each batch size it reports, over the split's sentences in dataset order (one warm-up batch
first, not timed): per-batch latency p50/p95 in ms (at batch size 1, the latency of one
sentence), mean ms per sentence (total time / sentences), sentences/s and generated tokens/s.
Timing covers ``task.inference_step`` (encoder, beam search, decoder), not data loading.
Percentiles are numpy's (linear interpolation between the closest ranks).

Rounds: each round times every batch size on --path, then (with --bench-baseline) every batch
size on the baseline; every round in that order. ``runs`` and the first table give, per batch
size, main's round with the median tokens/s (the lower median for an even count; with one round,
the only one); every round's figures are kept in the JSON (``rounds``, or
``comparison.per_round``; each run also has ``total_ms``, its summed batch latencies).

With --bench-baseline, after the timed rounds each model makes one more, untimed pass at each
batch size with forward hooks on its ``MoELayer`` modules (distinct experts hit per forward:
``(record.expert_counts > 0).sum()``) and a counter on the generator's
``EnsembleModel.forward_decoder``: the real number of decoder steps (calls) and hypothesis rows
per step (fairseq drops finished sentences; a generator without ``forward_decoder`` falls back to
the longest hypothesis, EOS included, per batch, and b x beam rows). A second table gives per
batch size: the median over rounds of each model's tokens/s, their ratio (main / baseline), each
model's roofline step time (``step_roofline.py``: a lower bound from bytes read and flops at the
measured rows, experts hit, source and output lengths) and the roofline ratio (baseline limit /
main limit: the best ratio physically attainable), and each model's measured ms per step (the
round's total generation time / decoder steps, median over rounds). All of it is written under
``comparison`` in --bench-json. The machine figures are measured once on the device in use
unless given (``step_roofline.measure_bandwidth``, ``measure_peak``).
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


def _number(kind):
    """An argparse type: an int >= 1 (``kind=int``) or a float > 0 (``kind=float``)."""
    name, bound = ("an integer", ">= 1") if kind is int else ("a number", "> 0")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {name}: {text!r}") from None
        if not (value >= 1 if kind is int else value > 0):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


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
    parser.add_argument(
        "--bench-baseline", metavar="PATH", default=None,
        help="a second checkpoint (same task and dictionaries, e.g. the FLOP-matched dense "
        "model), timed in the same process on the same sentences and batch sizes",
    )  # fmt: skip
    parser.add_argument(
        "--bench-rounds", metavar="N", type=_number(int), default=1,
        help="timing rounds, each: every batch size on --path, then on --bench-baseline; "
        "medians over rounds are reported (default 1; the documented protocol is 3)",
    )  # fmt: skip
    parser.add_argument(
        "--bench-bandwidth-gbs", metavar="X", type=_number(float), default=None,
        help="memory bandwidth (GB/s) for the roofline (default: measured by a 256 MiB copy)",
    )  # fmt: skip
    parser.add_argument(
        "--bench-peak-gflops", metavar="Y", type=_number(float), default=None,
        help="peak compute (GFLOP/s) for the roofline (default: measured by a 2048^3 matmul)",
    )  # fmt: skip
    return parser


def split_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this tool's ``--bench-*`` options, the rest: fairseq-generate's arguments)."""
    return bench_parser().parse_known_args(argv)


def _collate_fn(dataset, device):
    from fairseq import utils

    def collate(batch):
        sample = dataset.collater([dataset[i] for i in batch])
        return utils.move_to_cuda(sample) if device == "cuda" else sample

    return collate


def _batches(ids, batch_size):
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def time_batch_size(task, generator, models, dataset, ids, batch_size, device="cpu"):
    """Time generation over ``ids`` in batches of ``batch_size``; return the figures. On
    ``cuda`` each batch is copied to the GPU before its timer starts (as fairseq-generate copies
    it), and the GPU is synchronised before the timer stops."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    collate, batches = _collate_fn(dataset, device), _batches(ids, batch_size)
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
        "total_ms": 1000 * total,
    }


def median_runs(rounds, label):
    """Per batch size, the run of ``label`` whose tokens/s is the (lower) median over rounds."""
    picked = []
    for i in range(len(rounds[0][label])):
        runs = [r[label][i] for r in rounds]
        target = statistics.median_low(run["tokens_per_s"] for run in runs)
        picked.append(next(run for run in runs if run["tokens_per_s"] == target))
    return picked


def observe_generation(task, generator, models, dataset, ids, batch_size, device, beam):
    """One more, untimed pass under a ``StepProbe``: (decoder steps, a ``StepShape`` per
    model). Steps: ``forward_decoder`` calls, else the longest hypothesis of each batch."""
    from .step_roofline import StepProbe, StepShape

    collate, batches = _collate_fn(dataset, device), _batches(ids, batch_size)
    generated = source = longest = 0
    with StepProbe(generator, models) as probe, torch.no_grad():
        for batch in batches:
            sample = collate(batch)
            hypos = task.inference_step(generator, models, sample)
            generated += sum(int(h[0]["tokens"].numel()) for h in hypos)
            source += int(sample["net_input"]["src_lengths"].sum())
            longest += max(int(h["tokens"].numel()) for hs in hypos for h in hs)
    steps = len(probe.rows) if probe.counts_steps else longest
    rows = statistics.fmean(probe.rows) if probe.rows else len(ids) / len(batches) * beam
    shape = dict(rows=rows, cache_len=generated / len(ids) / 2, src_len=source / len(ids),
                 sentences=len(ids) / len(batches), beam=beam,
                 steps=steps / len(batches))  # fmt: skip
    return steps, [StepShape(**shape, experts_hit=probe.experts_hit(i)) for i in range(len(models))]


def compare(rounds, observed, contenders, sizes, machine) -> list[dict]:
    """Per batch size: each model's median tokens/s and ms per step over ``rounds``, its
    roofline (``observed[label][i]`` = (steps, shapes)), the measured and roofline ratios."""
    from .step_roofline import limit, step_cost

    figures = []
    for i, batch_size in enumerate(sizes):
        entry = {"batch_size": batch_size}
        for label, _, models in contenders:
            runs = [r[label][i] for r in rounds]
            steps, shapes = observed[label][i]
            costs = [step_cost(m, shape) for m, shape in zip(models, shapes, strict=True)]
            total = {k: sum(c[k] for c in costs) for k in ("bytes_per_step", "flops_per_step")}
            bound = limit(total, machine["bandwidth_gbs"], machine["peak_gflops"])
            entry[label] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "step_ms": statistics.median(r["total_ms"] / steps for r in runs),
                "steps": steps,
                "roofline": {**total, **bound, "models": costs},
            }
        main, base = entry["main"], entry["baseline"]
        entry["ratio"] = main["tokens_per_s"] / base["tokens_per_s"]
        entry["roofline_ratio"] = base["roofline"]["limit_ms"] / main["roofline"]["limit_ms"]
        figures.append(entry)
    return figures


def print_comparison(comparison: dict) -> None:
    machine = comparison["machine"]
    print(
        f"\nvs baseline {comparison['baseline']}: medians of {comparison['rounds']} round(s); "
        f"roofline at {machine['bandwidth_gbs']:.1f} GB/s, {machine['peak_gflops']:.1f} GFLOP/s"
    )
    print(
        "| batch | tok/s main | tok/s baseline | ratio main/baseline | roofline ms/step main | "
        "roofline ms/step baseline | roofline ratio | ms/step main | ms/step baseline |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for e in comparison["batch_sizes"]:
        m, b = e["main"], e["baseline"]
        print(
            f"| {e['batch_size']} | {m['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
            f"{e['ratio']:.3f} | {m['roofline']['limit_ms']:.4f} | "
            f"{b['roofline']['limit_ms']:.4f} | {e['roofline_ratio']:.3f} | "
            f"{m['step_ms']:.3f} | {b['step_ms']:.3f} |"
        )


def profile_generation(task, generator, models, dataset, ids, batch_size, device, top=12):
    """``measure.profile_top_ops`` over one more pass of ``time_batch_size``."""
    from .measure import profile_top_ops

    def run():
        time_batch_size(task, generator, models, dataset, ids, batch_size, device)

    return profile_top_ops(run, device, top)


def load_models(path, task, cfg, device):
    """The ensemble of ``path`` (``:``-separated), in eval mode, in --fp16/--bf16, on device."""
    from fairseq import checkpoint_utils, utils

    models, _ = checkpoint_utils.load_model_ensemble(utils.split_paths(path), task=task)
    for model in models:
        model.eval()
        if cfg.common.fp16:
            model.half()
        if cfg.common.bf16:
            model.bfloat16()
        if device == "cuda":
            model.cuda()
    return models


def main(argv=None) -> int:
    """CLI entry point; returns 0 (argument errors exit 2, as argparse does)."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    bench, rest = split_arguments(sys.argv[1:] if argv is None else list(argv))
    if {"-h", "--help"} & set(rest):  # this tool's options first, then fairseq-generate's
        print(bench_parser().format_help())
    sizes, max_sentences = bench.bench_batch_sizes, bench.bench_max_sentences
    out_json, threads, baseline = bench.bench_json, bench.bench_threads, bench.bench_baseline

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=rest)
    cfg = convert_namespace_to_omegaconf(args)
    if not cfg.common_eval.path or not os.path.isfile(cfg.common_eval.path):
        raise SystemExit(f"benchmark_generate: --path {cfg.common_eval.path}: no such checkpoint")
    if baseline is not None and not os.path.isfile(baseline):
        raise SystemExit(f"benchmark_generate: --bench-baseline {baseline}: no such checkpoint")
    torch.set_num_threads(threads)
    utils.import_user_module(cfg.common)

    task = tasks.setup_task(cfg.task)
    device = "cuda" if torch.cuda.is_available() and not cfg.common.cpu else "cpu"
    models = load_models(cfg.common_eval.path, task, cfg, device)
    contenders = [("main", task.build_generator(models, cfg.generation), models)]
    if baseline is not None:
        base_models = load_models(baseline, task, cfg, device)
        contenders.append(("baseline", task.build_generator(base_models, cfg.generation),
                           base_models))  # fmt: skip
    task.load_dataset(cfg.dataset.gen_subset)
    dataset = task.dataset(cfg.dataset.gen_subset)
    ids = list(range(len(dataset)))[: max_sentences or None]
    generator = contenders[0][1]

    rounds = []
    for r in range(bench.bench_rounds):  # each round: main at every size, then the baseline
        rounds.append({"round": r + 1})
        for label, gen, ms in contenders:
            rounds[-1][label] = [time_batch_size(task, gen, ms, dataset, ids, b, device)
                                 for b in sizes]  # fmt: skip
    results = {
        "checkpoint": cfg.common_eval.path,
        "subset": cfg.dataset.gen_subset,
        "beam": cfg.generation.beam,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "device": device,
        "torch": torch.__version__,
        "runs": median_runs(rounds, "main"),
    }
    print("| batch | sentences | p50 ms/batch | p95 ms/batch | ms/sentence | sent/s | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["runs"]:
        print(
            f"| {r['batch_size']} | {r['sentences']} | {r['batch_latency_ms_p50']:.1f} | "
            f"{r['batch_latency_ms_p95']:.1f} | {r['ms_per_sentence']:.1f} | "
            f"{r['sentences_per_s']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    if baseline is not None:
        from .step_roofline import machine_figures

        beam = cfg.generation.beam
        observed = {label: [observe_generation(task, gen, ms, dataset, ids, b, device, beam)
                            for b in sizes] for label, gen, ms in contenders}  # fmt: skip
        dtype = next(models[0].parameters()).dtype
        machine = machine_figures(bench.bench_bandwidth_gbs, bench.bench_peak_gflops, device, dtype)
        results["comparison"] = {
            "baseline": baseline,
            "rounds": bench.bench_rounds,
            "order": "each round: every batch size on main, then every batch size on baseline",
            "machine": machine,
            "per_round": rounds,
            "batch_sizes": compare(rounds, observed, contenders, sizes, machine),
        }
        print_comparison(results["comparison"])
    elif bench.bench_rounds > 1:
        results["rounds"] = rounds
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
