#!/usr/bin/env python
"""The translation recipe end to end (what ``make demo`` runs).

1. corpus: English -> several languages from the gettext catalogues on this machine
   (scripts/build_gettext_corpus.py), or any parallel text given with ``--raw``;
2. joint sentencepiece + fairseq-preprocess (prepare_data.py);
3. fairseq-train with ``--user-dir fairseq_moe_plugin`` and fairseq's
   ``translation_multi_simple_epoch`` task, for a bounded wall-clock budget;
4. fairseq-generate (beam search) per language, sacrebleu BLEU and chrF on detokenised text;
5. FLOPs and parameters (scripts/flops.py), generation latency/throughput
   (scripts/benchmark_generate.py);
6. routing analysis of the test set under beam search (scripts/expert_usage.py), with the
   training log's loads over updates, in ``results/<run>/usage/``;
7. ``results/<run>/metrics.json`` and a table on the console.

Every step writes its log under ``results/<run>/``; a finished step is not redone when the run is
repeated with the same ``--run`` (delete the folder to start over).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
PLUGIN = REPO / "fairseq_moe_plugin"

# A CPU-sized translation model (2 cores train it at a few thousand words/s): a deep encoder and
# a shallow decoder (Kasai et al., 2021: most of the quality, a fraction of the decoding cost),
# width 256, 4 heads.
_SHAPE = ["--encoder-layers", "4", "--decoder-layers", "2", "--encoder-embed-dim", "256",
          "--decoder-embed-dim", "256", "--encoder-attention-heads", "4",
          "--decoder-attention-heads", "4"]  # fmt: skip


def _ffn(dim: int) -> list[str]:
    return ["--encoder-ffn-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(dim)]


MODEL_PRESETS = {
    # FFN 1024; every 2nd FFN is MoE (encoder layers 1, 3; decoder layer 1): 8 experts, top-2.
    "moe": ["--arch", "moe_transformer", *_SHAPE, *_ffn(1024), "--encoder-moe-freq", "2",
            "--decoder-moe-freq", "2", "--moe-expert-count", "8", "--moe-top-k", "2"],
    # Dense references (scripts/compare_dense_moe.py), every FFN dense, same shape otherwise.
    # Same FLOPs per token: FFN 1536 = (1024 + 2 * 1024) / 2, the mean active FFN width of a
    # dense and an MoE (top-2) layer, in both stacks; the router's d x E is left out.
    "dense_flops": ["--arch", "transformer", *_SHAPE, *_ffn(1536)],
    # Same parameters: FFN 4608 = (1024 + 8 * 1024) / 2 (the router's d x E aside).
    "dense_params": ["--arch", "transformer", *_SHAPE, *_ffn(4608)],
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, log_file: Path, stream_filter=None) -> str:
    """Run ``cmd``, its output to ``log_file``; lines matching ``stream_filter`` are echoed.
    Raises SystemExit naming the log on failure."""
    cmd = [str(c) for c in cmd]
    with open(log_file, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # fairseq logs to stdout: show it live
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=env)  # fmt: skip
        out = []
        for line in proc.stdout:
            f.write(line)
            out.append(line)
            if stream_filter is not None:
                shown = stream_filter(line)
                if shown:
                    print(shown, flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(out[-30:])
        raise SystemExit(f"step failed (exit {rc}): {' '.join(cmd[:2])} ... see {log_file}\n{tail}")
    return "".join(out)


def task_args(prep: dict) -> list[str]:
    langs = ",".join(prep["languages"])
    return ["--task", "translation_multi_simple_epoch", "--lang-pairs", ",".join(prep["pairs"]),
            "--langs", langs, "--encoder-langtok", "tgt", "--decoder-langtok"]  # fmt: skip


def epoch_line(line: str):
    """A compact per-epoch line from fairseq's json log lines."""
    start = line.find("{")
    if start < 0 or "| INFO | " not in line:
        return None
    try:
        stats = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    if "valid_loss" in stats:
        return (f"  epoch {stats.get('epoch')}: valid loss {stats['valid_loss']} "
                f"| balance {stats.get('valid_moe_balance_loss', '-')} "
                f"| updates {stats.get('valid_num_updates')}")  # fmt: skip
    if "| train_inner |" in line and "num_updates" in stats:
        return (f"  update {stats['num_updates']}: loss {stats.get('loss')} "
                f"| balance {stats.get('moe_balance_loss', '-')} "
                f"| dropped {stats.get('moe_dropped_frac', '-')} | wps {stats.get('wps')} "
                f"| wall {stats.get('wall')} s")  # fmt: skip
    if "train_loss" in stats:
        return (
            f"  epoch {stats.get('epoch')}: train loss {stats['train_loss']} "
            f"| wps {stats.get('train_wps')} | wall {stats.get('train_wall')} s"
        )
    return None


def json_stats(text: str, prefix: str) -> list[dict]:
    stats = []
    for line in text.splitlines():
        start = line.find("{")
        if start >= 0 and f'"{prefix}_' in line:
            try:
                stats.append(json.loads(line[start:]))
            except json.JSONDecodeError:
                pass
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="demo", help="results/<run> is the output folder")
    p.add_argument("--results", type=Path, default=REPO / "results")
    p.add_argument("--langs", default="de,fr,es", help="target languages (gettext codes)")
    p.add_argument("--raw", type=Path, help="your own parallel text instead of gettext")
    p.add_argument("--pairs", help="with --raw: the pairs, e.g. en-de,en-fr")
    p.add_argument("--data", type=Path, help="reuse a prepared work folder (prepare.json)")
    p.add_argument("--max-train-per-lang", type=int, default=0, help="0 = all")
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--budget-minutes", type=float, default=25.0, help="training wall clock")
    p.add_argument("--max-update", type=int, default=100000)
    p.add_argument("--model", default="moe", help="a key of MODEL_PRESETS")
    p.add_argument("--model-args", default="", help="extra fairseq-train flags (quoted)")
    p.add_argument("--bench-sentences", type=int, default=200)
    a = p.parse_args(argv)

    out = a.results / a.run
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()

    # 1-2. corpus and binarisation
    work = a.data or (out / "data")
    if not (work / "prepare.json").exists():
        if a.raw is None:
            raw = out / "corpus"
            pairs = ",".join(f"en-{lang}" for lang in a.langs.split(","))
            log(f"1/7 corpus: gettext catalogues, en -> {a.langs}")
            run([py, REPO / "scripts" / "build_gettext_corpus.py", "--langs", a.langs,
                 "--out", raw, "--valid-size", 300, "--test-size", a.test_size,
                 "--max-train-per-lang", a.max_train_per_lang], out / "corpus.log",
                lambda s: s.rstrip() or None)  # fmt: skip
        else:
            if not a.pairs:
                raise SystemExit("--raw needs --pairs (e.g. --pairs en-de)")
            raw, pairs = a.raw, a.pairs
        log(f"2/7 sentencepiece + fairseq-preprocess -> {work}")
        run([py, HERE / "prepare_data.py", "--raw", raw, "--pairs", pairs, "--out", work,
             "--vocab-size", a.vocab_size], out / "prepare.log",
            lambda s: s.rstrip() if "error" in s else None)  # fmt: skip
    prep = json.loads((work / "prepare.json").read_text())
    data_bin = work / "data-bin"

    # 3. training
    ckpt_dir = out / "checkpoints"
    ckpt = ckpt_dir / "checkpoint_best.pt"
    model_args = MODEL_PRESETS[a.model] + a.model_args.split()
    if not ckpt.exists():
        log(f"3/7 training {a.model} for at most {a.budget_minutes} min "
            f"(log: {out / 'train.log'})")  # fmt: skip
        run([BIN / "fairseq-train", data_bin, "--user-dir", PLUGIN, *task_args(prep),
             "--sampling-method", "temperature", "--sampling-temperature", "1.5",
             *model_args, "--share-all-embeddings",
             "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", "0.1",
             "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
             "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "200",
             "--clip-norm", "1.0", "--max-tokens", "2048", "--max-update", a.max_update,
             "--stop-time-hours", a.budget_minutes / 60, "--save-dir", ckpt_dir,
             "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "100",
             "--num-workers", "0", "--seed", "1"], out / "train.log", epoch_line)  # fmt: skip
    train_text = (out / "train.log").read_text()

    # 4. translate and score, per language
    log("4/7 beam search (beam 5) and sacrebleu, per language")
    scores_in = []
    for pair in prep["pairs"]:
        src, tgt = pair.split("-")
        gen = out / f"generate.{pair}.txt"
        if not gen.exists():
            text = run([BIN / "fairseq-generate", data_bin, "--user-dir", PLUGIN,
                        *task_args(prep), "--source-lang", src, "--target-lang", tgt,
                        "--gen-subset", "test", "--path", ckpt, "--beam", "5",
                        "--batch-size", "64", "--post-process", "sentencepiece"],
                       out / f"generate.{pair}.log")  # fmt: skip
            gen.write_text(text)
        scores_in += ["--generate-output", f"{tgt}={gen}"]
    run([py, REPO / "scripts" / "score_bleu.py", *scores_in, "--tokenize", "auto",
         "--json", out / "scores.json"], out / "score.log")  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())

    # 5. FLOPs, parameters, generation speed (first pair)
    log("5/7 FLOPs/parameters and generation latency")
    src, tgt = prep["pairs"][0].split("-")
    lang_args = [*task_args(prep), "--source-lang", src, "--target-lang", tgt]
    run([py, REPO / "scripts" / "flops.py", "--path", ckpt, "--data", data_bin,
         "--subset", "test", "--json", out / "flops.json", "--source-lang", src,
         "--target-lang", tgt],
        out / "flops.log")  # fmt: skip
    run([py, REPO / "scripts" / "benchmark_generate.py", data_bin, "--user-dir", PLUGIN,
         *lang_args, "--gen-subset", "test", "--path", ckpt, "--beam", "5",
         "--post-process", "sentencepiece", "--bench-batch-sizes", "1,32",
         "--bench-max-sentences", a.bench_sentences, "--bench-json", out / "latency.json"],
        out / "latency.log")  # fmt: skip

    # 6. routing analysis: which experts the test set's tokens use, per language
    usage = out / "usage"
    if not (usage / "summary.json").exists():
        log(f"6/7 routing analysis (beam 5) -> {usage}")
        run([py, REPO / "scripts" / "expert_usage.py", "--checkpoint", ckpt, "--data", data_bin,
             "--split", "test", "--generate", "--beam", "5", "--train-log", out / "train.log",
             "--out", usage], out / "usage.log")  # fmt: skip

    # 7. metrics.json and the table
    log("7/7 metrics")
    train_stats = json_stats(train_text, "train")
    epochs = [s for s in train_stats if "train_wps" in s and "train_inner" not in s]
    valid = json_stats(train_text, "valid")
    last_valid = valid[-1] if valid else {}
    flops = json.loads((out / "flops.json").read_text())
    latency = json.loads((out / "latency.json").read_text())
    load = {k[len("valid_"):]: v for k, v in last_valid.items()
            if k.startswith("valid_moe_")}  # fmt: skip
    metrics = {
        "run": a.run,
        "model": model_args,
        "languages": prep["pairs"],
        "bleu": {lang: r["bleu"]["score"] for lang, r in scores["results"].items()},
        "chrf": {lang: r["chrf"]["score"] for lang, r in scores["results"].items()},
        "scores": scores,
        "params": {"params_total": flops["parameters"]["total"],
                   "params_active_per_token": flops["parameters"]["active_per_token"]},
        "flops": {"gflops_per_target_token":
                  flops["fvcore"]["per_target_token"]["flops"] / 1e9,
                  "gflops_per_target_token_analytic":
                  flops["analytic"]["per_target_token"]["flops"] / 1e9,
                  "report": flops},
        "generation": latency,
        "train": {
            "updates": int(last_valid.get("valid_num_updates", 0) or 0),
            "epochs": len(epochs),
            "words_per_s": (statistics_mean([float(s["train_wps"]) for s in epochs])
                            if epochs else None),
            "budget_minutes": a.budget_minutes,
        },
        "expert_load_valid": load,
        "wall_minutes": (time.time() - t0) / 60,
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table(metrics)
    log(f"done in {metrics['wall_minutes']:.1f} min: {out / 'metrics.json'}")
    return 0


def statistics_mean(values):
    return sum(values) / len(values)


def print_table(m: dict) -> None:
    print("\n| language | BLEU | chrF | sentences |")
    print("| --- | --- | --- | --- |")
    for lang, r in m["scores"]["results"].items():
        print(f"| {lang} | {r['bleu']['score']:.2f} | {r['chrf']['score']:.2f} | "
              f"{r['num_sentences']} |")  # fmt: skip
    f, g = m["flops"], m["generation"]["runs"]
    print(f"\nparameters: total {m['params']['params_total']:,}, "
          f"active per token {m['params']['params_active_per_token']:,}")  # fmt: skip
    print(f"GFLOPs per target token: {f.get('gflops_per_target_token', float('nan')):.4f}")
    for r in g:
        print(f"generation batch {r['batch_size']}: {r['ms_per_sentence']:.1f} ms/sentence, "
              f"p50 {r['batch_latency_ms_p50']:.1f} / p95 {r['batch_latency_ms_p95']:.1f} ms "
              f"per batch, {r['sentences_per_s']:.1f} sent/s")  # fmt: skip
    print(f"training: {m['train']['updates']} updates, {m['train']['words_per_s']} words/s")


if __name__ == "__main__":
    sys.exit(main())
