"""Parameters (total and active per token) and forward FLOPs per token of a (MoE) transformer
checkpoint, on real batches of a data split: fvcore's count and the analytic one
(``fairseq_moe_plugin/analysis/flops.py`` documents both and the conventions).

    fairseq-moe-flops --path checkpoints/checkpoint_best.pt --data data-bin --json f.json

(or ``python scripts/flops.py ...``). Prints a summary; ``--json`` writes the whole report.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

from fairseq_moe_plugin.analysis.flops import flops_report


def load_batches(
    path: str,
    data: str,
    subset: str,
    max_sentences: int,
    num_batches: int,
    user_dir=None,
    source_lang=None,
    target_lang=None,
):
    """Load a checkpoint (after ``import fairseq_moe_plugin``) and the first ``num_batches``
    batches of ``subset`` (fairseq's length-sorted batching, no shuffling)."""
    from argparse import Namespace

    from fairseq import checkpoint_utils, utils

    if not Path(path).is_file():
        raise ValueError(f"flops: checkpoint {path} does not exist")
    if not Path(data).is_dir():
        raise ValueError(f"flops: data directory {data} does not exist")
    if user_dir:
        utils.import_user_module(Namespace(user_dir=user_dir))
    overrides = {"data": data}
    if source_lang or target_lang:  # multilingual checkpoints: which pair to count on
        overrides.update(source_lang=source_lang, target_lang=target_lang)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    model = models[0].eval()
    try:
        task.load_dataset(subset)
    except FileNotFoundError as err:
        raise ValueError(f"flops: subset {subset!r} not found in {data}: {err}") from err
    iterator = task.get_batch_iterator(
        dataset=task.dataset(subset),
        max_tokens=None,
        max_sentences=max_sentences,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=1,
        seed=1,
    ).next_epoch_itr(shuffle=False)
    return model, list(islice(iterator, num_batches))


def format_summary(report: dict) -> str:
    """A few lines for the console."""
    params = report["parameters"]
    lines = [
        f"parameters: total {params['total']:,}  active per token {params['active_per_token']:,}",
        f"batches: {report['counts']['sentences']} sentences, "
        f"{report['counts']['target_tokens']} target tokens",
    ]
    for key in ("fvcore", "analytic", "analytic_padding_free"):
        per = report[key]["per_target_token"]
        lines.append(
            f"{key:>22}: {per['flops'] / 1e6:10.3f} MFLOPs/target token "
            f"({per['macs'] / 1e6:.3f} MMACs)"
        )
    lines.append(f"fvcore vs analytic: {100 * report['fvcore_vs_analytic_rel_diff']:+.3f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="checkpoint file")
    parser.add_argument("--data", required=True, help="fairseq-preprocess output directory")
    parser.add_argument("--user-dir", help="another fairseq --user-dir to import")
    parser.add_argument("--subset", default="test", help="data split (default: test)")
    parser.add_argument("--max-sentences", type=int, default=32, help="sentences per batch")
    parser.add_argument("--num-batches", type=int, default=1, help="batches to count (def. 1)")
    parser.add_argument("--source-lang", help="source language (multilingual checkpoints)")
    parser.add_argument("--target-lang", help="target language (multilingual checkpoints)")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    args = parser.parse_args(argv)
    if args.max_sentences < 1 or args.num_batches < 1:
        parser.error("--max-sentences and --num-batches must be >= 1")
    try:
        model, samples = load_batches(
            args.path,
            args.data,
            args.subset,
            args.max_sentences,
            args.num_batches,
            args.user_dir,
            args.source_lang,
            args.target_lang,
        )
        report = flops_report(model, samples)
    except ValueError as err:
        print(f"flops: error: {err}", file=sys.stderr)
        return 2
    report["input"] = {"path": args.path, "data": args.data, "subset": args.subset}
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
