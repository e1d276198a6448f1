"""Small GLUE-format fixtures with each task's real column layout (headers, CoLA's headerless
train/dev, MNLI's many columns), written by the tests."""

from pathlib import Path

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")  # fmt: skip
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                   "label4\tlabel5\tgold_label")  # fmt: skip
MNLI_TEST_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")  # fmt: skip


def _mnli_row(i, a, b, label=None, dev=False):
    parse = f"( {a} )"
    fields = [str(i), str(1000 + i), f"{i}e", "fiction", parse, f"( {b} )", parse, f"( {b} )", a, b]
    if label is not None:
        fields += [label] * (5 if dev else 1) + [label]
    return "\t".join(fields)


def write_mnli(root: Path, rows: dict[str, list[tuple[str, str, str]]]) -> Path:
    """``rows``: split -> [(sentence1, sentence2, label)]; test splits ignore the label."""
    d = root / "MNLI"
    d.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        if split == "train":
            lines = [MNLI_TRAIN_HEADER] + [
                _mnli_row(i, a, b, lab) for i, (a, b, lab) in enumerate(items)
            ]
        elif split.startswith("dev"):
            lines = [MNLI_DEV_HEADER] + [
                _mnli_row(i, a, b, lab, dev=True) for i, (a, b, lab) in enumerate(items)
            ]
        else:
            lines = [MNLI_TEST_HEADER] + [_mnli_row(i, a, b) for i, (a, b, _) in enumerate(items)]
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return d


def write_cola(root: Path, rows: dict[str, list[tuple[str, str]]]) -> Path:
    """CoLA: train/dev without header (source, label, original label, sentence); test with
    ``index\\tsentence``."""
    d = root / "CoLA"
    d.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        if split == "test":
            lines = ["index\tsentence"] + [f"{i}\t{s}" for i, (s, _) in enumerate(items)]
        else:
            lines = [f"gj04\t{lab}\t{'*' if lab == '0' else ''}\t{s}" for s, lab in items]
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return d


def write_simple(root: Path, task: str, header: str, rows: dict[str, list[str]]) -> Path:
    """Any task whose rows the caller formats; ``header`` for every split (None: no header)."""
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        text = ([header] if header else []) + lines
        (d / f"{split}.tsv").write_text("\n".join(text) + "\n")
    return d
