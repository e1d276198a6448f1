#!/usr/bin/env python
"""Routing methods compared fairly: the same data, wall-clock budget, active FLOPs per token and
seeds for every variant (the README's "Routing methods" table).

Prepares the data once (``run.py --prepare-only``), then trains every variant of
``presets.ROUTING_VARIANTS`` with run.py (one subprocess per run, ``--data`` reused) once per
seed, and reads each run's ``metrics.json``. Writes ``results/<prefix>/routing_study.json`` (every
figure of every run, and per variant the mean and spread over seeds) and ``routing_study.md``:

- BLEU and chrF per language, mean ± spread (spread: half the range over seeds, for 2 seeds
  half their difference), and the mean BLEU difference from the baseline (the first variant,
  top-2) with whether it exceeds the seeds' spread;
- the largest and smallest expert share of any MoE layer and the router's entropy (last
  validation), the share of assignments capacity dropped (last training record), under expert
  choice the share of tokens no expert took and the experts per token;
- training words/s and updates, generation sentences/s, GFLOPs per target token.

    python examples/translation/routing_study.py --prefix routing16 --seeds 1,2 --parallel 2 \
        --budget-minutes 3 --run-args '--test-size 150 --bench-sentences 100'

``--parallel 2`` trains the seeds of a variant at the same time, each with ``--threads`` torch
threads (default: cores / parallel), so every variant gets the same treatment. A run whose
``metrics.json`` exists is read, not redone (delete its folder to redo it); a run that fails is
listed under ``failed`` and the study goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from presets import ROUTING_VARIANTS

from fairseq_moe_plugin.naming import layer_metric, parse_load_metric

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN = HERE / "run.py"
BASELINE = next(iter(ROUTING_VARIANTS))
# The per-run figures besides BLEU and chrF, in table order: (key, column, format).
FIGURES = (
    ("max_load", "max load", ".3f"),
    ("min_load", "min load", ".3f"),
    ("dropped_frac", "dropped (train)", ".3f"),
    ("entropy", "entropy", ".3f"),
    ("unchosen_frac", "unchosen", ".3f"),
    ("experts_per_token", "experts/token", ".2f"),
    ("train_words_per_s", "train words/s", ".0f"),
    ("gen_sent_per_s_bs32", "gen sent/s (bs 32)", ".1f"),
    ("gen_sent_per_s_bs1", "gen sent/s (bs 1)", ".1f"),
    ("gflops_per_token", "GFLOPs/tgt token", ".4f"),
    ("updates", "updates", ".0f"),
)


def run_name(prefix: str, variant: str, seed: int) -> str:
    return f"{prefix}_{variant}_s{seed}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def routing_summary(valid: dict, train: dict) -> dict:
    """Routing figures from the routing metrics (``naming.py`` names) of a run's last validation
    (``valid``, metrics.json's ``expert_load_valid``) and last training record (``train``,
    ``expert_load_train``); every figure None where the run has none (a dense model).

    ``max_load``/``min_load``: the largest and smallest expert share of any MoE layer (uniform:
    1/E); ``entropy``: the router's mean entropy per token (nats); ``dropped_frac``: the share of
    assignments capacity dropped in training (validation routes dropless by default);
    ``unchosen_frac``/``experts_per_token``: under expert choice, the share of tokens no expert
    took and the experts per token, averaged over the expert-choice layers (validation)."""
    shares: dict[str, list[float]] = {}
    for name, value in valid.items():
        parsed = parse_load_metric(name)
        if parsed is not None:
            shares.setdefault(parsed[0], []).append(value)

    def over_layers(stat):
        names = (layer_metric(layer, stat) for layer in shares)
        return _mean([valid[name] for name in names if name in valid])

    return {
        "max_load": max((max(s) for s in shares.values()), default=None),
        "min_load": min((min(s) for s in shares.values()), default=None),
        "entropy": valid.get("moe_entropy"),
        "dropped_frac": train.get("moe_dropped_frac"),
        "unchosen_frac": over_layers("unchosen_frac"),
        "experts_per_token": over_layers("experts_per_token"),
    }


def run_figures(m: dict) -> dict:
    """One run's figures from its ``metrics.json`` (None where a step did not produce one)."""
    runs = {r["batch_size"]: r for r in (m.get("generation") or {}).get("runs", [])}
    figures = {
        "bleu": dict(m["bleu"]),
        "chrf": dict(m["chrf"]),
        "bleu_mean": _mean(list(m["bleu"].values())),
        "chrf_mean": _mean(list(m["chrf"].values())),
        **routing_summary(m.get("expert_load_valid") or {}, m.get("expert_load_train") or {}),
        "train_words_per_s": m["train"]["words_per_s"],
        "gen_sent_per_s_bs32": runs[32]["sentences_per_s"] if 32 in runs else None,
        "gen_sent_per_s_bs1": runs[1]["sentences_per_s"] if 1 in runs else None,
        "gflops_per_token": (m.get("flops") or {}).get("gflops_per_target_token"),
        "updates": m["train"]["updates"],
    }
    return figures


def stat(values: list) -> dict | None:
    """``{"mean", "spread", "values"}`` of the values that are not None (spread: half their
    range); None when there is none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"mean": _mean(present), "spread": (max(present) - min(present)) / 2,
            "values": present}  # fmt: skip


def aggregate(per_seed: list[dict]) -> dict:
    """Per figure (``run_figures``'s keys; per language for BLEU and chrF) the ``stat`` over
    the seeds' runs."""
    out = {}
    for key, first in per_seed[0].items():
        if isinstance(first, dict):
            out[key] = {lang: stat([f[key].get(lang) for f in per_seed]) for lang in first}
        else:
            out[key] = stat([f[key] for f in per_seed])
    return out


def versus(variant: dict | None, baseline: dict | None) -> dict | None:
    """The mean BLEU difference of a variant from the baseline (``stat``s of the mean BLEU) and
    whether it exceeds the seeds' spread: ``beats`` / ``worse`` when the difference is larger
    than the two spreads added (for 2 seeds: the seeds' ranges do not overlap), ``within
    spread`` otherwise, ``1 seed`` when either has a single seed (no spread to compare with)."""
    if variant is None or baseline is None:
        return None
    diff = variant["mean"] - baseline["mean"]
    if min(len(variant["values"]), len(baseline["values"])) < 2:
        verdict = "1 seed"
    elif abs(diff) > variant["spread"] + baseline["spread"]:
        verdict = "beats" if diff > 0 else "worse"
    else:
        verdict = "within spread"
    return {"diff": diff, "verdict": verdict}


def cell(s: dict | None, fmt: str = ".1f") -> str:
    """``mean ± spread`` (the mean alone for one seed), "-" for a figure no run has."""
    if s is None:
        return "-"
    text = format(s["mean"], fmt)
    return f"{text} ± {format(s['spread'], fmt)}" if len(s["values"]) > 1 else text


def markdown(study: dict) -> str:
    """The study's tables: BLEU, chrF, routing and speed (variants in ``study`` order)."""
    variants = study["variants"]
    langs = study["langs"]
    bleu_head = ["variant", *langs, "mean", f"vs {study['baseline']}"]
    tables = {"BLEU": ["| " + " | ".join(bleu_head) + " |", "|" + " --- |" * len(bleu_head)],
              "chrF": ["| " + " | ".join(["variant", *langs, "mean"]) + " |",
                       "|" + " --- |" * (len(langs) + 2)]}  # fmt: skip
    head = ["variant", *[column for _, column, _ in FIGURES]]
    routing = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, v in variants.items():
        s = v["stats"]
        vs = v["vs_baseline"]
        vs_cell = "baseline" if name == study["baseline"] else (
            "-" if vs is None else f"{vs['diff']:+.1f} ({vs['verdict']})")  # fmt: skip
        tables["BLEU"].append("| " + " | ".join(
            [name, *[cell(s["bleu"].get(lang)) for lang in langs], cell(s["bleu_mean"]),
             vs_cell]) + " |")  # fmt: skip
        tables["chrF"].append("| " + " | ".join(
            [name, *[cell(s["chrf"].get(lang)) for lang in langs], cell(s["chrf_mean"])]) + " |")  # fmt: skip
        routing.append("| " + " | ".join(
            [name, *[cell(s[key], fmt) for key, _, fmt in FIGURES]]) + " |")  # fmt: skip
    failed = [f"- {run}: {why}" for run, why in study["failed"].items()]
    parts = [f"BLEU (mean ± spread over seeds {study['seeds']})", *tables["BLEU"], "",
             "chrF", *tables["chrF"], "", "Routing (last validation; dropped: last training "
             "record) and speed", *routing, "", study["machine"]]  # fmt: skip
    if failed:
        parts += ["", "Failed runs (no figures):", *failed]
    return "\n".join(parts) + "\n"


def study_from_runs(metrics: dict, seeds: list[int], langs: list[str], machine: str,
                    failed: dict) -> dict:  # fmt: skip
    """The study (what routing_study.json holds) from ``{variant: {seed: metrics.json}}``."""
    variants = {}
    for name, by_seed in metrics.items():
        if not by_seed:
            continue
        per_seed = [run_figures(by_seed[s]) for s in seeds if s in by_seed]
        preset, args = ROUTING_VARIANTS.get(name, (None, []))
        variants[name] = {"preset": preset, "args": args, "seeds": sorted(by_seed),
                          "runs": {s: run_figures(m) for s, m in by_seed.items()},
                          "stats": aggregate(per_seed)}  # fmt: skip
    base = variants.get(BASELINE, {}).get("stats", {}).get("bleu_mean")
    for name, v in variants.items():
        v["vs_baseline"] = None if name == BASELINE else versus(v["stats"]["bleu_mean"], base)
    return {"baseline": BASELINE, "seeds": seeds, "langs": langs, "machine": machine,
            "variants": variants, "failed": failed}  # fmt: skip


# -- running -------------------------------------------------------------------------------------


def run_cmd(a, run: str, extra: list) -> list[str]:
    return [str(c) for c in [sys.executable, RUN, "--run", run, "--results", a.results,
                             "--langs", a.langs, "--max-train-per-lang", a.max_train_per_lang,
                             "--data", a.results / f"{a.prefix}_data", "--threads", a.threads,
                             *extra, *a.run_args.split()]]  # fmt: skip


def launch(a, variant: str, seed: int):
    """Start one run (output to its log); returns (Popen, log path) or None when it is done."""
    run = run_name(a.prefix, variant, seed)
    if (a.results / run / "metrics.json").exists():
        print(f"[study] {run}: metrics.json exists, reused", flush=True)
        return None
    preset, args = ROUTING_VARIANTS[variant]
    cmd = run_cmd(a, run, ["--model", preset, "--model-args", " ".join(args), "--seed", seed,
                           "--budget-minutes", a.budget_minutes, "--no-routing-analysis"])  # fmt: skip
    log_path = a.results / a.prefix / "logs" / f"{run}.log"
    print(f"[study] {run}: {shlex.join(cmd[1:])}\n        log: {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, log_path


def train_all(a, variants: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """Every (variant, seed) run, ``a.parallel`` seeds of a variant at a time; returns
    ``({variant: {seed: metrics.json}}, {run: why it failed})``."""
    metrics, failed = {v: {} for v in variants}, {}
    for variant in variants:
        for i in range(0, len(seeds), a.parallel):
            start = time.time()
            group = {s: launch(a, variant, s) for s in seeds[i : i + a.parallel]}
            for seed, started in group.items():
                run = run_name(a.prefix, variant, seed)
                if started is not None:
                    rc = started[0].wait()
                    if rc != 0:
                        failed[run] = f"run.py exited {rc}, see {started[1]}"
                        print(f"[study] {run} FAILED: {failed[run]}", flush=True)
                        continue
                metrics[variant][seed] = json.loads((a.results / run / "metrics.json").read_text())
            print(f"[study] {variant} seeds {list(group)}: {(time.time() - start) / 60:.1f} min",
                  flush=True)  # fmt: skip
    return metrics, failed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="routing", help="results/<prefix>_<variant>_s<seed>/")
    p.add_argument("--langs", default="de,fr,es,ru,ja", help="target languages (gettext)")
    p.add_argument("--budget-minutes", type=float, default=3.0, help="training, per run")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--variants", default=",".join(ROUTING_VARIANTS),
                   help=f"presets.ROUTING_VARIANTS names; the baseline {BASELINE} first")  # fmt: skip
    p.add_argument("--parallel", type=int, default=1, help="seeds of a variant run at once")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (default: cores / --parallel)")  # fmt: skip
    p.add_argument("--max-train-per-lang", type=int, default=0, help="0 = all")
    p.add_argument("--results", type=Path, default=REPO / "results")
    p.add_argument("--run-args", default="", help="more run.py flags for every run (quoted), "
                   "e.g. '--test-size 20 --bench-sentences 5' for a quick check")  # fmt: skip
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    unknown = [v for v in a.variants if v not in ROUTING_VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(ROUTING_VARIANTS)}")
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    if a.parallel < 1 or a.threads < 0:
        p.error("--parallel must be >= 1 and --threads >= 0")
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.parallel)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = a.results / a.prefix
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[study] preparing the data once: {a.results / f'{a.prefix}_data'}", flush=True)
    rc = subprocess.run(run_cmd(a, f"{a.prefix}_data", ["--prepare-only"]), cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"[study] data preparation failed (exit {rc})")
    metrics, failed = train_all(a, a.variants, a.seeds)
    machine = (f"{os.cpu_count()} cores; {a.parallel} run(s) at a time with {a.threads} torch "
               f"thread(s) each; training budget {a.budget_minutes:g} min per run; study wall "
               f"clock {(time.time() - t0) / 60:.0f} min")  # fmt: skip
    study = study_from_runs(metrics, a.seeds, a.langs.split(","), machine, failed)
    study["command"] = shlex.join(["python", "examples/translation/routing_study.py",
                                   *(argv if argv is not None else sys.argv[1:])])  # fmt: skip
    (out / "routing_study.json").write_text(json.dumps(study, indent=2) + "\n")
    text = markdown(study)
    (out / "routing_study.md").write_text(f"`{study['command']}`\n\n{text}")
    print(text)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
