#!/usr/bin/env python
"""Generation latency and throughput of a checkpoint on a data split, at several batch sizes.

Takes fairseq-generate's own arguments (data, --path, --task, --source-lang, --beam, ...) plus:

    --bench-batch-sizes 1,32   batch sizes to time (each over the same sentences, in order)
    --bench-max-sentences N    time only the first N sentences of the split (0 = all)
    --bench-json FILE          write the figures as JSON
    --bench-threads N          torch threads (default: all cores)

For each batch size it reports, over the split's sentences in dataset order (one warm-up batch
first, not timed): per-batch latency p50/p95 in ms (at batch size 1, the latency of one
sentence), mean ms per sentence (total time / sentences), sentences/s and generated tokens/s.
Timing covers ``task.inference_step`` (encoder, beam search, decoder), not data loading.
"""

import json
import os
import statistics
import sys
import time

import torch

import fairseq_moe_plugin  # noqa: F401  (allow-lists checkpoint globals, registers the models)


def _pop_option(argv, name, default):
    if name in argv:
        i = argv.index(name)
        if i + 1 >= len(argv):
            raise SystemExit(f"benchmark_generate: {name} needs a value")
        value = argv[i + 1]
        del argv[i : i + 2]
        return value
    return default


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_batch_size(task, generator, models, dataset, ids, batch_size):
    """Time generation over ``ids`` in batches of ``batch_size``; return the figures."""
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    warm = dataset.collater([dataset[i] for i in batches[0]])
    with torch.no_grad():
        task.inference_step(generator, models, warm)
    latencies, tokens = [], 0
    for batch in batches:
        sample = dataset.collater([dataset[i] for i in batch])
        start = time.perf_counter()
        with torch.no_grad():
            hypos = task.inference_step(generator, models, sample)
        latencies.append(time.perf_counter() - start)
        tokens += sum(int(h[0]["tokens"].numel()) for h in hypos)
    total = sum(latencies)
    return {
        "batch_size": batch_size,
        "sentences": len(ids),
        "batches": len(batches),
        "batch_latency_ms_p50": 1000 * percentile(latencies, 0.5),
        "batch_latency_ms_p95": 1000 * percentile(latencies, 0.95),
        "batch_latency_ms_mean": 1000 * statistics.fmean(latencies),
        "ms_per_sentence": 1000 * total / len(ids),
        "sentences_per_s": len(ids) / total,
        "tokens_per_s": tokens / total,
        "generated_tokens": tokens,
    }


def main(argv=None):
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = list(sys.argv[1:] if argv is None else argv)
    sizes = [int(b) for b in _pop_option(argv, "--bench-batch-sizes", "1,32").split(",")]
    max_sentences = int(_pop_option(argv, "--bench-max-sentences", "0"))
    out_json = _pop_option(argv, "--bench-json", None)
    threads = int(_pop_option(argv, "--bench-threads", str(os.cpu_count() or 1)))
    if any(b < 1 for b in sizes):
        raise SystemExit(f"benchmark_generate: batch sizes must be >= 1, got {sizes}")

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    if not cfg.common_eval.path or not os.path.isfile(cfg.common_eval.path):
        raise SystemExit(f"benchmark_generate: --path {cfg.common_eval.path}: no such checkpoint")
    torch.set_num_threads(threads)
    utils.import_user_module(cfg.common)

    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble(
        utils.split_paths(cfg.common_eval.path), task=task
    )
    for model in models:
        model.eval()
        if cfg.common.fp16:
            model.half()
        if torch.cuda.is_available() and not cfg.common.cpu:
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
        "device": "cuda" if torch.cuda.is_available() and not cfg.common.cpu else "cpu",
        "torch": torch.__version__,
        "runs": [time_batch_size(task, generator, models, dataset, ids, b) for b in sizes],
    }
    print("| batch | sentences | p50 ms/batch | p95 ms/batch | ms/sentence | sent/s | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["runs"]:
        print(
            f"| {r['batch_size']} | {r['sentences']} | {r['batch_latency_ms_p50']:.1f} | "
            f"{r['batch_latency_ms_p95']:.1f} | {r['ms_per_sentence']:.1f} | "
            f"{r['sentences_per_s']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    if out_json:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
