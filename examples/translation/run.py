#!/usr/bin/env python
"""The translation recipe end to end (what ``make demo`` runs).

1. corpus: English -> several languages from the gettext catalogues on this machine
   (build_gettext_corpus.py, beside this file), or any parallel text given with ``--raw``;
2. joint sentencepiece + fairseq-preprocess (prepare_data.py);
3. fairseq-train with ``--user-dir fairseq_moe_plugin`` and fairseq's
   ``translation_multi_simple_epoch`` task, for a bounded wall-clock budget (the model:
   ``presets.py``);
4. fairseq-generate (beam search) per language, sacrebleu BLEU and chrF on detokenised text
   (fairseq-moe-bleu);
5. FLOPs and parameters (fairseq-moe-flops), generation latency/throughput
   (fairseq-moe-benchmark-generate);
6. routing analysis of the test set under beam search (fairseq-moe-usage), with the training
   log's loads over updates, in ``results/<run>/usage/``; skipped for a dense model;
7. ``results/<run>/metrics.json`` and a table on the console.

``--seed`` is fairseq-train's seed; ``--threads N`` gives every step N torch threads
(``OMP_NUM_THREADS``, and the latency benchmark's ``--bench-threads``); ``--prepare-only`` stops
after step 2 (a study prepares its data once, then trains its runs with ``--data``);
``--no-routing-analysis`` skips step 6 (recorded in ``skipped``; the routing metrics of the last
validation and of the last training record are in ``metrics.json`` anyway: ``expert_load_valid``,
``expert_load_train``).

Every step writes its log under ``results/<run>/``; a finished step is not redone when the run is
repeated with the same ``--run`` (delete the folder to start over). Steps 5 and 6 are analyses:
one that fails or is skipped is recorded, with its reason, in ``metrics.json`` (``failed``,
``skipped``), and the run still ends with ``metrics.json`` and its table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from presets import MODEL_PRESETS

from fairseq_moe_cli.recipe_steps import (
    BIN,
    PLUGIN,
    PY,
    REPO,
    StepFailed,
    progress_line,
    run,
    training_stats,
)

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def task_args(prep: dict) -> list[str]:
    langs = ",".join(prep["languages"])
    return ["--task", "translation_multi_simple_epoch", "--lang-pairs", ",".join(prep["pairs"]),
            "--langs", langs, "--encoder-langtok", "tgt", "--decoder-langtok"]  # fmt: skip


# -- the steps -----------------------------------------------------------------------------------


def prepare(a, out: Path) -> tuple[dict, Path]:
    """Steps 1-2: the corpus and its binarisation (skipped when ``prepare.json`` exists)."""
    work = a.data or (out / "data")
    if not (work / "prepare.json").exists():
        if a.raw is None:
            raw = out / "corpus"
            pairs = ",".join(f"en-{lang}" for lang in a.langs.split(","))
            log(f"1/7 corpus: gettext catalogues, en -> {a.langs}")
            run([PY, HERE / "build_gettext_corpus.py", "--langs", a.langs, "--out", raw,
                 "--valid-size", 300, "--test-size", a.test_size,
                 "--max-train-per-lang", a.max_train_per_lang], out / "corpus.log",
                lambda s: s.rstrip() or None)  # fmt: skip
        else:
            raw, pairs = a.raw, a.pairs
        log(f"2/7 sentencepiece + fairseq-preprocess -> {work}")
        run([PY, HERE / "prepare_data.py", "--raw", raw, "--pairs", pairs, "--out", work,
             "--vocab-size", a.vocab_size], out / "prepare.log",
            lambda s: s.rstrip() if "error" in s else None)  # fmt: skip
    return json.loads((work / "prepare.json").read_text()), work / "data-bin"


def train(a, out: Path, prep: dict, data_bin: Path, model_args: list[str]) -> Path:
    """Step 3: fairseq-train for the budget (skipped when the checkpoint exists)."""
    ckpt_dir = out / "checkpoints"
    ckpt = ckpt_dir / "checkpoint_best.pt"
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
             "--num-workers", "0", "--seed", a.seed], out / "train.log", progress_line)  # fmt: skip
    return ckpt


def translate_and_score(out: Path, prep: dict, data_bin: Path, ckpt: Path) -> dict:
    """Step 4: beam search per language (skipped where its output exists), then sacrebleu."""
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
    run([BIN / "fairseq-moe-bleu", *scores_in, "--tokenize", "auto",
         "--json", out / "scores.json"], out / "score.log")  # fmt: skip
    return json.loads((out / "scores.json").read_text())


def count_flops(out: Path, prep: dict, data_bin: Path, ckpt: Path) -> dict:
    """Step 5a: parameters and FLOPs per token on the first pair's test set."""
    src, tgt = prep["pairs"][0].split("-")
    run([BIN / "fairseq-moe-flops", "--path", ckpt, "--data", data_bin, "--subset", "test",
         "--json", out / "flops.json", "--source-lang", src, "--target-lang", tgt],
        out / "flops.log")  # fmt: skip
    return json.loads((out / "flops.json").read_text())


def time_generation(a, out: Path, prep: dict, data_bin: Path, ckpt: Path) -> dict:
    """Step 5b: generation latency and throughput on the first pair's test set."""
    src, tgt = prep["pairs"][0].split("-")
    run([BIN / "fairseq-moe-benchmark-generate", data_bin, "--user-dir", PLUGIN,
         *task_args(prep), "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test",
         "--path", ckpt, "--beam", "5", "--post-process", "sentencepiece",
         "--bench-batch-sizes", "1,32", "--bench-max-sentences", a.bench_sentences,
         "--bench-json", out / "latency.json",
         *(["--bench-threads", a.threads] if a.threads else [])], out / "latency.log")  # fmt: skip
    return json.loads((out / "latency.json").read_text())


def analyse_routing(out: Path, data_bin: Path, ckpt: Path) -> dict:
    """Step 6: the routing analysis under beam search (skipped when its summary exists);
    returns what the summary lists: figures drawn and figures skipped with their reasons."""
    usage = out / "usage"
    if not (usage / "summary.json").exists():
        log(f"6/7 routing analysis (beam 5) -> {usage}")
        run([BIN / "fairseq-moe-usage", "--checkpoint", ckpt, "--data", data_bin,
             "--split", "test", "--generate", "--beam", "5", "--train-log", out / "train.log",
             "--out", usage], out / "usage.log",
            lambda s: s.rstrip() if s.startswith("expert_usage:") else None)  # fmt: skip
    summary = json.loads((usage / "summary.json").read_text())
    return {"summary": str(usage / "summary.json"), "figures": sorted(summary["figures"]),
            "skipped": summary["skipped"]}  # fmt: skip


def optional(name: str, status: dict, fn, *args):
    """Run an analysis step; a failure is recorded in ``status["failed"]`` (with the message
    naming its log) and printed, not raised. Returns the step's result or None."""
    try:
        return fn(*args)
    except (StepFailed, OSError, ValueError, KeyError) as err:
        status["failed"][name] = str(err).splitlines()[0]
        log(f"{name} failed, the run goes on without it: {status['failed'][name]}")
        return None


def routing_skip_reason(flops: dict | None) -> str | None:
    """Why the routing analysis does not apply (a dense model), from ``flops.json``; None when
    it does or when that is unknown (the step then runs and may fail, which is recorded)."""
    if flops is not None and not flops["parameters"]["moe_layers"]:
        return "the model has no MoE layer (flops.json lists none): nothing is routed"
    return None


# -- metrics -------------------------------------------------------------------------------------


def collect_metrics(a, out: Path, model_args, prep, scores, results: dict, status) -> dict:
    """Step 7's ``metrics.json``: what every step produced, and what was skipped or failed."""
    flops, latency = results["flops"], results["latency"]
    train, load, train_routing = training_stats(out / "train.log", a.budget_minutes)
    params = flops and {"params_total": flops["parameters"]["total"],
                        "params_active_per_token": flops["parameters"]["active_per_token"]}  # fmt: skip
    gflops = flops and {
        "gflops_per_target_token": flops["fvcore"]["per_target_token"]["flops"] / 1e9,
        "gflops_per_target_token_analytic": flops["analytic"]["per_target_token"]["flops"] / 1e9,
        "report": flops,
    }
    return {
        "run": a.run,
        "model": model_args,
        "seed": a.seed,
        "threads": a.threads or None,
        "languages": prep["pairs"],
        "bleu": {lang: r["bleu"]["score"] for lang, r in scores["results"].items()},
        "chrf": {lang: r["chrf"]["score"] for lang, r in scores["results"].items()},
        "scores": scores,
        "params": params,
        "flops": gflops,
        "generation": latency,
        "train": train,
        "expert_load_valid": load,
        "expert_load_train": train_routing,
        "routing_analysis": results["routing"],
        "skipped": status["skipped"],
        "failed": status["failed"],
    }


def print_table(m: dict) -> None:
    print("\n| language | BLEU | chrF | sentences |")
    print("| --- | --- | --- | --- |")
    for lang, r in m["scores"]["results"].items():
        print(f"| {lang} | {r['bleu']['score']:.2f} | {r['chrf']['score']:.2f} | "
              f"{r['num_sentences']} |")  # fmt: skip
    if m["params"] is not None:
        print(f"\nparameters: total {m['params']['params_total']:,}, "
              f"active per token {m['params']['params_active_per_token']:,}")  # fmt: skip
        print(f"GFLOPs per target token: {m['flops']['gflops_per_target_token']:.4f}")
    for r in (m["generation"] or {}).get("runs", []):
        print(f"generation batch {r['batch_size']}: {r['ms_per_sentence']:.1f} ms/sentence, "
              f"p50 {r['batch_latency_ms_p50']:.1f} / p95 {r['batch_latency_ms_p95']:.1f} ms "
              f"per batch, {r['sentences_per_s']:.1f} sent/s")  # fmt: skip
    print(f"training: {m['train']['updates']} updates, {m['train']['words_per_s']} words/s")
    for kind in ("skipped", "failed"):
        for step, reason in m[kind].items():
            print(f"{kind}: {step}: {reason}")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
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
    p.add_argument("--model", default="moe", choices=sorted(MODEL_PRESETS), help="presets.py")
    p.add_argument("--model-args", default="", help="extra fairseq-train flags (quoted)")
    p.add_argument("--bench-sentences", type=int, default=200)
    p.add_argument("--seed", type=int, default=1, help="fairseq-train's --seed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every step (OMP_NUM_THREADS); 0 = torch's default")  # fmt: skip
    p.add_argument("--prepare-only", action="store_true",
                   help="stop after the corpus and its binarisation (steps 1-2)")  # fmt: skip
    p.add_argument("--no-routing-analysis", action="store_true",
                   help="skip step 6, the routing analysis under beam search")  # fmt: skip
    a = p.parse_args(argv)
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    if a.raw is not None and not a.pairs:
        p.error("--raw needs --pairs (e.g. --pairs en-de)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = a.results / a.run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_args = MODEL_PRESETS[a.model] + a.model_args.split()
    if a.threads:  # every step's subprocesses inherit it (torch reads it when it starts)
        os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    try:
        prep, data_bin = prepare(a, out)
        if a.prepare_only:
            log(f"prepared {data_bin} (--prepare-only)")
            return 0
        ckpt = train(a, out, prep, data_bin, model_args)
        scores = translate_and_score(out, prep, data_bin, ckpt)
    except StepFailed as err:  # no results to report without a model and its translations
        raise SystemExit(str(err)) from None

    status = {"skipped": {}, "failed": {}}
    log("5/7 FLOPs/parameters and generation latency")
    results = {
        "flops": optional("flops", status, count_flops, out, prep, data_bin, ckpt),
        "latency": optional("latency", status, time_generation, a, out, prep, data_bin, ckpt),
        "routing": None,
    }
    reason = routing_skip_reason(results["flops"])
    if reason is None and a.no_routing_analysis:
        reason = "--no-routing-analysis"
    if reason is not None:
        status["skipped"]["routing_analysis"] = reason
        log(f"6/7 routing analysis skipped: {reason}")
    else:
        results["routing"] = optional(
            "routing_analysis", status, analyse_routing, out, data_bin, ckpt
        )

    log("7/7 metrics")
    metrics = collect_metrics(a, out, model_args, prep, scores, results, status)
    metrics["wall_minutes"] = (time.time() - t0) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table(metrics)
    log(f"done in {metrics['wall_minutes']:.1f} min: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
