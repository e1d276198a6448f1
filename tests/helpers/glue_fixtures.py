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


def separable_sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """(sentence, label): label 1 iff the sentence holds a positive cue word; filler words are
    shared, so only the cue separates the classes."""
    import random

    rng = random.Random(seed)
    filler = [f"word{i}" for i in range(30)]
    cues = {"1": ["good", "great", "fine"], "0": ["bad", "awful", "poor"]}
    rows = []
    for _ in range(n):
        label = rng.choice("01")
        words = rng.sample(filler, rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(cues[label]))
        rows.append((" ".join(words), label))
    return rows


def write_sst2(root: Path, n_train=400, n_dev=60, n_test=40) -> Path:
    train, dev, test = (separable_sentences(n, seed) for n, seed in
                        ((n_train, 1), (n_dev, 2), (n_test, 3)))  # fmt: skip
    return write_simple(root, "SST-2", None, {
        "train": ["sentence\tlabel"] + [f"{s}\t{lab}" for s, lab in train],
        "dev": ["sentence\tlabel"] + [f"{s}\t{lab}" for s, lab in dev],
        "test": ["index\tsentence"] + [f"{i}\t{s}" for i, (s, _) in enumerate(test)],
    })  # fmt: skip


def write_separable_mnli(root: Path, n_train=300, n_dev=45) -> Path:
    """MNLI with the label carried by a cue word in the hypothesis."""
    import random

    rng = random.Random(7)
    cue = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(sorted(cue))
            premise = " ".join(f"word{rng.randint(0, 29)}" for _ in range(5))
            hypothesis = f"word{rng.randint(0, 29)} {cue[label]} word{rng.randint(0, 29)}"
            out.append((premise, hypothesis, label))
        return out

    return write_mnli(root, {"train": rows(n_train), "dev_matched": rows(n_dev),
                             "dev_mismatched": rows(n_dev), "test_matched": rows(20),
                             "test_mismatched": rows(20)})  # fmt: skip
