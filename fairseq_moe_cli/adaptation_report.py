"""What the adaptation recipes report per model (translation: examples/translation/
adapt_frozen_base.py; classification: examples/classification/adapt_roberta.py): trainable
parameters (from fairseq-train's log), checkpoint sizes (the file, and the model weights and
optimizer state inside it), training speed and wall clock, BLEU/chrF per language, forgetting on
the pretraining direction; the markdown table of all of them, the results files, and a training
step's resumability. Plain functions on files; no fairseq needed (torch loads the checkpoints)."""

import json
import re
import shutil
import time
from pathlib import Path

from fairseq_moe_cli.recipe_steps import training_stats
from fairseq_moe_plugin.analysis.training_log import read_training_log

# fairseq_cli/train.py logs both lines at start; a frozen parameter counts in the first number
# only. "expert" parameters are those of expert-parallel shards (none on one process).
_PARAMS = re.compile(r"num\. (shared|expert) model params: ([\d,]+) \(num\. trained: ([\d,]+)\)")
# fairseq_moe_plugin/models/adapter_checkpoint.py logs this once per adapter-only model.
_ADAPTER = re.compile(
    r"adapter-only checkpoint: .*?([\d.]+) MiB of weights instead of ([\d.]+) MiB"
)


def trainable_parameters(train_log: Path) -> dict:
    """``{"total", "trainable", "share"}`` from fairseq-train's parameter lines; ValueError when
    the log has none (the run did not get as far as building the model)."""
    text = train_log.read_text(encoding="utf-8")
    found = {kind: (int(total.replace(",", "")), int(trained.replace(",", "")))
             for kind, total, trained in _PARAMS.findall(text)}  # fmt: skip
    if "shared" not in found:
        raise ValueError(f"{train_log}: no 'num. shared model params' line from fairseq-train")
    total = sum(t for t, _ in found.values())
    trainable = sum(t for _, t in found.values())
    return {"total": total, "trainable": trainable, "share": trainable / total}


def _tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in a nested dict/list (optimizer states nest), each storage counted
    once, as torch.save writes it (tied embeddings are one storage under several names)."""
    import torch

    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def checkpoint_sizes(ckpt: Path, train_log: Path | None = None) -> dict:
    """The checkpoint file's size, the bytes of its model weights (``state["model"]``) and of its
    optimizer state; for an adapter-only checkpoint also the full model's weights, as the plugin
    logged them when it trimmed the state dict."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    sizes = {
        "file_bytes": ckpt.stat().st_size,
        "model_bytes": _tensor_bytes(state["model"]),
        "optimizer_bytes": _tensor_bytes(state.get("last_optimizer_state")),
        "adapter_only": bool(_cfg_model(state).get("moe_save_trainable_only", False)),
        "full_model_mib_logged": None,
    }
    if train_log is not None and sizes["adapter_only"]:
        match = _ADAPTER.search(train_log.read_text(encoding="utf-8"))
        sizes["full_model_mib_logged"] = float(match.group(2)) if match else None
    return sizes


def _cfg_model(state: dict) -> dict:
    model_cfg = (state.get("cfg") or {}).get("model") or {}
    return model_cfg if isinstance(model_cfg, dict) else vars(model_cfg)


def previous_training_time(ckpt: Path) -> float:
    """Seconds of training a fairseq checkpoint records. fairseq-train adds them to the clock
    that ``--stop-time-hours`` reads even with ``--reset-meters``, so a run restored from this
    checkpoint must add them to its budget to get its own."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return float((state.get("extra_state") or {}).get("previous_training_time", 0.0))


def training(train_log: Path, budget_minutes: float) -> dict:
    """updates, epochs, mean words/s (``wps`` of the epoch records) and fairseq's wall clock."""
    train, _, _ = training_stats(train_log, budget_minutes)
    try:
        records = read_training_log(train_log)
        last = records.train[-1] if records.train else {}
    except ValueError:
        last = {}
    train["wall_s"] = last.get("wall")
    train["train_wall_s"] = last.get("train_wall")
    return train


def scores_entry(scores: dict) -> dict:
    results = scores["results"]
    return {
        "bleu": {lang: r["bleu"]["score"] for lang, r in results.items()},
        "chrf": {lang: r["chrf"]["score"] for lang, r in results.items()},
        "sentences": {lang: r["num_sentences"] for lang, r in results.items()},
    }


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(metrics: dict) -> str:
    """One row per model: the pretrained one, then every adaptation."""
    old, new = metrics["pretrain_lang"], metrics["new_langs"]
    head = ["model", "trainable params", "share", "ckpt MiB (weights / optimizer)",
            "train words/s", "train wall min", "updates",
            *[f"BLEU / chrF {lang}" for lang in new], f"BLEU {old} before → after"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    before = metrics["models"]["pretrained"]["bleu"][old]
    for name, m in metrics["models"].items():
        p, c, t = m["params"], m["checkpoint"], m["train"]
        wall = t.get("wall_s")
        cells = [name, f"{p['trainable'] / 1e6:.2f}M of {p['total'] / 1e6:.2f}M",
                 f"{100 * p['share']:.1f}%",
                 f"{_mib(c['file_bytes'])} ({_mib(c['model_bytes'])} / {_mib(c['optimizer_bytes'])})",
                 _num(t["words_per_s"], ".0f"), _num(wall and wall / 60, ".1f"), str(t["updates"]),
                 *[f"{m['bleu'][lang]:.1f} / {m['chrf'][lang]:.1f}" for lang in new],
                 f"{before:.1f} → {m['bleu'][old]:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, metrics: dict, table: str, t0: float, log) -> None:
    """``metrics.json`` (with the run's wall clock since ``t0``) and ``table.md`` in ``out``;
    prints the table and logs where they are."""
    metrics["wall_minutes"] = (time.time() - t0) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)
    log(f"done in {metrics['wall_minutes']:.1f} min: {out / 'metrics.json'}, {out / 'table.md'}")


def fresh_run_dir(run_dir: Path, log) -> Path | None:
    """A training step's resumability: its best checkpoint when ``train.done`` says it finished
    (nothing to do); else None, after removing the checkpoints an unfinished run left."""
    ckpt_dir = run_dir / "checkpoints"
    if (run_dir / "train.done").exists():
        return ckpt_dir / "checkpoint_best.pt"
    if ckpt_dir.exists():
        log(f"{run_dir.name}: an unfinished training run is there; starting it over")
        shutil.rmtree(ckpt_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None
