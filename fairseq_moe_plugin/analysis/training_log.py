"""The one reader of ``fairseq-train``'s logs: every statistic it logs, as records of numbers.

fairseq's progress bar logs statistics under a tag (the logger name of a text line, the run
folder of a tensorboard log):

- ``train_inner``: the running training statistics, every ``--log-interval`` updates;
- ``train``: the statistics of each finished epoch;
- ``valid`` (or the validation subset's name): the statistics of each validation.

Sources: a text log (what ``fairseq-train`` prints with ``--log-format json`` or ``simple``,
e.g. ``... | INFO | valid | {"epoch": 1, "valid_loss": 3.2, ...}``), or a
``--tensorboard-logdir`` directory (one run folder per tag; a folder holding the event files
itself counts as ``train_inner``). A record maps each statistic's name to a float, without the
``<tag>_`` prefix of the json format (``valid_loss`` -> ``loss``), and keeps only records with
``num_updates``.

What is hand-written here: fairseq writes these logs but has no reader for them. Event files are
read with tensorboard's own ``EventAccumulator``; only the text lines are parsed here.

Plain Python (tensorboard imported only for a log directory); no torch or fairseq.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..naming import layer_order, parse_load_metric

TRAIN_INNER, TRAIN, VALID = "train_inner", "train", "valid"
# "<time> | INFO | <tag> | <stats>": the tag is the logger name fairseq's progress bar logs under.
_TAGS = r"train_inner|train|valid\w*"
_TAG_RE = re.compile(rf"^(?:{_TAGS})$")
_LINE_RE = re.compile(rf"\|\s*({_TAGS})\s*\|\s*(.*)$")
_KEY_EQ_VALUE_RE = re.compile(r"(\w+)=([-+\w.]+)")  # simple format, train_inner: "loss=3.2, ..."
_KEY_VALUE_RE = re.compile(r"^(\w+) ([-+\w.]+)$")  # simple format, epoch stats: "| loss 3.2 |"


@dataclass
class TrainingLog:
    """A training run's records per tag, each list oldest first."""

    path: Path
    records: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def train_inner(self) -> list[dict[str, float]]:
        return self.records.get(TRAIN_INNER, [])

    @property
    def train(self) -> list[dict[str, float]]:
        """One record per finished epoch."""
        return self.records.get(TRAIN, [])

    @property
    def valid(self) -> list[dict[str, float]]:
        return self.records.get(VALID, [])

    def num_updates(self) -> int:
        """The last update any record reports (0 without records)."""
        return int(max((r["num_updates"] for rs in self.records.values() for r in rs), default=0))


def _numbers(raw: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of ``raw``, ``prefix`` removed from the keys that have it."""
    record = {}
    for key, value in raw.items():
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        try:
            record[key] = float(value)
        except (TypeError, ValueError):
            pass
    return record


def parse_line(line: str) -> tuple[str, dict[str, float]] | None:
    """``(tag, record)`` of one line of a fairseq training log; None for any other line or a
    record without ``num_updates``."""
    match = _LINE_RE.search(line)
    if match is None:
        return None
    tag, text = match.group(1), match.group(2).strip()
    if text.startswith("{"):  # --log-format json
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(raw, dict):
            return None
        record = _numbers(raw, prefix="" if tag == TRAIN_INNER else f"{tag}_")
    else:  # --log-format simple
        raw = dict(_KEY_EQ_VALUE_RE.findall(text))
        if not raw:
            pieces = (_KEY_VALUE_RE.match(piece.strip()) for piece in text.split("|"))
            raw = dict(m.groups() for m in pieces if m is not None)
        record = _numbers(raw)
    if "num_updates" not in record:
        return None
    return tag, record


def _read_text_log(path: Path) -> dict[str, list[dict[str, float]]]:
    records: dict[str, list[dict[str, float]]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parsed = parse_line(line)
        if parsed is not None:
            records.setdefault(parsed[0], []).append(parsed[1])
    return records


def _read_tensorboard_run(run: Path) -> list[dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):  # fairseq logs every scalar at step = num_updates
            by_step.setdefault(event.step, {"num_updates": float(event.step)})[tag] = event.value
    return [by_step[s] for s in sorted(by_step)]


def _read_tensorboard(path: Path) -> dict[str, list[dict[str, float]]]:
    runs = {d.name: d for d in sorted(path.iterdir()) if d.is_dir() and _TAG_RE.match(d.name)}
    if not runs:  # the event files of one run, directly in the folder
        runs = {TRAIN_INNER: path}
    records = {tag: _read_tensorboard_run(run) for tag, run in runs.items()}
    return {tag: rs for tag, rs in records.items() if rs}


def read_training_log(path) -> TrainingLog:
    """Every record of a fairseq training log (see the module doc for the formats).

    Raises FileNotFoundError for a missing path, ValueError naming the path when it holds no
    record at all (not a fairseq training log, or a run that logged nothing yet)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training log {path} does not exist")
    records = _read_tensorboard(path) if path.is_dir() else _read_text_log(path)
    if not records:
        raise ValueError(
            f"{path}: no train_inner records found, nor train or valid ones (expected "
            "fairseq's json or simple log format, or a tensorboard log directory)"
        )
    return TrainingLog(path, records)


def training_series(records: list[dict[str, float]]) -> dict:
    """Per-expert loads per layer, balance loss and entropy over updates, from ``train_inner``
    records: ``{"updates", "loads": {short layer: E lists}, "balance_loss", "entropy"}``, the
    layers in model order. A value a record lacks is NaN."""
    updates = [r["num_updates"] for r in records]
    loads: dict[str, dict[int, list[float]]] = {}
    for key in sorted({k for r in records for k in r}):
        parsed = parse_load_metric(key)
        if parsed is not None:
            layer, expert = parsed
            loads.setdefault(layer, {})[expert] = [r.get(key, float("nan")) for r in records]
    return {
        "updates": updates,
        "loads": {
            layer: [loads[layer][e] for e in sorted(loads[layer])]
            for layer in sorted(loads, key=layer_order)
        },
        "balance_loss": [r.get("moe_balance_loss", float("nan")) for r in records],
        "entropy": [r.get("moe_entropy", float("nan")) for r in records],
    }
