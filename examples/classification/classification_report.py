"""What adapt_roberta.py reports per way of adapting, from the files its steps wrote:
trainable parameters and their share (fairseq-train's "num. shared model params" line),
checkpoint sizes (the file, its weights, its optimizer state; for adapter-only checkpoints the
full model's weights as the plugin logged them), training speed (fairseq's ``wps``: tokens per
second, the mean of the epoch records) and wall clock, test accuracy and macro-F1; and the
markdown table. The log parsing and sizes are ``fairseq_moe_cli.adaptation_report``'s."""

import json
from pathlib import Path

from fairseq_moe_cli import adaptation_report


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def pretrained_entry(out: Path, minutes: float) -> dict:
    run_dir = out / "pretrained"
    return {
        "checkpoint_path": str(out / "pretrained.pt"),
        "params": adaptation_report.trainable_parameters(run_dir / "train.log"),
        "checkpoint": adaptation_report.checkpoint_sizes(out / "pretrained.pt"),
        "train": _train(run_dir, minutes),
    }


def _train(run_dir: Path, minutes: float) -> dict:
    """fairseq's figures (updates, epochs, words/s, wall) and the process's wall clock."""
    train = adaptation_report.training(run_dir / "train.log", minutes)
    train["process_wall_s"] = _read_json(run_dir / "train.done").get("process_wall_s")
    return train


def method_entry(out: Path, name: str, what: str, minutes: float) -> dict:
    run_dir = out / name
    ckpt = run_dir / "checkpoints" / "checkpoint_best.pt"
    test = _read_json(run_dir / "test.json")
    return {
        "description": what,
        "checkpoint_path": str(ckpt),
        "params": adaptation_report.trainable_parameters(run_dir / "train.log"),
        "checkpoint": adaptation_report.checkpoint_sizes(ckpt, run_dir / "train.log"),
        "train": _train(run_dir, minutes),
        "test": {k: test[k] for k in ("n", "accuracy", "macro_f1", "f1_per_label")},
    }


def collect(a, out: Path, prep: dict, descriptions: dict, flags: dict) -> dict:
    """``metrics.json``: the settings, the data, the pretrained model, every way, the
    baselines."""
    sources = _read_json(Path(prep["corpus"]) / "sources.json")
    return {
        "run": a.run,
        "settings": {
            k: getattr(a, k)
            for k in (
                "pretrain_minutes",
                "adapt_minutes",
                "shape",
                "max_positions",
                "batch_size",
                "lr_pretrain",
                "lr_full",
                "lr_adapter",
                "adapt_warmup",
                "pretrain_warmup",
                "pretrain_max_tokens",
                "parallel_expert_ffn_dim",
                "router_temperature",
                "lora_rank",
                "max_update",
                "max_examples",
                "max_mlm_lines",
                "vocab_size",
            )
        },  # fmt: skip
        "checkpoints_without_optimizer_state": True,
        "data": {
            "labels": prep["labels"],
            "examples": sources["examples"],
            "mlm_lines": prep["mlm_lines"],
            "best_single_word": sources["best_single_word"],
        },  # fmt: skip
        "flags": flags,
        "pretrained": pretrained_entry(out, a.pretrain_minutes),
        "methods": {
            n: method_entry(out, n, what, a.adapt_minutes) for n, what in descriptions.items()
        },  # fmt: skip
        "baselines": _read_json(out / "baselines.json"),
    }


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(metrics: dict) -> str:
    """One row per way, then the baselines (no training figures)."""
    head = ["method", "trainable params", "share", "checkpoint MiB (full model)",
            "train tokens/s", "train wall min", "updates", "test accuracy", "test macro-F1"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in metrics["methods"].items():
        p, c, t, s = m["params"], m["checkpoint"], m["train"], m["test"]
        full = c["full_model_mib_logged"]
        size = _mib(c["file_bytes"]) + (f" ({full:.2f})" if full is not None else "")
        wall = t.get("process_wall_s")
        cells = [name, f"{p['trainable'] / 1e6:.3f}M of {p['total'] / 1e6:.3f}M",
                 f"{100 * p['share']:.1f}%", size, _num(t["words_per_s"], ".0f"),
                 _num(wall and wall / 60, ".2f"), str(t["updates"]),
                 f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for name, b in metrics["baselines"].items():
        cells = [name, "-", "-", "-", "-", "-", "-", f"{b['accuracy']:.4f}", f"{b['macro_f1']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
