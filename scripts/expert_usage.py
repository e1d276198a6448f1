"""Which experts does a trained MoE model use, for which tokens and languages?

Loads a ``moe_transformer`` checkpoint, runs a data split through it in eval mode with dropless
routing, and records for every non-padding token and MoE layer: encoder/decoder, position,
token, language, top-k experts and weights, router entropy. Writes

- ``routing.npz``: that log (``routing_analysis.py`` documents the arrays);
- ``summary.json``: per-layer loads, entropy and Gini, capacity overflow, per-language routing
  and language similarity, expert specialisation, and every figure with the numbers behind it
  (or why it was not drawn);
- ``specialisation.md``: per layer and expert, the tokens it receives most relative to their
  frequency;
- figures (PNG; heatmaps also as HTML with the values on hover).

    python scripts/expert_usage.py --checkpoint checkpoints/checkpoint_best.pt --split valid \
        --out results/usage [--generate --beam 5] [--train-log train.log] [--data DATA_BIN]

``--generate`` records the decoder's routing on the beam-search output instead of the reference:
the output is decoded again with teacher forcing from the generator's first token, which routes
exactly as incremental decoding did (dropless routing is per token, and incremental decoding
equals full decoding; a test checks it). ``--train-log`` adds plots over updates from a json or
simple text log of ``fairseq-train`` or its ``--tensorboard-logdir``; alone (no checkpoint) it
draws only those.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_analysis as ra  # noqa: E402
import routing_plots as rp  # noqa: E402


def load_checkpoint(path, data=None):
    """The model (eval mode, dropless routing) and its config."""
    from fairseq import checkpoint_utils

    import fairseq_moe_plugin  # noqa: F401  (registers the model; allow-lists checkpoint globals)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    overrides = {"data": str(data)} if data else {}
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides=overrides
    )
    model = models[0].eval()
    from fairseq_moe_plugin.modules.moe_layer import MoELayer

    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not moe_layers:
        raise ValueError(f"{path}: the model has no MoE layer (a dense checkpoint?)")
    for layer in moe_layers:
        layer.gate.eval_capacity_factor = 0.0  # dropless: a token's routing is its own
    return model, cfg, moe_layers


def pair_tasks(cfg):
    """One task per translation direction: ``[((src, tgt), task)]``."""
    from fairseq import tasks

    task_cfg = cfg.task
    name = getattr(task_cfg, "_name", None) or getattr(task_cfg, "task", None)
    if name == "translation_multi_simple_epoch":
        result = []
        pairs = task_cfg.lang_pairs  # "en-de,en-fr", or a list once fairseq has parsed it
        for pair in pairs.split(",") if isinstance(pairs, str) else list(pairs):
            one = copy.deepcopy(task_cfg)
            one.lang_pairs = pair if isinstance(pairs, str) else [pair]
            one.source_lang, one.target_lang = pair.split("-")
            result.append((tuple(pair.split("-")), tasks.setup_task(one)))
        return result
    if name == "translation":
        task = tasks.setup_task(task_cfg)
        return [((task.cfg.source_lang, task.cfg.target_lang), task)]
    raise ValueError(
        f"task {name!r} is not supported: expert_usage.py reads translation and "
        "translation_multi_simple_epoch checkpoints"
    )


def _positions(tokens, pad):
    """B x T token ids -> B x T position of each token among its row's non-padding tokens."""
    return (tokens.ne(pad).long().cumsum(1) - 1).clamp_min(0)


def records_to_rows(records, src_tokens, dec_tokens, pad, layer_ids) -> dict[str, np.ndarray]:
    """Token rows (one per routed token and layer) from a forward's routing records."""
    rows = {key: [] for key in ("layer", "b", "position", "token", "experts", "weights", "entropy")}
    positions_of = {"encoder": _positions(src_tokens, pad), "decoder": _positions(dec_tokens, pad)}
    for record in records:
        side = "encoder" if record["layer"].startswith("encoder") else "decoder"
        side_tokens, positions = (
            (src_tokens if side == "encoder" else dec_tokens),
            positions_of[side],
        )
        T, B = record["input_shape"]  # time-major
        flat = record["token_index"]
        if flat is None:
            flat = torch.arange(T * B)
        t, b = flat // B, flat % B
        rows["layer"].append(np.full(len(flat), layer_ids[record["layer"]]))
        rows["b"].append(b.numpy())
        rows["position"].append(positions[b, t].numpy())
        rows["token"].append(side_tokens[b, t].numpy())
        rows["experts"].append(record["expert_index"].numpy())
        rows["weights"].append(record["expert_weight"].float().numpy())
        rows["entropy"].append(record["token_entropy"].float().numpy())
    return {k: np.concatenate(v) for k, v in rows.items()}


def _generated_decoder_input(model, task, sample, beam, max_len_b):
    """Decoder inputs that reproduce beam search's best hypotheses: [first token] + hypo[:-1]."""
    from fairseq.data import data_utils

    # The generator calls ``decoder.forward`` directly (no module hooks): watch its first call.
    first = {}
    forward = model.decoder.forward

    def watched(prev_output_tokens, *args, **kwargs):
        first.setdefault("t", prev_output_tokens[:, 0].clone())
        return forward(prev_output_tokens, *args, **kwargs)

    gen_args = argparse.Namespace(beam=beam, max_len_b=max_len_b, max_len_a=0, min_len=1)
    generator = task.build_generator([model], gen_args)
    model.decoder.forward = watched
    try:
        with torch.no_grad():
            hypos = task.inference_step(generator, [model], sample)
    finally:
        del model.decoder.forward
    bsz = sample["net_input"]["src_tokens"].size(0)
    starts = first["t"].view(bsz, -1)[:, 0]
    seqs = [torch.cat([starts[i : i + 1], h[0]["tokens"][:-1]]) for i, h in enumerate(hypos)]
    pad = task.target_dictionary.pad()
    return data_utils.collate_tokens(seqs, pad, left_pad=False), [h[0]["tokens"] for h in hypos]


def record_split(model, moe_layers, pairs, split, max_tokens, max_sentences, generate, beam):
    """Run ``split`` of every direction; returns the routing log arrays and the hypotheses."""
    layer_names = [m.name for m in moe_layers]
    layer_ids = {n: i for i, n in enumerate(layer_names)}
    is_decoder = np.array([n.startswith("decoder") for n in layer_names])
    langs = sorted({lang for pair, _ in pairs for lang in pair})
    cols = {k: [] for k in ("layer", "sentence", "batch", "position", "token", "lang", "pair",
                            "experts", "weights", "entropy")}  # fmt: skip
    batch_no, hypotheses = 0, {}
    for p, ((src, tgt), task) in enumerate(pairs):
        task.load_dataset(split)
        dataset = task.dataset(split)
        if len(dataset) == 0:
            raise ValueError(f"split {split!r} of {src}-{tgt} is empty")
        itr = task.get_batch_iterator(
            dataset=dataset, max_tokens=max_tokens, max_sentences=max_sentences, seed=1,
            required_batch_size_multiple=1,
        ).next_epoch_itr(shuffle=False)  # fmt: skip
        pad = task.source_dictionary.pad()
        for sample in itr:
            net_input = dict(sample["net_input"])
            if generate:
                net_input["prev_output_tokens"], hyps = _generated_decoder_input(
                    model, task, sample, beam, max_len_b=200
                )
                for sid, h in zip(sample["id"].tolist(), hyps, strict=True):
                    hypotheses[f"{src}-{tgt}:{sid}"] = task.target_dictionary.string(h)
            with torch.no_grad():
                _, extra = model(**net_input)
            rows = records_to_rows(extra["moe_records"], net_input["src_tokens"],
                                   net_input["prev_output_tokens"], pad, layer_ids)  # fmt: skip
            n = len(rows["layer"])
            side_is_dec = is_decoder[rows["layer"]]
            cols["layer"].append(rows["layer"])
            cols["sentence"].append(sample["id"].numpy()[rows["b"]])
            cols["batch"].append(np.full(n, batch_no))
            cols["position"].append(rows["position"])
            cols["token"].append(rows["token"])
            cols["lang"].append(np.where(side_is_dec, langs.index(tgt), langs.index(src)))
            cols["pair"].append(np.full(n, p))
            for key in ("experts", "weights", "entropy"):
                cols[key].append(rows[key])
            batch_no += 1
    dictionary = pairs[0][1].source_dictionary
    log = {k: np.concatenate(v) for k, v in cols.items()}
    log.update(
        layer_names=np.array(layer_names), langs=np.array(langs),
        pairs=np.array([f"{s}-{t}" for (s, t), _ in pairs]),
        vocab=np.array([dictionary[i] for i in range(len(dictionary))]),
        num_experts=np.array(moe_layers[0].num_experts), k=np.array(moe_layers[0].gate.k),
    )  # fmt: skip
    for key in ("layer", "lang", "pair"):
        log[key] = log[key].astype(np.int16)
    log["experts"] = log["experts"].astype(np.int16)
    return log, hypotheses


def analyse(log, out: Path, capacity_factor: float, top_tokens: int) -> dict:
    """Every statistic and figure from a routing log; returns the summary."""
    figures, skipped = {}, {}
    names = log["layer_names"].tolist()
    num_experts = int(log["num_experts"])
    loads = ra.layer_loads(log)
    experts = [f"e{e}" for e in range(num_experts)]
    figures["layer_expert_share"] = rp.draw_heatmap(
        "layer_expert_share", [loads[n]["shares"] for n in names], names, experts,
        f"token share per expert (uniform = 1/{num_experts})", out, center=1 / num_experts,
    )  # fmt: skip
    languages, lang_skipped = ra.per_language(log)
    for side, reason in lang_skipped.items():
        skipped[f"{side}_language_share"] = reason
        skipped[f"{side}_language_similarity"] = reason
    for side, data in languages.items():
        groups = data["groups"]
        for layer, dists in data["shares"].items():
            name = f"{side}_language_share_{layer.replace('.', '_')}"
            figures[name] = rp.draw_heatmap(
                name, dists, groups, experts, f"{layer}: share per expert by {data['grouped_by']}",
                out, center=1 / num_experts,
            )  # fmt: skip
        name = f"{side}_language_similarity"
        figures[name] = rp.draw_heatmap(
            name, data["similarity"], groups, groups,
            f"{side}: routing similarity (1 - JSD), mean over layers", out, cbar="1 - JSD",
        )  # fmt: skip
    health = ra.entropy_and_gini(log)
    figures["entropy_gini"] = rp.draw_bars(
        "entropy_gini", names,
        {k: [health[n][k] for n in names] for k in ("token_entropy", "load_entropy_normalised", "gini")},
        "router entropy (nats), load entropy / log E, Gini of the loads", out,
    )  # fmt: skip
    overflow = ra.capacity_overflow(log, capacity_factor)
    if capacity_factor > 0:
        figures["capacity_overflow"] = rp.draw_heatmap(
            "capacity_overflow", [overflow[n]["overflow_share"] for n in names], names, experts,
            f"share of each expert's assignments over capacity (factor {capacity_factor:g})",
            out, cbar="overflow share",
        )  # fmt: skip
    else:
        skipped["capacity_overflow"] = "capacity factor <= 0 (dropless): nothing overflows"
    special = ra.specialisation(log, top=top_tokens)
    figures["token_identity"] = rp.draw_bars(
        "token_identity", names,
        {k: [special[n][k] for n in names] for k in ("token_decided", "majority_expert_share")},
        "top-1 routing decided by token identity vs the most common expert", out,
    )  # fmt: skip
    write_specialisation_table(special, out / "specialisation.md")
    return {
        "tokens": int((log["layer"] == 0).sum()),
        "num_experts": num_experts,
        "k": int(log["k"]),
        "layers": {
            n: {
                **loads[n],
                **health[n],
                **overflow[n],
                **{k: v for k, v in special[n].items() if k != "top_tokens"},
            }
            for n in names
        },  # fmt: skip
        "capacity_factor": capacity_factor,
        "languages": languages,
        "specialisation": {n: special[n]["top_tokens"] for n in names},
        "figures": figures,
        "skipped": skipped,
    }


def _code(token: str) -> str:
    """A token as inline code in a markdown table cell (backticks and pipes survive)."""
    token = token.replace("|", "\\|")
    return f"`` {token} ``" if "`" in token else f"`{token}`"


def write_specialisation_table(special: dict, path: Path) -> None:
    lines = ["# Tokens each expert receives most, relative to their frequency (lift)", ""]
    for layer, data in special.items():
        lines += [f"## {layer}", "", f"top-1 routing decided by token identity: "
                  f"{data['token_decided']:.3f} (most common expert alone: "
                  f"{data['majority_expert_share']:.3f})", "",
                  "| expert | tokens (count, lift) |", "| --- | --- |"]  # fmt: skip
        for e, rows in data["top_tokens"].items():
            cells = ", ".join(f"{_code(r['token'])} ({r['count']}, {r['lift']:.1f})" for r in rows)
            lines.append(f"| {e} | {cells or '(no token seen often enough)'} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "--generate", action="store_true", help="decoder routing on beam search's output"
    )
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="for the overflow figure (default: the checkpoint's training factor)")  # fmt: skip
    parser.add_argument("--top-tokens", type=int, default=10)
    parser.add_argument(
        "--train-log", help="fairseq-train text log (json/simple) or tensorboard dir"
    )
    args = parser.parse_args(argv)
    if args.checkpoint and args.routing_log:
        parser.error("give --checkpoint or --routing-log, not both")
    if not (args.checkpoint or args.routing_log or args.train_log):
        parser.error("give --checkpoint (or --routing-log), --train-log, or both")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"figures": {}, "skipped": {}}
    if args.checkpoint:
        model, cfg, moe_layers = load_checkpoint(args.checkpoint, args.data)
        factor = args.capacity_factor
        if factor is None:
            factor = float(getattr(cfg.model, "moe_capacity_factor", 0.0))
        log, hypotheses = record_split(model, moe_layers, pair_tasks(cfg), args.split,
                                       args.max_tokens, args.max_sentences, args.generate, args.beam)  # fmt: skip
        log["capacity_factor"] = np.array(factor)
        log["mode"] = np.array("generate" if args.generate else "teacher_forced")
        np.savez_compressed(out / "routing.npz", **log)
        if hypotheses:
            (out / "hypotheses.json").write_text(
                json.dumps(hypotheses, indent=1, ensure_ascii=False)
            )
        summary = analyse(log, out, factor, args.top_tokens)
        summary.update(checkpoint=str(args.checkpoint), split=args.split,
                       mode="generate" if args.generate else "teacher_forced")  # fmt: skip
    elif args.routing_log:
        log = ra.load_log(args.routing_log)
        factor = args.capacity_factor
        if factor is None:
            factor = float(log.get("capacity_factor", 0.0))
        summary = analyse(log, out, factor, args.top_tokens)
        summary.update(routing_log=str(args.routing_log), mode=str(log.get("mode", "unknown")))
    if args.train_log:
        series = rp.training_series(rp.read_training_log(args.train_log))
        figures, skipped = rp.draw_training(series, out)
        summary["figures"].update(figures)
        summary["skipped"].update(skipped)
        summary["train_log"] = str(args.train_log)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    drawn = ", ".join(sorted(summary["figures"]))
    print(f"expert_usage: wrote {out}/summary.json; figures: {drawn}")
    for name, reason in sorted(summary["skipped"].items()):
        print(f"expert_usage: no {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
