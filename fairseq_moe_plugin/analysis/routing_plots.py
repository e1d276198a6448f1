"""Pictures of routing statistics: matplotlib PNGs, and self-contained HTML heatmaps whose cells
show their value on hover (the HTML is written here: a plain table, no scripts).

Every ``draw_*`` writes its figure and returns the entry the summary lists for it:
``{"png": ..., "html": ... (heatmaps), "data": ...}``, where ``data`` is the exact numbers drawn.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def draw_training(series: dict, out: Path) -> tuple[dict, dict]:
    """Load per expert over updates (one panel per layer) and balance loss / entropy over
    updates, from ``training_log.training_series``. Returns (figures, skipped)."""
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
