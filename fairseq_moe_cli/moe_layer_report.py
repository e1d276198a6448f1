"""The report of ``benchmark_moe_layer``: per-setting summary, the targets, markdown tables.

A summary entry is one (device, T, E, k, malloc, mode): ``malloc`` is the allocator set-up its
process ran with (``default`` or ``tuned``, see ``benchmark_moe_layer``), and each is checked on
its own.

``TARGETS`` is the issue's targets for the layer, as data: each names the summary value it
checks, its bound, and the E it applies to; all apply only at ``TARGET_SETTING`` (CPU fp32,
fwd+bwd, T = 8192 or 32768, k = 1 or 2, d_model 512, d_ff 2048, 2 torch threads, either
allocator set-up):

- the layer's fwd+bwd time at most 1.1 x the dense limit's (``dense_over_moe >= 1/1.1``) at
  E = 8, 16 and 64;
- never slower than the grouped_mm reference (``grouped_mm_over_moe >= 1``) at E = 8, 16, 64;
- at least 3x faster than GShard's einsum dispatch (any E), 2x faster than HF's per-expert loop
  over stacked weights (E = 64), and peak memory within its budget (any E);
- reported only: the speed-up over the per-expert-module loop (E = 64).

``target_checks`` applies whichever targets match a run's settings, one line per target and
entry naming T, E, k and malloc; other settings are reported without checks.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "fwd+bwd")
MALLOC_MODES = ("default", "tuned")
# The references a summary entry has a ``<ref>_over_moe`` ratio for (> 1: moe is faster).
REFERENCES = ("dense", "grouped_mm", "naive_loop", "naive_loop_modules", "einsum",
              "moe_fresh_grads")  # fmt: skip

# The settings every target is defined at, as the values allowed: a summary entry's device, T, k,
# malloc and mode, and the run's d_model, d_ff and torch threads (CPU runs fp32).
TARGET_SETTING = {"device": ("cpu",), "tokens": (8192, 32768), "k": (1, 2),
                  "malloc": MALLOC_MODES, "mode": ("fwd+bwd",), "d_model": (512,),
                  "d_ff": (2048,), "threads": (2,)}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """``value`` (a key of a summary entry) ``op`` ``bound``; ``op`` None: reported only."""

    check: str
    value: str
    op: str | None = None  # ">=" or "<="
    bound: float | None = None
    experts: tuple[int, ...] | None = None  # the E it applies to; None: every E


TARGETS = (
    Target("throughput / dense (moe time <= 1.1 x dense)", "dense_over_moe", ">=", 1 / 1.1,
           experts=(8, 16, 64)),
    Target("speed-up over grouped_mm", "grouped_mm_over_moe", ">=", 1.0, experts=(8, 16, 64)),
    Target("speed-up over einsum", "einsum_over_moe", ">=", 3),
    Target("speed-up over the naive loop (HF, stacked experts)", "naive_loop_over_moe", ">=", 2,
           experts=(64,)),
    # Not a target: the per-expert-module loop is within ~1.6x of the dense limit, so a 2x margin
    # over it would need the layer to beat the dense limit itself.
    Target("speed-up over the per-expert-module loop", "naive_loop_modules_over_moe",
           experts=(64,)),
    Target("peak memory / budget", "memory_over_budget", "<=", 1),
)  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (device, T, E, k, malloc, mode) with times in ms and ratios to the
    references (rows without ``malloc``, from older reports, count as ``default``)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        setting = (row["device"], row["tokens"], row["experts"], row["k"])
        setting += (row.get("malloc", "default"),)
        for mode in MODES if "skipped" in row else (row["mode"],):
            groups.setdefault(setting + (mode,), {})[row["impl"]] = row
    out = []
    for (device, tokens, experts, k, malloc, mode), by_impl in groups.items():
        entry = {"device": device, "tokens": tokens, "experts": experts, "k": k}
        entry.update(malloc=malloc, mode=mode)
        ms = {
            impl: r["median_s"] * 1e3
            for impl, r in by_impl.items()
            if "median_s" in r and r.get("mode") == mode
        }
        entry["ms"] = ms
        entry["skipped"] = {i: r["skipped"] for i, r in by_impl.items() if "skipped" in r}
        moe = ms.get("moe")
        if moe:
            entry["moe_tokens_per_s"] = tokens / moe * 1e3
            for ref in REFERENCES:
                if ref in ms:
                    entry[f"{ref}_over_moe"] = ms[ref] / moe  # > 1: moe is faster
            moe_row = by_impl["moe"]
            if "router_s" in moe_row:
                router, experts_ = moe_row["router_s"] * 1e3, moe_row["experts_s"] * 1e3
                entry["router_share"] = router / moe
                entry["experts_share"] = experts_ / moe
                entry["dispatch_share"] = max(0.0, 1.0 - (router + experts_) / moe)
            if "peak_bytes" in moe_row and "dense" in by_impl and "peak_bytes" in by_impl["dense"]:
                dense_row = by_impl["dense"]
                budget = 1.1 * (
                    dense_row["peak_bytes"]
                    - dense_row["dense_weight_bytes"]
                    + moe_row["expert_weight_bytes"]
                )
                entry["moe_peak_mib"] = moe_row["peak_bytes"] / 2**20
                entry["dense_peak_mib"] = dense_row["peak_bytes"] / 2**20
                entry["memory_budget_mib"] = budget / 2**20
                entry["memory_over_budget"] = moe_row["peak_bytes"] / budget
            if "load" in moe_row:
                entry["load_max_over_mean"] = moe_row["load"]["max_over_mean"]
        out.append(entry)
    return out


def _applies(target: Target, setting: dict) -> bool:
    return all(setting[key] in values for key, values in TARGET_SETTING.items()) and (
        target.experts is None or setting["experts"] in target.experts
    )


def target_checks(summary: list[dict], args) -> list[dict]:
    """Every target of ``TARGETS`` that applies to a summary entry (with the run's d_model, d_ff
    and threads): ``{"check", "value"}`` and ``"ok"`` for a target with a bound. The check names
    the entry's T, E, k and malloc."""
    checks = []
    for entry in summary:
        setting = dict(entry, d_model=args.d_model, d_ff=args.d_ff, threads=args.threads)
        where = f"T={entry['tokens']} E={entry['experts']} k={entry['k']} malloc={entry['malloc']}"
        for target in TARGETS:
            if not _applies(target, setting) or target.value not in entry:
                continue
            value = entry[target.value]
            if target.op is None:
                checks.append({"check": f"{where}: {target.check}", "value": value})
                continue
            ok = value >= target.bound if target.op == ">=" else value <= target.bound
            check = f"{where}: {target.check} {target.op} {target.bound:.3g}"
            checks.append({"check": check, "value": value, "ok": ok})
    return checks


def target_setting_text() -> str:
    """``device cpu, tokens 8192 or 32768, ...``: the settings the targets apply to."""
    return ", ".join(
        f"{key} {' or '.join(str(v) for v in values)}" for key, values in TARGET_SETTING.items()
    )


def _cell(entry: dict, impl: str, ratio_key: str | None = None) -> str:
    if impl in entry["ms"]:
        ms = entry["ms"][impl]
        text = f"{ms:,.0f}" if ms >= 10 else f"{ms:.1f}"
        if ratio_key and ratio_key in entry:
            text += f" ({entry[ratio_key]:.2f}x)"
        return text
    return "skipped" if impl in entry["skipped"] else "-"


def markdown_tables(summary: list[dict]) -> str:
    lines = []
    for mode in MODES:
        entries = [s for s in summary if s["mode"] == mode]
        if not entries:
            continue
        lines.append(f"\n**{mode}** (ms, median; `(Nx)` = that reference's time / moe's time)\n")
        header = [
            "device",
            "T",
            "E",
            "k",
            "malloc",
            "dense",
            "moe",
            "moe throughput / dense",
            "moe, fresh grads",
            "grouped_mm",
            "naive loop",
            "naive loop (modules)",
            "einsum",
            "moe tokens/s",
        ]
        if mode == "fwd+bwd":
            header += ["peak MiB moe / dense / budget", "router %", "dispatch %"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for s in entries:
            cells = [
                s["device"],
                str(s["tokens"]),
                str(s["experts"]),
                str(s["k"]),
                s["malloc"],
                _cell(s, "dense"),
                _cell(s, "moe"),
                f"{s['dense_over_moe']:.2f}" if "dense_over_moe" in s else "-",
                _cell(s, "moe_fresh_grads"),
                _cell(s, "grouped_mm", "grouped_mm_over_moe"),
                _cell(s, "naive_loop", "naive_loop_over_moe"),
                _cell(s, "naive_loop_modules", "naive_loop_modules_over_moe"),
                _cell(s, "einsum", "einsum_over_moe"),
                f"{s['moe_tokens_per_s']:,.0f}" if "moe_tokens_per_s" in s else "-",
            ]
            if mode == "fwd+bwd":
                if "memory_budget_mib" in s:
                    cells.append(
                        f"{s['moe_peak_mib']:,.0f} / {s['dense_peak_mib']:,.0f} / "
                        f"{s['memory_budget_mib']:,.0f}"
                    )
                else:
                    cells.append("-")
                cells.append(f"{100 * s['router_share']:.1f}" if "router_share" in s else "-")
                cells.append(f"{100 * s['dispatch_share']:.1f}" if "dispatch_share" in s else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
