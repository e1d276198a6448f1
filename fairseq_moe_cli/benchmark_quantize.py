"""``fairseq-moe-benchmark-quantize``: fp32 and int8 checkpoints side by side (size, quality on
the test split, CPU latency).

    fairseq-moe-benchmark-quantize --checkpoint fp32=tr_off.pt --checkpoint int8=tr_dynamic.pt \\
        --data results/adapt14/data/data-bin --langs de,fr,es --out-dir results/quant

(or ``python scripts/benchmark_quantize.py ...``). The kind of benchmark follows the checkpoints'
task (all must share it):

- translation (``translation``, ``translation_multi_simple_epoch``): per target language of
  ``--langs``, ``fairseq-generate --user-dir fairseq_moe_plugin`` as a subprocess on the test
  split (beam ``--beam``, sentencepiece post-processing, the saved task's language tokens: the
  flags of examples/translation/run.py), scored by sacrebleu (``score_bleu``: BLEU with the
  target language's tokenizer, chrF). ``--max-sentences N`` scores the first N test sentences
  (a truncated copy of the binarised split, ``OUT/data-bin.<split><N>``). Latency: beam search
  in-process (``task.inference_step``: encoder, decoder, SequenceGenerator) on the first
  language's test sentences.
- classification (``sentence_prediction``): accuracy and macro-F1 (scikit-learn) of the
  classification head on the whole test split, as examples/classification/evaluate_classifier.py
  computes them. Latency: one forward (``features_only`` + the head).
- size: each checkpoint file's size in MiB.

Latency: per batch size (``--batch-sizes``, default 1,32), a fixed set of ``--latency-batches``
batches of consecutive test sentences; ``--warmup`` untimed batches first, then the set timed
``--repeats`` times, the checkpoints taking turns within each repeat (a load change on a shared
machine hits them all). p50/p95 over every timed batch (numpy's linear interpolation), in ms, on
``--threads`` torch threads (fairseq-generate gets the same count via OMP_NUM_THREADS).

Writes ``OUT/quant_bench.json``, ``OUT/quant_bench.md`` (one row per checkpoint) and the
fairseq-generate outputs under ``OUT/generate/``; prints the table. What this adds to
fairseq-generate and ``benchmark_generate``: the same test set and timing protocol for several
checkpoints and both kinds of task, in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np

from .quantize_latency import fixed_batches, time_all
from .score_bleu import parse_generate_output, score_all

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_moe_plugin"
MIB = 1024 * 1024


class BenchmarkError(ValueError):
    """A bad input (checkpoint spec, file, language, ...); main prints it and exits with 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fairseq-moe-benchmark-quantize", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   required=True, help="a checkpoint to compare (repeat)")  # fmt: skip
    p.add_argument("--data", type=Path, help="the task's data-bin (default: the saved one)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the batch set")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per batch size")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--latency-batches", type=int, default=8, help="distinct batches per size")
    p.add_argument("--split", default="test")
    tr = p.add_argument_group("translation")
    tr.add_argument("--langs", help="target languages, e.g. de,fr,es (default: the saved pairs')")
    tr.add_argument("--source-lang", help="default: the saved pairs' source")
    tr.add_argument("--max-sentences", type=int, default=0, help="score the first N (0: all)")
    tr.add_argument("--beam", type=int, default=5)
    tr.add_argument("--max-len-b", type=int, default=200, help="fairseq's max length (ax+b)")
    tr.add_argument("--post-process", default="sentencepiece", help="fairseq's --post-process")
    tr.add_argument("--tokenize", default="auto", help="sacrebleu BLEU tokenizer (score_bleu)")
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes {a.batch_sizes!r}: expected integers such as 1,32")
    if min(a.batch_sizes + [a.repeats, a.latency_batches, a.threads]) < 1 or a.warmup < 0:
        p.error("batch sizes, --repeats, --latency-batches and --threads must be >= 1")
    return a


def parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` strings -> {name: path}; BenchmarkError for a bad spec or missing file."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise BenchmarkError(f"--checkpoint {spec!r}: expected NAME=PATH (e.g. int8=q.pt)")
        if name in out:
            raise BenchmarkError(f"--checkpoint {spec!r}: the name {name!r} is used twice")
        if not Path(path).is_file():
            raise BenchmarkError(f"--checkpoint {name}: no checkpoint file {path}")
        out[name] = Path(path)
    return out


def _task_field(cfg, name, default=None):
    """A field of the saved task config (a DictConfig, or the legacy Namespace inside one)."""
    return getattr(cfg.task, name, default)


def checkpoint_info(path: Path) -> dict:
    """Task, int8 mode and the saved task config of a checkpoint (read with checkpoint_io)."""
    from fairseq_moe_plugin import checkpoint_io

    state = checkpoint_io.read_checkpoint_state(path)
    cfg = state["cfg"]
    task = _task_field(cfg, "_name") or getattr(state.get("args"), "task", None)
    if task == "sentence_prediction":
        kind = "classification"
    elif task in ("translation", "translation_multi_simple_epoch"):
        kind = "translation"
    else:
        raise BenchmarkError(f"{path}: task {task!r} is neither translation nor classification")
    int8 = str(getattr(cfg.model, "moe_int8", "off"))
    return {"task": task, "kind": kind, "int8": "off" if int8 == "None" else int8, "cfg": cfg}


# -- classification ------------------------------------------------------------------------------


def load(path: Path, data: Path | None, **overrides):
    """(model in eval mode, cfg, task) with the plugin's loader."""
    from fairseq_moe_plugin import checkpoint_io

    if data is not None:
        overrides["data"] = str(data)
    models, cfg, task = checkpoint_io.load_model_ensemble_and_task(path, arg_overrides=overrides)
    return models[0].eval(), cfg, task


def classify_test(model, task, head: str, split: str, batch_size: int = 64) -> dict:
    """Accuracy, macro-F1 and per-label F1 of the head on ``split``, as
    ``examples/classification/evaluate_classifier.py`` scores them."""
    from fairseq_moe_plugin.analysis.classification import evaluate

    return evaluate(model, task, head, split, batch_size)


def _classify(model, head: str, net_input: dict) -> None:
    """One forward of the encoder and the classification head (B x classes logits)."""
    model(**net_input, features_only=True, classification_head_name=head)


def bench_classification(a, ckpts: dict[str, Path], infos: dict) -> tuple[dict, dict]:
    """({name: quality}, {name: {batch size: latency}}) of sentence_prediction checkpoints."""
    models, quality = {}, {}
    for name, path in ckpts.items():
        model, cfg, task = load(path, a.data)
        head = getattr(cfg.criterion, "classification_head_name", "sentence_classification_head")
        quality[name] = classify_test(model, task, head, a.split)
        models[name] = (model, head)
        print(f"{name}: accuracy {quality[name]['accuracy']:.4f}, macro-F1 "
              f"{quality[name]['macro_f1']:.4f} ({quality[name]['n']} sentences)", flush=True)  # fmt: skip
    dataset = task.dataset(a.split)
    latency = {name: {} for name in ckpts}
    for bs in a.batch_sizes:
        batches = [b["net_input"] for b in fixed_batches(dataset, bs, a.latency_batches)]
        runners = {name: partial(_classify, m, h) for name, (m, h) in models.items()}
        for name, stats in time_all(runners, batches, a.repeats, a.warmup).items():
            latency[name][str(bs)] = stats
    return quality, latency


# -- translation ---------------------------------------------------------------------------------


def languages(a, cfg) -> tuple[str, list[str]]:
    """(source language, target languages) from the flags, else from the saved task."""
    pairs = _task_field(cfg, "lang_pairs") or []
    pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
    src = a.source_lang or _task_field(cfg, "source_lang") or (pairs and pairs[0].split("-")[0])
    tgts = a.langs.split(",") if a.langs else [p.split("-")[1] for p in pairs]
    if not tgts and _task_field(cfg, "target_lang"):
        tgts = [_task_field(cfg, "target_lang")]
    if not src or not tgts:
        raise BenchmarkError("cannot tell the languages from the checkpoint: give --source-lang "
                             "and --langs")  # fmt: skip
    return src, tgts


def task_flags(cfg, src: str, tgt: str, tgts: list[str]) -> list[str]:
    """fairseq-generate's task flags for src -> tgt, from the saved task (run.py's task_args)."""
    name = _task_field(cfg, "_name")
    flags = ["--task", name, "--source-lang", src, "--target-lang", tgt]
    if name != "translation_multi_simple_epoch":
        return flags
    flags += ["--lang-pairs", ",".join(f"{src}-{t}" for t in tgts)]
    langs = _task_field(cfg, "langs")
    if langs:
        flags += ["--langs", langs if isinstance(langs, str) else ",".join(langs)]
    if _task_field(cfg, "encoder_langtok"):
        flags += ["--encoder-langtok", _task_field(cfg, "encoder_langtok")]
    if _task_field(cfg, "decoder_langtok"):
        flags.append("--decoder-langtok")
    if _task_field(cfg, "lang_tok_replacing_bos_eos"):
        flags.append("--lang-tok-replacing-bos-eos")
    if _task_field(cfg, "lang_tok_style", "multilingual") != "multilingual":
        flags += ["--lang-tok-style", _task_field(cfg, "lang_tok_style")]
    return flags


def truncated_split(data: Path, split: str, src: str, tgts: list[str], n: int, out: Path) -> Path:
    """A data folder in ``out`` with ``data``'s files linked, and ``split`` of each src-tgt pair
    cut to its first ``n`` sentences (fairseq's mmap indexed datasets)."""
    from fairseq.data import Dictionary, indexed_dataset

    out.mkdir(parents=True, exist_ok=True)
    for f in data.iterdir():
        if not f.name.startswith(f"{split}."):
            (out / f.name).symlink_to(f.resolve())
    for tgt in tgts:
        for lang in (src, tgt):
            prefix = f"{split}.{src}-{tgt}.{lang}"
            if not indexed_dataset.MMapIndexedDataset.exists(str(data / prefix)):
                raise BenchmarkError(f"{data}: no binarised {prefix} (mmap .bin/.idx)")
            source = indexed_dataset.MMapIndexedDataset(str(data / prefix))
            vocab = len(Dictionary.load(str(data / f"dict.{lang}.txt")))
            builder = indexed_dataset.make_builder(str(out / f"{prefix}.bin"), "mmap", vocab)
            for i in range(min(n, len(source))):
                builder.add_item(source[i])
            builder.finalize(str(out / f"{prefix}.idx"))
    return out


def generate_and_score(a, name, path, cfg, data: Path, src, tgts) -> dict:
    """fairseq-generate per target language (a subprocess, the output kept), then sacrebleu."""
    gen_dir = a.out_dir / "generate"
    gen_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("fairseq-generate")
    cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "fairseq_cli.generate"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    corpora = []
    for tgt in tgts:
        out = gen_dir / f"{name}.{src}-{tgt}.txt"
        cmd = [*cmd0, str(data), "--user-dir", str(PLUGIN), *task_flags(cfg, src, tgt, tgts),
               "--gen-subset", a.split, "--path", str(path), "--beam", str(a.beam),
               "--max-len-b", str(a.max_len_b), "--batch-size", "64", "--cpu",
               "--post-process", a.post_process]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BenchmarkError(f"{name}: fairseq-generate failed (exit {proc.returncode}), "
                                 f"see {out}:\n{proc.stderr[-2000:]}")  # fmt: skip
        corpora.append(parse_generate_output(out, tgt))
    report = score_all(corpora, a.tokenize)
    return {"languages": {lang: {"bleu": r["bleu"]["score"], "chrf": r["chrf"]["score"],
                                 "sentences": r["num_sentences"], "tokenize": r["tokenize"],
                                 "generate_output": r["source"]["generate_output"]}
                          for lang, r in report["results"].items()},
            "bleu_avg": float(np.mean([r["bleu"]["score"] for r in report["results"].values()])),
            "chrf_avg": float(np.mean([r["chrf"]["score"] for r in report["results"].values()])),
            "bleu_signature": next(iter(report["results"].values()))["bleu"]["signature"]}  # fmt: skip


def _beam_search(task, generator, model, sample) -> int:
    """Beam search on one batch (as fairseq-generate runs it); the best hypotheses' tokens."""
    return sum(int(h[0]["tokens"].numel()) for h in task.inference_step(generator, [model], sample))


def bench_translation(a, ckpts: dict[str, Path], infos: dict) -> tuple[dict, dict]:
    """({name: quality}, {name: {batch size: latency}}) of translation checkpoints."""
    from fairseq.dataclass.configs import GenerationConfig

    cfg0 = next(iter(infos.values()))["cfg"]
    src, tgts = languages(a, cfg0)
    data = Path(a.data or _task_field(cfg0, "data"))
    quality = {}
    gen_data = data
    if a.max_sentences:  # kept, so that the commands in the generate outputs can be rerun
        gen_data = a.out_dir / f"data-bin.{a.split}{a.max_sentences}"
        shutil.rmtree(gen_data, ignore_errors=True)
        truncated_split(data, a.split, src, tgts, a.max_sentences, gen_data)
    for name, path in ckpts.items():
        quality[name] = generate_and_score(a, name, path, infos[name]["cfg"], gen_data, src, tgts)
        print(f"{name}: " + ", ".join(f"{lang} BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f}"
              for lang, r in quality[name]["languages"].items()), flush=True)  # fmt: skip
    gen = GenerationConfig(beam=a.beam, max_len_b=a.max_len_b)
    runners = {}
    for name, path in ckpts.items():  # latency on the first language's test sentences
        model, _, task = load(path, data, source_lang=src, target_lang=tgts[0])
        generator = task.build_generator([model], gen)
        runners[name] = partial(_beam_search, task, generator, model)
    task.load_dataset(a.split)
    latency = {name: {} for name in ckpts}
    for bs in a.batch_sizes:
        batches = fixed_batches(task.dataset(a.split), bs, a.latency_batches)
        for name, stats in time_all(runners, batches, a.repeats, a.warmup).items():
            latency[name][str(bs)] = stats
    for q in quality.values():
        q["latency_pair"] = f"{src}-{tgts[0]}"
    return quality, latency


# -- report --------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """A markdown table, one row per checkpoint."""
    sizes = report["settings"]["batch_sizes"]
    rows = report["checkpoints"]
    if report["kind"] == "classification":
        qual_head = ["accuracy", "macro-F1"]
        qual = {n: [f"{r['quality']['accuracy']:.4f}", f"{r['quality']['macro_f1']:.4f}"]
                for n, r in rows.items()}  # fmt: skip
    else:
        langs = list(next(iter(rows.values()))["quality"]["languages"])
        qual_head = [f"{m} {lang}" for m in ("BLEU", "chrF") for lang in langs] + [
            "BLEU avg", "chrF avg"]  # fmt: skip
        qual = {n: [f"{r['quality']['languages'][lang][m]:.2f}" for m in ("bleu", "chrf")
                    for lang in langs]
                + [f"{r['quality']['bleu_avg']:.2f}", f"{r['quality']['chrf_avg']:.2f}"]
                for n, r in rows.items()}  # fmt: skip
    lat_head = [f"b{b} {p} ms" for b in sizes for p in ("p50", "p95")]
    head = ["checkpoint", "int8", "size MiB", *qual_head, *lat_head]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n, r in rows.items():
        lat = [f"{r['latency'][str(b)][p]:.1f}" for b in sizes for p in ("p50_ms", "p95_ms")]
        cells = [n, r["int8"], f"{r['size_mib']:.2f}", *qual[n], *lat]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(a) -> dict:
    import torch

    import fairseq_moe_plugin  # noqa: F401  (registers the models, allow-lists checkpoints)

    ckpts = parse_checkpoints(a.checkpoint)
    infos = {name: checkpoint_info(path) for name, path in ckpts.items()}
    kinds = {info["kind"] for info in infos.values()}
    if len(kinds) > 1:
        raise BenchmarkError("the checkpoints mix translation and classification: "
                             + ", ".join(f"{n}: {i['task']}" for n, i in infos.items()))  # fmt: skip
    kind = kinds.pop()
    torch.set_num_threads(a.threads)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    bench = bench_translation if kind == "translation" else bench_classification
    quality, latency = bench(a, ckpts, infos)
    settings = {k: v for k, v in vars(a).items() if k not in ("checkpoint", "out_dir")}
    settings["data"] = None if a.data is None else str(a.data)
    return {"kind": kind, "task": infos[next(iter(infos))]["task"],
            "settings": settings, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "checkpoints": {n: {"path": str(p), "int8": infos[n]["int8"],
                                "size_mib": p.stat().st_size / MIB,
                                "quality": quality[n], "latency": latency[n]}
                            for n, p in ckpts.items()}}  # fmt: skip


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        report = run(a)
    except (ValueError, FileNotFoundError) as err:  # BenchmarkError, CheckpointError
        print(f"benchmark_quantize: error: {err}", file=sys.stderr)
        return 2
    table = format_table(report)
    (a.out_dir / "quant_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out_dir / "quant_bench.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
