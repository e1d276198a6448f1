"""Prune the experts of a trained MoE checkpoint (``fairseq_moe_plugin/models/prune.py``).

    fairseq-moe-prune-experts CHECKPOINT --keep 2 4 6 --out pruned/ \\
        [--criterion load|weighted-load|language] [--data DATA_BIN --subset valid] \\
        [--routing-log routing.npz] [--max-tokens 4000] [--lang-pairs en-de,en-fr]

(or ``python scripts/prune_experts.py ...``). Every MoE layer keeps ``--keep`` E' of its E
experts, those that the routing on ``--subset`` of ``--data`` (recorded as ``fairseq-moe-usage``
records it: teacher-forced, dropless, ``routing.npz``, written to ``--out``; or read from
``--routing-log``) used most:

- ``load``: most assignments; ``weighted-load``: largest summed router weight;
- ``language`` (multilingual checkpoints): one checkpoint per language pair src-tgt, its encoder
  layers keeping the experts that src tokens use most and its decoder layers those tgt tokens
  use most (Koishekenov et al. 2023), scored as ``--language-score`` says.

Writes one checkpoint per E' (and per pair), ``{criterion}[_{pair}]_keep{E'}.pt``, that
fairseq-generate, the hub, ``fairseq-moe-quantize``, ``-export-onnx`` and ``-serve`` load as
any checkpoint (its config says ``moe_expert_count`` E'); and ``prune.json``: the source
checkpoint and its sha256, the data, the criterion and, per output and layer, the kept expert
ids, every expert's score and the share of the score kept. Each checkpoint also carries its
own entry in ``extra_state["moe_pruning"]``. The optimizer state is dropped (its shapes no
longer match). Bad input (missing checkpoint, dense checkpoint, --keep out of range, a log
recorded from another model, --criterion language on a bilingual model) exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

from fairseq_moe_cli.grow_experts import model_config, save, update_config

PROG = "prune_experts"


def build_parser() -> argparse.ArgumentParser:
    from fairseq_moe_plugin.models.prune import CRITERIA, SCORES

    parser = argparse.ArgumentParser(
        prog="fairseq-moe-prune-experts",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a trained MoE fairseq checkpoint")
    parser.add_argument("--keep", type=int, nargs="+", required=True,
                        help="experts E' to keep per MoE layer; several values write one "
                        "checkpoint each")  # fmt: skip
    parser.add_argument("--criterion", choices=CRITERIA, default="load",
                        help="how experts are chosen (default: load)")  # fmt: skip
    parser.add_argument("--language-score", choices=SCORES, default="load",
                        help="--criterion language: the per-language score (default: load)")  # fmt: skip
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--data", help="binarised data directory (default: the checkpoint's)")
    parser.add_argument("--subset", default="valid", help="the split routing is measured on")
    parser.add_argument("--routing-log",
                        help="a routing.npz of this checkpoint (fairseq-moe-usage, or an earlier "
                        "run of this tool) instead of recording one")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=4000, help="recording batch size")
    parser.add_argument("--max-sentences", type=int, default=None, help="recording batch size")
    parser.add_argument("--lang-pairs", default=None,
                        help="comma-separated pairs to record (default: all the checkpoint's)")  # fmt: skip
    parser.add_argument("--fallback-expert", type=int, default=None,
                        help="the pruned model's --moe-fallback-expert (default: the old one "
                        "remapped, when every layer keeps it at the same new id)")  # fmt: skip
    return parser


def _checkpoint_pairs(state) -> list[str]:
    """The translation directions of a checkpoint's task (one for bilingual tasks)."""
    from fairseq_moe_plugin.checkpoint_io import saved_option

    pairs = saved_option(state, "task", "lang_pairs")
    if pairs is None:
        return [f"{saved_option(state, 'task', 'source_lang')}-"
                f"{saved_option(state, 'task', 'target_lang')}"]  # fmt: skip
    return pairs.split(",") if isinstance(pairs, str) else [str(p) for p in pairs]


def record_log(args, out: Path) -> dict:
    """The routing of the checkpoint on ``args.subset`` (``routing_log.record_split``,
    teacher-forced, dropless), saved as ``out/routing.npz``."""
    from fairseq_moe_plugin.analysis import routing_log
    from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task
    from fairseq_moe_plugin.modules import MoELayer

    overrides = {"data": str(args.data)} if args.data else None
    models, cfg, _ = load_model_ensemble_and_task(args.checkpoint, arg_overrides=overrides)
    model = models[0].eval()
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in moe_layers:
        layer.gate.eval_capacity_factor = 0.0  # dropless: a token's routing is its own
    pairs = routing_log.pair_tasks(cfg)
    if args.lang_pairs:
        wanted = [p.strip() for p in args.lang_pairs.split(",") if p.strip()]
        have = {f"{s}-{t}": (s, t) for (s, t), _ in pairs}
        unknown = [p for p in wanted if p not in have]
        if unknown:
            raise ValueError(f"--lang-pairs {unknown} are not the checkpoint's ({sorted(have)})")
        pairs = [(pair, task) for pair, task in pairs if f"{pair[0]}-{pair[1]}" in wanted]
    log, _ = routing_log.record_split(model, moe_layers, pairs, args.subset, args.max_tokens,
                                      args.max_sentences)  # fmt: skip
    log["mode"] = np.array("teacher_forced")
    np.savez_compressed(out / "routing.npz", **log)
    return log


def plans(args, log) -> list[tuple[str, str | None, int, dict]]:
    """``(file stem, pair, E', plan)`` of every output."""
    from fairseq_moe_plugin.models import prune

    result = []
    for keep in args.keep:
        if args.criterion == "language":
            for pair, one in prune.language_plans(log, keep, args.language_score).items():
                result.append((f"language_{pair}_keep{keep}", pair, keep, one))
        else:
            result.append((f"{args.criterion}_keep{keep}", None, keep,
                           prune.plan(log, args.criterion, keep)))  # fmt: skip
    return result


def _configs(state: dict) -> list:
    """Every config in the checkpoint that holds the MoE options (model, task, criterion and
    the legacy args are each a copy of the training flags)."""
    cfg = state.get("cfg") or {}
    found = [model_config(state)]
    found += [cfg.get(k) for k in ("task", "criterion")] + [state.get("args")]
    unique = {}
    for c in found:
        if isinstance(c, (dict, Namespace)) and (
            "moe_expert_count" in (c if isinstance(c, dict) else vars(c))
        ):
            unique[id(c)] = c
    return list(unique.values())


def pruned_checkpoint(state: dict, model_state: dict, updates: dict, record: dict) -> dict:
    """A copy of the checkpoint ``state`` with the pruned weights, config and provenance."""
    new = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    new = copy.deepcopy(new)
    new["model"] = model_state
    for cfg in _configs(new):
        update_config(cfg, dict(updates))
    extra = new.get("extra_state") or {}
    for key in ("ema", "ema_fp32_params"):  # --store-ema copies of the old shapes
        extra.pop(key, None)
    extra["moe_pruning"] = record
    new["extra_state"] = extra
    return new


def _layer_record(prefix: str, plan: dict) -> dict:
    scores = plan["scores"][prefix]
    kept = plan["kept"][prefix]
    total = sum(scores)
    entry = {
        "kept": kept,
        "scores": scores,
        "kept_share": (sum(scores[e] for e in kept) / total) if total > 0 else 0.0,
    }
    if "langs" in plan:
        entry["scored_on"] = plan["langs"][prefix[: -len(".moe")]]
    return entry


def prune(args) -> dict:
    """Load, check, record or read the routing, write every output; returns the manifest."""
    from omegaconf import OmegaConf

    from fairseq_moe_plugin.analysis.routing_analysis import load_log
    from fairseq_moe_plugin.checkpoint_io import read_checkpoint_state
    from fairseq_moe_plugin.models import prune as pr
    from fairseq_moe_plugin.models.grow import config_value
    from fairseq_moe_plugin.models.provenance import sha256_file

    path = Path(args.checkpoint)
    state = read_checkpoint_state(path)
    if OmegaConf.is_config(state.get("cfg")):
        state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    config = model_config(state)
    try:
        pr.check_prunable(config)
        prefixes, num_experts = pr.expert_count(state["model"], config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    top_k = int(config_value(config, "moe_top_k", 2))
    for keep in args.keep:
        if keep > num_experts:
            raise ValueError(f"--keep {keep} is more than the {num_experts} experts of {path}")
        if keep < top_k:
            raise ValueError(f"--keep {keep} is below the top-k of {path} (--moe-top-k "
                             f"{top_k}): keep at least {top_k} experts")  # fmt: skip
    if args.criterion == "language" and not args.routing_log:
        pairs = _checkpoint_pairs(state)
        if len(pairs) < 2:
            raise ValueError(f"--criterion language needs a multilingual model (several "
                             f"language pairs); {path} translates {pairs[0]} only: use "
                             "--criterion load or weighted-load")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.routing_log:
        log_path = Path(args.routing_log)
        if not log_path.is_file():
            raise FileNotFoundError(f"routing log {log_path} does not exist")
        log = load_log(log_path)
    else:
        log_path = out / "routing.npz"
        log = record_log(args, out)
    pr.check_log(log, prefixes, num_experts, log_path)
    manifest = {
        "source_checkpoint": str(path),
        "source_sha256": sha256_file(path),
        "source_experts": num_experts,
        "criterion": args.criterion,
        "score": args.language_score if args.criterion == "language" else args.criterion,
        "data": str(args.data or config_value(state["cfg"].get("task"), "data", "")),
        "subset": args.subset if not args.routing_log else None,
        "routing_log": str(log_path),
        "routed_tokens": {p: int((log["layer"] == i).sum()) for i, p in enumerate(prefixes)},
        "outputs": [],
    }
    for stem, pair, keep, plan in plans(args, log):
        updates = pr.config_updates(config, plan["kept"], args.fallback_expert)
        record = {k: v for k, v in manifest.items() if k != "outputs"}
        record.update(keep=keep, pair=pair, updates=updates,
                      layers={p: _layer_record(p, plan) for p in prefixes})  # fmt: skip
        model_state = pr.prune_state_dict(state["model"], plan["kept"])
        file = out / f"{stem}.pt"
        save(pruned_checkpoint(state, model_state, updates, record), file)
        manifest["outputs"].append({"checkpoint": str(file), **{k: record[k] for k in
                                    ("keep", "pair", "updates", "layers")}})  # fmt: skip
    (out / "prune.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def describe(manifest: dict) -> list[str]:
    """The console lines: per output, per layer, the kept experts and why."""
    lines = []
    for output in manifest["outputs"]:
        pair = f" for {output['pair']}" if output["pair"] else ""
        lines.append(f"{PROG}: wrote {output['checkpoint']}{pair}: {output['keep']} of "
                     f"{manifest['source_experts']} experts per MoE layer "
                     f"({manifest['criterion']})")  # fmt: skip
        for prefix, layer in output["layers"].items():
            scored = f" on {layer['scored_on']} tokens" if "scored_on" in layer else ""
            scores = ", ".join(f"{s:.4g}" for s in layer["scores"])
            lines.append(f"  {prefix}: kept {layer['kept']} ({100 * layer['kept_share']:.1f}% "
                         f"of the {manifest['score']}{scored}; scores {scores})")  # fmt: skip
    return lines


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, naming it)."""
    import fairseq_moe_plugin  # noqa: F401  (registers the models, allow-lists the globals)

    args = build_parser().parse_args(argv)
    try:
        manifest = prune(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for line in describe(manifest):
        print(line)
    print(f"{PROG}: wrote {Path(args.out) / 'prune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
