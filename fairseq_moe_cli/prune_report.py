"""Quality and size of pruned checkpoints against the number of experts kept.

    python -m fairseq_moe_cli.prune_report --out results/prune26 \\
        --checkpoint full=moe.pt --checkpoint dense=dense.pt pruned/*.pt \\
        --generate-args "DATA_BIN --task translation_multi_simple_epoch ... --beam 5" --lang de

Every checkpoint is decoded with ``fairseq-generate`` (``--generate-args``, the recipe's flags
without ``--path``; output in ``OUT/generate/LABEL.txt``) and scored with ``fairseq-moe-bleu``
(BLEU and chrF, sacrebleu; ``OUT/generate/LABEL.json``). Sizes: parameters in total and active
per token (``analysis/flops.parameter_counts``), the bytes of the model's tensors, and the file
(which may hold optimizer state). A checkpoint written by ``fairseq-moe-prune-experts`` is
labelled by its criterion and E' (its ``extra_state["moe_pruning"]``); give the others as
``LABEL=PATH``. Writes ``OUT/table.md``, ``OUT/prune_report.json`` and
``OUT/quality_vs_experts.png`` (BLEU, chrF and parameters against E', one line per criterion,
the unpruned and dense models as reference lines). What this adds: the runs, the table and the
plot in one command; generation and scoring are fairseq's and sacrebleu's own.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

PROG = "prune_report"
BIN = Path(sys.executable).parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="*", help="pruned checkpoints (labelled by their "
                        "pruning record), or LABEL=PATH")  # fmt: skip
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="a reference checkpoint (the unpruned model, a dense model)")  # fmt: skip
    parser.add_argument("--generate-args", required=True,
                        help="fairseq-generate's arguments, data folder first, without --path")  # fmt: skip
    parser.add_argument("--lang", default=None, help="the target language (scoring)")
    parser.add_argument("--tokenize", default="auto", help="fairseq-moe-bleu's --tokenize")
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def _run(argv: list[str], stdout=None) -> None:
    proc = subprocess.run([str(a) for a in argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise ValueError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")  # fmt: skip


def sizes(path: Path, data: str) -> dict:
    """Parameters (total, active per token), tensor bytes and file bytes of a checkpoint."""
    from fairseq_moe_plugin.analysis.flops import parameter_counts
    from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task

    models, _, _ = load_model_ensemble_and_task(path, arg_overrides={"data": data})
    counts = parameter_counts(models[0])
    # tied tensors (shared embeddings and output projection) once
    tensors = {t.data_ptr(): t for t in models[0].state_dict().values()}.values()
    return {
        "params_total": counts["total"],
        "params_active": counts["active_per_token"],
        "experts": max((layer["num_experts"] for layer in counts["moe_layers"]), default=0),
        "weights_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "file_mb": path.stat().st_size / 2**20,
    }


def pruning_record(path: Path) -> dict | None:
    from fairseq_moe_plugin.checkpoint_io import read_checkpoint_state

    return (read_checkpoint_state(path).get("extra_state") or {}).get("moe_pruning")


def entries(args) -> list[tuple[str, Path, dict | None]]:
    """``(label, path, pruning record)`` of every checkpoint, references first."""
    result = []
    for item in [*args.checkpoint, *args.checkpoints]:
        label, sep, path = item.partition("=")
        path = Path(path if sep else label)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        record = pruning_record(path)
        if not sep:
            if record is None:
                raise ValueError(f"{path} has no pruning record: give it as LABEL=PATH")
            pair = f"_{record['pair']}" if record.get("pair") else ""
            label = f"{record['criterion']}{pair}_keep{record['keep']}"
        result.append((label, path, record))
    return result


def measure(args, out: Path) -> list[dict]:
    """Generate, score and size every checkpoint; one row each."""
    gen_args = shlex.split(args.generate_args)
    data = gen_args[0]
    (out / "generate").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path, record in entries(args):
        hyp = out / "generate" / f"{label}.txt"
        with open(hyp, "w") as f:
            _run([BIN / "fairseq-generate", *gen_args, "--path", path], stdout=f)
        scores = out / "generate" / f"{label}.json"
        target = f"{args.lang}={hyp}" if args.lang else str(hyp)
        _run([BIN / "fairseq-moe-bleu", "--generate-output", target, "--tokenize",
              args.tokenize, "--json", scores], stdout=subprocess.DEVNULL)  # fmt: skip
        result = next(iter(json.loads(scores.read_text())["results"].values()))
        row = {"label": label, "checkpoint": str(path), **sizes(path, data),
               "criterion": record["criterion"] if record else None,
               "keep": record["keep"] if record else None,
               "bleu": result["bleu"]["score"], "chrf": result["chrf"]["score"],
               "bleu_signature": result["bleu"]["signature"],
               "chrf_signature": result["chrf"]["signature"],
               "sentences": result["num_sentences"]}  # fmt: skip
        rows.append(row)
        print(f"{PROG}: {label}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.2f} "
              f"params {row['params_total']:,} ({row['params_active']:,} active)")  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table of ``measure``'s rows."""
    lines = ["| model | criterion | experts/layer | params total | params active | weights MB "
             "| file MB | BLEU | chrF |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['label']} | {r['criterion'] or '-'} | {r['experts'] or '-'} | "
                     f"{r['params_total']:,} | {r['params_active']:,} | {r['weights_mb']:.1f} | "
                     f"{r['file_mb']:.1f} | {r['bleu']:.2f} | {r['chrf']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """BLEU, chrF and total parameters against E': a line per criterion (the unpruned model
    closes each line at its E), references (no pruning record) as labelled horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [r for r in rows if r["criterion"]]
    references = [r for r in rows if not r["criterion"]]
    full = [r for r in references if r["experts"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("bleu", "chrf", "params_total"),
                              ("BLEU", "chrF", "parameters (total)"), strict=True):  # fmt: skip
        for criterion in sorted({r["criterion"] for r in pruned}):
            points = sorted((r["keep"], r[key]) for r in pruned if r["criterion"] == criterion)
            points += [(r["experts"], r[key]) for r in full[:1]]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"pruned ({criterion})")
        for i, r in enumerate(references):
            ax.axhline(r[key], linestyle="--", color=f"C{i + 3}", label=r["label"])
        ax.set_xlabel("experts kept per MoE layer (E')")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, naming it)."""
    import fairseq_moe_plugin  # noqa: F401

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(args, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    (out / "prune_report.json").write_text(json.dumps({"rows": rows,
                                                       "generate_args": args.generate_args},
                                                      indent=1))  # fmt: skip
    (out / "table.md").write_text(table(rows))
    plot(rows, out / "quality_vs_experts.png")
    print(table(rows))
    print(f"{PROG}: wrote {out}/table.md, prune_report.json, quality_vs_experts.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
