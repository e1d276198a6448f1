"""Readers for the official GLUE directory layout, as distributed (``GLUE/<TASK>/*.tsv``).

Plain Python, no fairseq: every task's file names, column layout, header rule and label set, and
one ``read_split`` that returns ``Example``s or raises ``GlueFormatError`` naming the file, the
line and what was expected. Files are read as plain tab-separated text (no quoting: GLUE's
sentences contain quote characters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class GlueFormatError(ValueError):
    """A GLUE file that does not match its task's layout (or a split the task lacks)."""


@dataclass(frozen=True)
class Columns:
    """Where the fields are in one kind of file (0-based), and how many columns it has."""

    n_columns: int
    text_a: int
    text_b: int | None = None
    label: int | None = None  # None: an unlabelled (test) file
    index: int | None = None  # the row id a submission uses; None: the row number
    header: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str  # GLUE's directory name
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    train: Columns
    dev: Columns
    test: Columns
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_classes(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def columns(self, split: str) -> Columns:
        if split == "train":
            return self.train
        if split in self.dev_splits:
            return self.dev
        if split in self.test_splits:
            return self.test
        raise GlueFormatError(
            f"{self.name} has no split {split!r}; its splits are "
            f"{', '.join(('train',) + self.dev_splits + self.test_splits)}"
        )


_PAIR_TEST = Columns(3, text_a=1, text_b=2, index=0)  # index, sentence1, sentence2
_NLI = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        # CoLA train/dev have no header: source, label, original label (or blank), sentence.
        GlueTask("CoLA", ("0", "1"), Columns(4, 3, label=1, header=False),
                 Columns(4, 3, label=1, header=False), Columns(2, 1, index=0),
                 metrics=("mcc", "accuracy")),
        GlueTask("SST-2", ("0", "1"), Columns(2, 0, label=1), Columns(2, 0, label=1),
                 Columns(2, 1, index=0)),
        # Quality, #1 ID, #2 ID, #1 String, #2 String; test: index instead of Quality.
        GlueTask("MRPC", ("0", "1"), Columns(5, 3, 4, label=0), Columns(5, 3, 4, label=0),
                 Columns(5, 3, 4, index=0), metrics=("f1", "accuracy")),
        # index genre filename year old_index source1 source2 sentence1 sentence2 score
        GlueTask("STS-B", None, Columns(10, 7, 8, label=9), Columns(10, 7, 8, label=9),
                 Columns(9, 7, 8, index=0), metrics=("pearson", "spearman")),
        # id qid1 qid2 question1 question2 is_duplicate; test: id question1 question2
        GlueTask("QQP", ("0", "1"), Columns(6, 3, 4, label=5), Columns(6, 3, 4, label=5),
                 _PAIR_TEST, metrics=("f1", "accuracy")),
        # train: 12 columns (label1, gold_label), dev: 16 (label1..label5, gold_label), test: 10
        GlueTask("MNLI", ("contradiction", "entailment", "neutral"),
                 Columns(12, 8, 9, label=11, index=0), Columns(16, 8, 9, label=15, index=0),
                 Columns(10, 8, 9, index=0), dev_splits=("dev_matched", "dev_mismatched"),
                 test_splits=("test_matched", "test_mismatched")),
        GlueTask("QNLI", _NLI, Columns(4, 1, 2, label=3, index=0),
                 Columns(4, 1, 2, label=3, index=0), _PAIR_TEST),
        GlueTask("RTE", _NLI, Columns(4, 1, 2, label=3, index=0),
                 Columns(4, 1, 2, label=3, index=0), _PAIR_TEST),
        GlueTask("WNLI", ("0", "1"), Columns(4, 1, 2, label=3, index=0),
                 Columns(4, 1, 2, label=3, index=0), _PAIR_TEST),
    )
}  # fmt: skip


def glue_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Example:
    index: str  # the id used in a submission file
    text_a: str
    text_b: str | None
    label: str | None  # the raw label string (a float string for STS-B); None when unlabelled
    line: int  # 1-based line number in the file


def split_path(task_dir, task: GlueTask, split: str) -> Path:
    path = Path(task_dir) / f"{split}.tsv"
    task.columns(split)  # raises for an unknown split
    if not path.is_file():
        raise GlueFormatError(f"{path}: missing {task.name} {split} file")
    return path


def read_split(task_dir, task: GlueTask, split: str) -> list[Example]:
    """Every row of ``<task_dir>/<split>.tsv``, checked against the task's layout."""
    path = split_path(task_dir, task, split)
    cols = task.columns(split)
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or (cols.header and len(lines) == 1):
        raise GlueFormatError(f"{path}: empty file (expected {task.name} {split} rows)")
    start = 1 if cols.header else 0
    if cols.header:
        n = len(lines[0].rstrip("\r").split("\t"))
        if n != cols.n_columns:
            raise GlueFormatError(
                f"{path}:1: header has {n} columns, expected {cols.n_columns} for {task.name} {split}"
            )
    examples = []
    for number, raw in enumerate(lines[start:], start=start + 1):
        fields = raw.rstrip("\r").split("\t")
        if len(fields) != cols.n_columns:
            raise GlueFormatError(
                f"{path}:{number}: {len(fields)} columns, expected {cols.n_columns} "
                f"for {task.name} {split}"
            )
        label = fields[cols.label].strip() if cols.label is not None else None
        if label is not None:
            _check_label(task, label, path, number)
        examples.append(
            Example(
                index=fields[cols.index] if cols.index is not None else str(number - start - 1),
                text_a=fields[cols.text_a],
                text_b=fields[cols.text_b] if cols.text_b is not None else None,
                label=label,
                line=number,
            )
        )
    return examples


def _check_label(task: GlueTask, label: str, path: Path, line: int) -> None:
    if task.is_regression:
        try:
            float(label)
        except ValueError:
            raise GlueFormatError(
                f"{path}:{line}: label {label!r} is not a number ({task.name} is regression)"
            ) from None
    elif label not in task.labels:
        raise GlueFormatError(
            f"{path}:{line}: unknown label {label!r}, expected one of {', '.join(task.labels)}"
        )


def check_label_sets(task: GlueTask, by_split: dict[str, list[Example]]) -> None:
    """A label seen in a dev split but never in train is an error, not a silent remap."""
    if task.is_regression or "train" not in by_split:
        return
    train = {e.label for e in by_split["train"]}
    for split, examples in by_split.items():
        if split == "train" or split in task.test_splits:
            continue
        unseen = sorted({e.label for e in examples} - train)
        if unseen:
            raise GlueFormatError(
                f"{task.name}: {split} has labels {unseen} that train.tsv never uses "
                f"(train has {sorted(train)})"
            )
