"""Translation from ONNX against PyTorch: equal hypotheses and generation speed (a benchmark, not
a test).

    fairseq-moe-benchmark-onnx-generate CHECKPOINT --out-dir DIR [--data DATA_BIN] \\
        [--source-lang en --target-lang de] [--split test] [--max-sentences 64] [--beam 5] \\
        [--check-beams 1,5] [--batch-sizes 1,32] [--rounds 3] [--threads 1] [--reference-log LOG]

(or ``python -m fairseq_moe_cli.benchmark_onnx_generate ...``). The checkpoint is exported to
``DIR/onnx`` (``--part translation``: encoder, cross_kv, decoder_step). Both engines run through
the task's own ``build_generator`` and ``inference_step`` (what ``fairseq-generate`` runs: the
decoder language token as prefix for translation_multi_simple_epoch, stripped from the output),
on the first ``--max-sentences`` sentences of ``--split`` in dataset order. For every
``--check-beams`` value (batches of 32) it counts the sentences whose best hypothesis has the
same tokens under both engines; with ``--reference-log`` (a ``fairseq-generate`` log with
``H-<id>`` lines, at ``--beam``) it also counts the PyTorch and ONNX strings equal to it. Then,
for each batch size, one untimed round over all the sentences and ``--rounds`` timed rounds per
engine, alternating engines round by round; tokens/s is the generated tokens (hypothesis tokens,
``</s>`` included, the prefix not) over the round's wall time, and the median round is reported.
Both engines get ``--threads`` intra-op threads (onnxruntime's inter-op pool is 1). Writes
``DIR/benchmark_onnx_generate.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

PROG = "fairseq-moe-benchmark-onnx-generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="a trained moe_transformer or transformer checkpoint")
    p.add_argument("--out-dir", required=True, help="writes the export folder, JSON, markdown")
    p.add_argument("--data", help="the task's data folder (default: the one saved)")
    p.add_argument("--source-lang", help="the pair's source language (multilingual tasks)")
    p.add_argument("--target-lang", help="the pair's target language (multilingual tasks)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-sentences", type=int, default=64)
    p.add_argument("--beam", type=int, default=5, help="beam of the timed runs (default 5)")
    p.add_argument("--check-beams", default="1,5", help="beams of the equality check")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per engine and batch size")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, both engines")
    p.add_argument("--moe-op", choices=("plain", "fused", "qmoe"), default="plain")
    p.add_argument("--reference-log", help="a fairseq-generate log of the same sentences")
    return p


def _chunks(dataset, n: int, size: int) -> list:
    return [dataset.collater([dataset[i] for i in range(s, min(n, s + size))])
            for s in range(0, n, size)]  # fmt: skip


def _generate(task, generator, model, samples) -> tuple[dict, int]:
    """{sentence id: best hypothesis tokens}, and the tokens generated."""
    import torch

    out, produced = {}, 0
    with torch.inference_mode():
        for sample in samples:
            hypos = task.inference_step(generator, [model], sample)
            for sid, nbest in zip(sample["id"].tolist(), hypos, strict=True):
                tokens = nbest[0]["tokens"]
                out[sid] = tokens.tolist()
                produced += int(tokens.numel())
    return out, produced


def _generators(task, cfg, models: dict, beam: int) -> dict:
    from omegaconf import OmegaConf

    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    gen.update(beam=beam)
    return {name: task.build_generator([m], OmegaConf.create(gen)) for name, m in models.items()}


def reference_strings(path: Path) -> dict:
    """{sentence id: hypothesis string} of a fairseq-generate log's ``H-`` lines."""
    if not path.is_file():
        raise FileNotFoundError(f"--reference-log {path} does not exist")
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def benchmark(args) -> dict:
    import onnxruntime
    import torch

    from fairseq_moe_cli.export_onnx import load, require_serve_extra
    from fairseq_moe_plugin.deploy import onnx_generate as og

    require_serve_extra()
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    beams = [int(b) for b in args.check_beams.split(",") if b]
    if min([args.threads, args.rounds, args.beam, args.max_sentences, *sizes, *beams]) < 1:
        raise ValueError("--threads, --rounds, --beam, --max-sentences, --batch-sizes and "
                         "--check-beams must be >= 1")  # fmt: skip
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("source_lang", args.source_lang),
                                   ("target_lang", args.target_lang)) if v}  # fmt: skip
    model, cfg, task = load(args.checkpoint, None, args.data, overrides)
    out_dir = Path(args.out_dir)
    start = time.perf_counter()
    og.export_translation(model, task, cfg, out_dir / "onnx", args.moe_op, args.checkpoint)
    export_s = time.perf_counter() - start
    onnx_model, _, _, manifest = og.load_onnx_model(out_dir / "onnx", args.threads)
    models = {"pytorch": model, "onnxruntime": onnx_model}
    task.load_dataset(args.split)
    dataset = task.dataset(args.split)
    n = min(args.max_sentences, len(dataset))
    report = {"checkpoint": args.checkpoint, "split": args.split, "sentences": n,
              "threads": args.threads, "beam": args.beam, "moe_op": args.moe_op,
              "export_s": export_s, "moe_layers": manifest["model"]["moe_layers"],
              "equal_hypotheses": {}, "speed": {}}  # fmt: skip
    print(f"{PROG}: exported {out_dir / 'onnx'} in {export_s:.1f} s", flush=True)
    tgt = task.target_dictionary
    for beam in beams:
        gens = _generators(task, cfg, models, beam)
        hyps = {name: _generate(task, gens[name], m, _chunks(dataset, n, 32))[0]
                for name, m in models.items()}  # fmt: skip
        equal = sum(hyps["pytorch"][i] == hyps["onnxruntime"][i] for i in hyps["pytorch"])
        entry = {"equal": equal, "sentences": n}
        if args.reference_log and beam == args.beam:
            ref = reference_strings(Path(args.reference_log))
            strip = getattr(gens["pytorch"], "symbols_to_strip_from_output", None)
            for name, h in hyps.items():
                text = {i: tgt.string(torch.tensor(t), "sentencepiece",
                                      extra_symbols_to_ignore=strip) for i, t in h.items()}  # fmt: skip
                entry[f"{name}_equal_to_reference_log"] = sum(
                    text[i] == ref.get(i) for i in text)  # fmt: skip
        report["equal_hypotheses"][f"beam_{beam}"] = entry
        print(f"{PROG}: beam {beam}: {equal}/{n} hypotheses equal ({entry})", flush=True)
    gens = _generators(task, cfg, models, args.beam)
    for size in sizes:
        samples = _chunks(dataset, n, size)
        times = {name: [] for name in models}
        tokens = {}
        for name, m in models.items():  # untimed round
            tokens[name] = _generate(task, gens[name], m, samples)[1]
        for _ in range(args.rounds):
            for name, m in models.items():
                begin = time.perf_counter()
                _generate(task, gens[name], m, samples)
                times[name].append(time.perf_counter() - begin)
        for name in models:
            median = statistics.median(times[name])
            report["speed"].setdefault(name, {})[f"batch_{size}"] = {
                "tokens": tokens[name], "round_s": times[name], "median_s": median,
                "tokens_per_s": tokens[name] / median}  # fmt: skip
            print(f"{PROG}: batch {size}: {name}: {tokens[name] / median:.1f} tokens/s "
                  f"(median of {args.rounds} rounds, {median:.2f} s)", flush=True)  # fmt: skip
    report["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                          "python": platform.python_version(), "cpu": platform.processor()}  # fmt: skip
    return report


def markdown(report: dict) -> str:
    sizes = sorted({k for e in report["speed"].values() for k in e}, key=lambda k: int(k[6:]))
    head = "| engine |" + "".join(f" tokens/s ({k.replace('_', ' ')}) |" for k in sizes)
    rows = [head, "| --- |" + " ---: |" * len(sizes)]
    for name, e in report["speed"].items():
        rows.append(f"| {name} |" + "".join(f" {e[k]['tokens_per_s']:.1f} |" for k in sizes))
    eq = ", ".join(f"{k.replace('_', ' ')}: {v['equal']}/{v['sentences']}"
                   for k, v in report["equal_hypotheses"].items())  # fmt: skip
    return ("\n".join(rows) + f"\n\n{report['checkpoint']}, {report['sentences']} {report['split']}"
            f" sentences, beam {report['beam']}, {report['threads']} thread(s); equal "
            f"hypotheses {eq}.\n")  # fmt: skip


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = benchmark(args)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    (out_dir / "benchmark_onnx_generate.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "benchmark_onnx_generate.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
