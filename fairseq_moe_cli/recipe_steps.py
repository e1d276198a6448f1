"""The steps of the recipes in examples/ (translation: run.py, adapt_frozen_base.py;
classification: adapt_roberta.py): a command run as one step with its own log, and what the
recipes read back from fairseq-train's log (a console line per record, the training summary).

The paths are the repository's: this package is installed editable and lives in the repository
(``fairseq_moe_cli/``), so the repository is the folder above it.
"""

import os
import subprocess
import sys
from pathlib import Path

from fairseq_moe_plugin.analysis.training_log import (
    TRAIN,
    TRAIN_INNER,
    VALID,
    parse_line,
    read_training_log,
)
from fairseq_moe_plugin.naming import is_routing_metric

# fairseq_moe_cli/recipe_steps.py -> the repository (the editable install runs it in place).
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts
PLUGIN = REPO / "fairseq_moe_plugin"
PY = sys.executable


class StepFailed(RuntimeError):
    """A command of the recipe exited with an error; the message names its log."""


def run(cmd, log_file: Path, stream_filter=None) -> str:
    """Run ``cmd`` in the repository, its output to ``log_file``; lines matching
    ``stream_filter`` are echoed. Raises StepFailed naming the log on failure."""
    cmd = [str(c) for c in cmd]
    with open(log_file, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # fairseq logs to stdout: show it live
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=env)  # fmt: skip
        out = []
        for line in proc.stdout:
            f.write(line)
            out.append(line)
            if stream_filter is not None:
                shown = stream_filter(line)
                if shown:
                    print(shown, flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(out[-30:])
        raise StepFailed(f"step failed (exit {rc}): {' '.join(cmd[:2])} ... see {log_file}\n{tail}")
    return "".join(out)


def progress_line(line: str):
    """A compact console line for a training-log line (``training_log.parse_line``), or None."""
    parsed = parse_line(line)
    if parsed is None:
        return None
    tag, s = parsed
    if tag == VALID:
        return (f"  epoch {s.get('epoch', 0):g}: valid loss {s.get('loss')} "
                f"| balance {s.get('moe_balance_loss', '-')} | updates {s['num_updates']:g}")  # fmt: skip
    if tag == TRAIN_INNER:
        return (f"  update {s['num_updates']:g}: loss {s.get('loss')} "
                f"| balance {s.get('moe_balance_loss', '-')} "
                f"| dropped {s.get('moe_dropped_frac', '-')} | wps {s.get('wps')} "
                f"| wall {s.get('wall')} s")  # fmt: skip
    if tag == TRAIN:
        return (f"  epoch {s.get('epoch', 0):g}: train loss {s.get('loss')} "
                f"| wps {s.get('wps')} | wall {s.get('wall')} s")  # fmt: skip
    return None


def training_stats(train_log: Path, budget_minutes: float) -> tuple[dict, dict, dict]:
    """(the ``train`` entry of metrics.json, the routing metrics of the last validation, those of
    the last training record: the last epoch's, else the last ``train_inner``) from the training
    log (``training_log.read_training_log``)."""
    try:
        records = read_training_log(train_log)
    except ValueError:  # nothing logged yet
        return {"updates": 0, "epochs": 0, "words_per_s": None,
                "budget_minutes": budget_minutes}, {}, {}  # fmt: skip
    epochs = records.train
    last_valid = records.valid[-1] if records.valid else {}
    last_train = (epochs or records.train_inner or [{}])[-1]
    train = {
        "updates": records.num_updates(),
        "epochs": len(epochs),
        "words_per_s": (sum(r["wps"] for r in epochs) / len(epochs)
                        if epochs and all("wps" in r for r in epochs) else None),
        "budget_minutes": budget_minutes,
    }  # fmt: skip
    routing = {k: v for k, v in last_valid.items() if is_routing_metric(k)}
    return train, routing, {k: v for k, v in last_train.items() if is_routing_metric(k)}
