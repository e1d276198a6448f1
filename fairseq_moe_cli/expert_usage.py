"""Which experts does a trained MoE model use, for which tokens and languages?

Loads a ``moe_transformer`` checkpoint, runs a data split through it in eval mode with dropless
routing, and records for every non-padding token and MoE layer: encoder/decoder, position,
token, language, top-k experts and weights, router entropy. Writes

- ``routing.npz``: that log (``fairseq_moe_plugin/analysis/routing_analysis.py`` documents the
  arrays);
- ``summary.json``: per-layer loads, entropy and Gini, capacity overflow, per-language routing
  and language similarity, expert specialisation, and every figure with the numbers behind it
  (or why it was not drawn);
- ``specialisation.md``: per layer and expert, the tokens it receives most relative to their
  frequency;
- figures (PNG; heatmaps also as HTML with the values on hover).

    fairseq-moe-usage --checkpoint checkpoints/checkpoint_best.pt --split valid \\
        --out results/usage [--generate --beam 5] [--train-log train.log] [--data DATA_BIN]

(or ``python scripts/expert_usage.py ...``). ``--generate`` records the decoder's routing on the
generator's output instead of the reference, with fairseq-generate's generation flags and
defaults (``--beam``, ``--max-len-a``, ``--max-len-b``, ``--min-len``, ``--lenpen``, ...): the
output is decoded again with teacher forcing from the generator's first token, which routes
exactly as incremental decoding did (dropless routing is per token, and incremental decoding
equals full decoding; a test checks it). ``--train-log`` adds plots over updates from a json or
simple text log of ``fairseq-train`` or its ``--tensorboard-logdir``; alone (no checkpoint) it
draws only those. A figure whose data is missing is skipped, with the reason in the summary and
on the console.

Under ``torchrun --nproc-per-node W``, with the checkpoint's ``--moe-expert-parallel-size`` P > 1
(experts sharded, E/P per process), each process records its share of the batches and rank 0
writes the same log and report one process would.

Expert choice (``--moe-routing expert_choice``) routes a token by the rest of its batch: the
summary's and the console's notes say so, and its figures hold for the batching used here
(``--max-tokens``, ``--max-sentences``). Its tokens have 0 to E experts; the summary adds, per
such layer, the share of tokens no expert took and the experts per token. Shared experts
(``--moe-shared-experts``) are not routed: a note says they are there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
from fairseq.dataclass.configs import GenerationConfig
from fairseq.dataclass.utils import gen_parser_from_dataclass

from fairseq_moe_plugin.analysis import routing_analysis, routing_log
from fairseq_moe_plugin.analysis.report import analyse, training_figures
from fairseq_moe_plugin.distributed.inference import expert_parallel_inference


def build_parser() -> argparse.ArgumentParser:
    """This tool's flags, then fairseq-generate's generation flags (``GenerationConfig``, added
    by fairseq's own ``gen_parser_from_dataclass``, so names and defaults are fairseq's)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="a moe_transformer checkpoint")
    parser.add_argument(
        "--routing-log", help="analyse a routing.npz written earlier instead of a checkpoint"
    )
    parser.add_argument("--data", help="binarised data directory (default: the checkpoint's)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--max-sentences", type=int, default=None)
    parser.add_argument(
        "--generate", action="store_true", help="decoder routing on the generator's output"
    )
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="for the overflow figure (default: the checkpoint's training factor)")  # fmt: skip
    parser.add_argument("--top-tokens", type=int, default=10)
    parser.add_argument(
        "--train-log", help="fairseq-train text log (json/simple) or tensorboard dir"
    )
    generation = parser.add_argument_group(
        "generation (with --generate): fairseq-generate's flags and defaults"
    )
    gen_parser_from_dataclass(generation, GenerationConfig())
    return parser


def generation_from_args(args):
    """The ``GenerationConfig`` of the parsed generation flags, or None without --generate."""
    if not args.generate:
        return None
    names = [f.name for f in fields(GenerationConfig) if hasattr(args, f.name)]  # not "_name"
    return routing_log.generation_options(**{name: getattr(args, name) for name in names})


def record(args, out: Path, shard=(0, 1)) -> dict | None:
    """Record the routing of ``args.checkpoint`` on ``args.split``; write the log and report.
    ``shard`` ``(rank, W)``: this process's share when W processes record together (under
    torchrun, experts sharded); rank 0 writes, the others return None."""
    model, cfg, moe_layers = routing_log.load_checkpoint(args.checkpoint, args.data)
    factor = args.capacity_factor
    if factor is None:
        factor = float(getattr(cfg.model, "moe_capacity_factor", 0.0))
    mode = "generate" if args.generate else "teacher_forced"
    pairs = routing_log.pair_tasks(cfg)
    log, hypotheses = routing_log.record_split(model, moe_layers, pairs, args.split,
                                               args.max_tokens, args.max_sentences,
                                               generation_from_args(args), shard)  # fmt: skip
    if shard[0] != 0:
        return None
    log["capacity_factor"] = np.array(factor)
    log["mode"] = np.array(mode)
    np.savez_compressed(out / "routing.npz", **log)
    if hypotheses:
        (out / "hypotheses.json").write_text(json.dumps(hypotheses, indent=1, ensure_ascii=False))
    summary = analyse(log, out, factor, args.top_tokens)
    summary.update(checkpoint=str(args.checkpoint), split=args.split, mode=mode)
    return summary


def reanalyse(args, out: Path) -> dict:
    """The report of a routing log written earlier (``--routing-log``)."""
    log = routing_analysis.load_log(args.routing_log)
    factor = args.capacity_factor
    if factor is None:
        factor = float(log.get("capacity_factor", 0.0))
    summary = analyse(log, out, factor, args.top_tokens)
    summary.update(routing_log=str(args.routing_log), mode=str(log.get("mode", "unknown")))
    return summary


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, naming it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and args.routing_log:
        parser.error("give --checkpoint or --routing-log, not both")
    if not (args.checkpoint or args.routing_log or args.train_log):
        parser.error("give --checkpoint (or --routing-log), --train-log, or both")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:  # under torchrun: W processes, each with its share of the batches
        with expert_parallel_inference(cpu=True) as (world, rank):
            if rank != 0:
                record(args, out, (rank, world))  # rank 0 gathers the rows and reports
                return 0
            return _report(args, out, (rank, world))
    return _report(args, out)


def _report(args, out: Path, shard=(0, 1)) -> int:
    summary = {"figures": {}, "skipped": {}}
    try:
        if args.checkpoint:
            summary = record(args, out, shard)
        elif args.routing_log:
            summary = reanalyse(args, out)
        if args.train_log:
            figures, skipped = training_figures(args.train_log, out)
            summary["figures"].update(figures)
            summary["skipped"].update(skipped)
            summary["train_log"] = str(args.train_log)
    except (FileNotFoundError, ValueError) as err:
        print(f"expert_usage: error: {err}", file=sys.stderr)
        return 2
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    drawn = ", ".join(sorted(summary["figures"]))
    print(f"expert_usage: wrote {out}/summary.json; figures: {drawn}")
    for name, reason in sorted(summary["skipped"].items()):
        print(f"expert_usage: no {name}: {reason}")
    for note in summary.get("notes", []):
        print(f"expert_usage: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
