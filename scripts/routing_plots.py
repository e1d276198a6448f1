"""Pictures of routing statistics (matplotlib, PNG; self-contained HTML heatmaps whose cells show
their value on hover) and the reader of fairseq training logs (json or simple text format, or a
tensorboard log directory).

Every ``draw_*`` writes its figure and returns the entry the summary lists for it:
``{"png": ..., "html": ... (heatmaps), "data": ...}``, where ``data`` is the exact numbers drawn.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOAD_RE = re.compile(r"^moe_(\w+?)_load_e(\d+)$")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def heatmap_html(matrix, rows, cols, title: str, path: Path, fmt: str = "{:.3f}") -> str:
    """A table whose cell colour is the value (white -> blue) and whose tooltip names the row,
    column and value. No scripts, no external files."""
    m = np.asarray(matrix, dtype=np.float64)
    top = float(m.max()) if m.size and m.max() > 0 else 1.0
    cells = []
    for r, row in enumerate(rows):
        tds = []
        for c, col in enumerate(cols):
            v = m[r, c]
            shade = int(255 - 200 * v / top)
            tip = html.escape(f"{row} / {col}: {fmt.format(v)}")
            tds.append(
                f'<td title="{tip}" style="background:rgb({shade},{shade},255)">{fmt.format(v)}</td>'
            )
        cells.append(f"<tr><th>{html.escape(str(row))}</th>{''.join(tds)}</tr>")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    doc = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>td,th{padding:3px 6px;font:12px monospace;text-align:right}</style>"
        f"<h3>{html.escape(title)}</h3><table><tr><th></th>{head}</tr>{''.join(cells)}</table>"
    )
    path.write_text(doc)
    return path.name


def heatmap_png(matrix, rows, cols, title, path, center=None, cbar="share") -> str:
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(
        figsize=(max(5.5, 0.45 * len(cols) + 2.5), max(2.5, 0.4 * len(rows) + 1.5))
    )
    if center is not None:  # white at the uniform share, blue below, red above
        top = max(float(m.max()), center * 1.05)
        norm = matplotlib.colors.TwoSlopeNorm(vmin=0.0, vcenter=center, vmax=top)
        image = ax.imshow(m, cmap="RdBu_r", norm=norm, aspect="auto")
        cbar = f"{cbar} (line: uniform {center:.3g})"
    else:
        image = ax.imshow(m, cmap="viridis", aspect="auto")
    colorbar = fig.colorbar(image, ax=ax, label=cbar)
    if center is not None:
        colorbar.ax.axhline(center, color="black", linewidth=2)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    if m.size <= 400:
        for (r, c), v in np.ndenumerate(m):
            level = float(image.norm(v))  # white text on the dark ends of the colour map
            dark = level < 0.15 or level > 0.85 if center is not None else level < 0.5
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")  # fmt: skip
    return _save(fig, path)


def draw_heatmap(name, matrix, rows, cols, title, out: Path, center=None, cbar="share") -> dict:
    return {
        "png": heatmap_png(matrix, rows, cols, title, out / f"{name}.png", center, cbar),
        "html": heatmap_html(matrix, rows, cols, title, out / f"{name}.html"),
        "data": {"rows": list(rows), "cols": list(cols), "values": np.asarray(matrix).tolist()},
    }


def draw_bars(name, labels, series: dict[str, list[float]], title, out: Path) -> dict:
    """One panel per series, one bar per label."""
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, values) in zip(axes[0], series.items(), strict=True):
        ax.bar(range(len(labels)), values)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return {
        "png": _save(fig, out / f"{name}.png"),
        "data": {"labels": list(labels), **{k: list(v) for k, v in series.items()}},
    }


# -- training logs ---------------------------------------------------------------------------


def read_training_log(path) -> list[dict[str, float]]:
    """The ``train_inner`` records of a fairseq training run, oldest first, each with
    ``num_updates``. ``path``: a text log (``--log-format json`` or ``simple``) or a
    ``--tensorboard-logdir`` directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training log {path} does not exist")
    records = _read_tensorboard(path) if path.is_dir() else _read_text_log(path)
    if not records:
        raise ValueError(
            f"{path}: no train_inner records found (expected fairseq's json or simple log "
            "format, or a tensorboard log directory with a train_inner run)"
        )
    return records


def _read_text_log(path: Path) -> list[dict[str, float]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if "train_inner" not in line:
            continue
        brace = line.find("{")
        if brace >= 0:
            try:
                raw = json.loads(line[brace:])
            except json.JSONDecodeError:
                continue
        else:
            raw = dict(re.findall(r"(\w+)=([-+\w.]+)", line))
        record = {}
        for key, value in raw.items():
            try:
                record[key] = float(value)
            except (TypeError, ValueError):
                pass
        if "num_updates" in record:
            records.append(record)
    return records


def _read_tensorboard(path: Path) -> list[dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = path / "train_inner" if (path / "train_inner").is_dir() else path
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            by_step.setdefault(event.step, {"num_updates": float(event.step)})[tag] = event.value
    return [by_step[s] for s in sorted(by_step)]


def training_series(records) -> dict:
    """Per-expert loads per layer, balance loss and entropy over updates, from log records."""
    updates = [r["num_updates"] for r in records]
    loads: dict[str, dict[int, list[float]]] = {}
    for key in sorted({k for r in records for k in r}):
        match = LOAD_RE.match(key)
        if match:
            layer, expert = match.group(1), int(match.group(2))
            loads.setdefault(layer, {})[expert] = [r.get(key, float("nan")) for r in records]

    def model_order(layer):  # enc0, enc1, ..., dec0, ...
        digits = "".join(ch for ch in layer if ch.isdigit())
        return (layer.startswith("dec"), int(digits) if digits else 0, layer)

    return {
        "updates": updates,
        "loads": {
            layer: [loads[layer][e] for e in sorted(loads[layer])]
            for layer in sorted(loads, key=model_order)
        },
        "balance_loss": [r.get("moe_balance_loss", float("nan")) for r in records],
        "entropy": [r.get("moe_entropy", float("nan")) for r in records],
    }


def draw_training(series: dict, out: Path) -> tuple[dict, dict]:
    """Load per expert over updates (one panel per layer) and balance loss / entropy over
    updates. Returns (figures, skipped)."""
    figures, skipped = {}, {}
    updates = series["updates"]
    if series["loads"]:
        layers = list(series["loads"])
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 2.2 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            loads = series["loads"][layer]
            for e, values in enumerate(loads):
                ax.plot(updates, values, label=f"e{e}", linewidth=1)
            ax.axhline(1 / len(loads), color="black", linestyle="--", linewidth=1)
            ax.set_ylabel(f"{layer} share", fontsize=8)
        axes[-1, 0].set_xlabel("updates")
        axes[0, 0].legend(fontsize=6, ncol=8, loc="upper right")
        figures["train_expert_load"] = {
            "png": _save(fig, out / "train_expert_load.png"),
            "data": {"updates": updates, "loads": series["loads"]},
        }
    else:
        skipped["train_expert_load"] = "the training log has no moe_<layer>_load_e<i> metrics"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key in zip(axes, ("balance_loss", "entropy"), strict=True):
        ax.plot(updates, series[key])
        ax.set_title(f"moe_{key}", fontsize=9)
        ax.set_xlabel("updates")
    figures["train_balance_entropy"] = {
        "png": _save(fig, out / "train_balance_entropy.png"),
        "data": {k: series[k] for k in ("updates", "balance_loss", "entropy")},
    }
    return figures, skipped
