#!/usr/bin/env python
"""MoE vs dense on the same data and the same training wall clock (what ``make compare`` runs).

Trains, with run.py (one subprocess per model) and the same prepared data, the models of
presets.py:
(a) ``moe``: the recipe's MoE model;
(b) ``dense_flops``: a dense model with the MoE model's active FLOPs per token;
(c) ``dense_params``: a dense model with the MoE model's total parameters;
then prints one markdown table (BLEU and chrF per language, FLOPs/token, parameters, training
words/s, generation sentences/s) and writes it with the figures to ``results/<prefix>/``.

    python examples/translation/compare_dense_moe.py --langs de,fr,es,ru --budget-minutes 10

A cell whose number a run could not produce (an analysis step that failed; run.py records why in
its metrics.json) shows "-".
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from presets import COMPARED

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN = HERE / "run.py"


def _number(value, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value / scale`` formatted, or "-" for a number the run does not have."""
    return "-" if value is None else format(value / scale, fmt) + suffix


def table(rows: dict) -> str:
    langs = list(next(iter(rows.values()))["bleu"])
    head = ["model", *[f"BLEU {lang}" for lang in langs], "BLEU mean", "chrF mean",
            "GFLOPs/tgt token", "params total", "params active", "updates",
            "train words/s", "gen sent/s (bs 32)", "gen tok/s (bs 32)", "gen ms/sent (bs 1)",
            "gen tok/s (bs 1)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in rows.items():
        bleu = [m["bleu"][lang] for lang in langs]
        chrf = [m["chrf"][lang] for lang in langs]
        runs = {r["batch_size"]: r for r in (m["generation"] or {}).get("runs", [])}
        flops, params = m["flops"] or {}, m["params"] or {}
        cells = [name, *[f"{b:.1f}" for b in bleu], f"{sum(bleu) / len(bleu):.1f}",
                 f"{sum(chrf) / len(chrf):.1f}",
                 _number(flops.get("gflops_per_target_token"), ".4f"),
                 _number(params.get("params_total"), ".1f", 1e6, "M"),
                 _number(params.get("params_active_per_token"), ".1f", 1e6, "M"),
                 str(m["train"]["updates"]), _number(m["train"]["words_per_s"], ".0f"),
                 f"{runs[32]['sentences_per_s']:.1f}" if 32 in runs else "-",
                 f"{runs[32]['tokens_per_s']:.0f}" if 32 in runs else "-",
                 f"{runs[1]['ms_per_sentence']:.0f}" if 1 in runs else "-",
                 f"{runs[1]['tokens_per_s']:.0f}" if 1 in runs else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_ratios(rows: dict, reference: str = "dense_flops") -> list[str]:
    """MoE speed over the FLOP-matched dense model's: training words/s and generation tokens/s
    per batch size (the targets of the performance section); empty without both models."""
    if "moe" not in rows or reference not in rows:
        return []

    def speeds(m):
        out = {"train words/s": m["train"]["words_per_s"]}
        for r in (m["generation"] or {}).get("runs", []):
            out[f"gen tok/s (bs {r['batch_size']})"] = r["tokens_per_s"]
        return out

    moe, ref = speeds(rows["moe"]), speeds(rows[reference])
    return [
        f"moe / {reference}, {name}: {moe[name] / ref[name]:.2f}"
        for name in moe
        if moe[name] and ref.get(name)
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="compare", help="results/<prefix>_<model>/ per model")
    p.add_argument("--langs", default="de,fr,es,ru")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--max-train-per-lang", type=int, default=0)
    p.add_argument("--models", default=",".join(COMPARED), help="presets.py names")
    p.add_argument("--results", type=Path, default=REPO / "results")
    p.add_argument("--run-args", default="", help="more run.py flags for every model (quoted), "
                   "e.g. '--test-size 20 --bench-sentences 5' for a quick check")  # fmt: skip
    a = p.parse_args(argv)
    models = a.models.split(",")
    unknown = [m for m in models if m not in COMPARED]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(COMPARED)}")

    data = a.results / f"{a.prefix}_data"
    rows = {}
    for model in models:
        # The first run builds the data, the others reuse it.
        cmd = [sys.executable, RUN, "--run", f"{a.prefix}_{model}", "--results", a.results,
               "--model", model, "--budget-minutes", a.budget_minutes, "--langs", a.langs,
               "--max-train-per-lang", a.max_train_per_lang, "--data", data,
               *a.run_args.split()]  # fmt: skip
        print(f"[compare] {model}: {' '.join(map(str, cmd[1:]))}", flush=True)
        start = time.time()
        rc = subprocess.run([str(c) for c in cmd], cwd=REPO).returncode
        if rc != 0:
            raise SystemExit(f"[compare] {model} failed (exit {rc})")
        metrics = json.loads((a.results / f"{a.prefix}_{model}" / "metrics.json").read_text())
        rows[model] = metrics
        print(f"[compare] {model} done in {(time.time() - start) / 60:.1f} min", flush=True)

    md = table(rows)
    out = a.results / a.prefix
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} cores, torch threads default; budget {a.budget_minutes} min each"
    ratios = speed_ratios(rows)
    text = "\n\n".join([md, "\n".join(ratios), machine]).replace("\n\n\n\n", "\n\n")
    (out / "table.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
