"""The routing report: every statistic and figure of a routing log, and the training log's.

``analyse`` turns a routing log (``routing_log.py``) into the ``summary.json`` dict, the figures
and ``specialisation.md``; ``training_figures`` draws the loads, balance loss and entropy over
updates from a fairseq training log. A figure whose data is missing is not drawn: the summary's
``skipped`` says which and why. The summary's ``notes`` say what the figures do not show: that
expert-choice routing depends on the batch (the figures hold for the batching of the log), and
that shared experts are not routed.
"""

from __future__ import annotations

from pathlib import Path

from . import routing_analysis as ra
from . import routing_plots as rp
from .training_log import read_training_log, training_series


def _language_figures(log, out: Path, figures: dict, skipped: dict) -> dict:
    """Per side: the languages x experts heatmap of each layer and the languages' similarity,
    added to ``figures`` (or the reason to ``skipped``); returns ``ra.per_language``'s data."""
    num_experts = int(log["num_experts"])
    experts = [f"e{e}" for e in range(num_experts)]
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
    return languages


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
    languages = _language_figures(log, out, figures, skipped)
    health = ra.entropy_and_gini(log)
    figures["entropy_gini"] = rp.draw_bars(
        "entropy_gini", names,
        {k: [health[n][k] for n in names] for k in ("token_entropy", "load_entropy_normalised", "gini")},
        "router entropy (nats), load entropy / log E, Gini of the loads", out,
    )  # fmt: skip
    overflow = ra.capacity_overflow(log, capacity_factor)
    kinds = ra.layer_routing(log)
    chosen = ra.expert_choice_stats(log)
    if chosen:
        figures["expert_choice"] = rp.draw_bars(
            "expert_choice", list(chosen),
            {k: [chosen[n][k] for n in chosen] for k in ("unchosen_share", "experts_per_token")},
            "expert choice: tokens no expert took, experts per token", out,
        )  # fmt: skip
    if all(ra.experts_choose(kind) for kind in kinds):
        skipped["capacity_overflow"] = "expert choice: every expert takes exactly its capacity"
    elif capacity_factor > 0:
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
                **chosen.get(n, {}),
            }
            for n in names
        },  # fmt: skip
        "capacity_factor": capacity_factor,
        "layer_routing": dict(zip(names, kinds, strict=True)),
        "expert_choice": chosen,
        "notes": ra.notes(log),
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


def training_figures(path, out: Path) -> tuple[dict, dict]:
    """Figures over updates from the ``train_inner`` records of the training log at ``path``;
    returns (figures, skipped). A log without such records (a run that logged fewer updates than
    its ``--log-interval``, say) skips both figures with the reason; a missing path raises."""
    names = ("train_expert_load", "train_balance_entropy")
    try:
        log = read_training_log(path)
    except ValueError as err:
        return {}, dict.fromkeys(names, str(err))
    if not log.train_inner:
        reason = (
            f"{path}: no train_inner records (a run shorter than one --log-interval logs "
            f"none; this one reached update {log.num_updates()})"
        )
        return {}, dict.fromkeys(names, reason)
    return rp.draw_training(training_series(log.train_inner), out)
