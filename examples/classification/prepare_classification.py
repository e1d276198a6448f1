#!/usr/bin/env python
"""The corpus of build_debian_corpus.py -> sentencepiece -> fairseq-preprocess, for masked-LM
pretraining and for fairseq's ``sentence_prediction`` task, with one dictionary.

Input (``--corpus DIR``): ``mlm.txt`` and ``{train,valid,test}.{text,label}``.

Output (``--out WORK``):
- ``spm.model``/``spm.vocab``: a unigram sentencepiece model trained on ``mlm.txt`` (the
  classification test and valid texts are not in it; see build_debian_corpus.py), and
  ``dict.txt``, its fairseq dictionary;
- ``data-bin/mlm``: ``mlm.txt`` binarised (``--only-source``) for fairseq's ``masked_lm`` task,
  its first ``--mlm-valid-size`` lines in sha1 order held out as ``valid``;
- ``data-bin/cls``: the layout of fairseq's ``sentence_prediction`` task: ``input0/`` (the
  encoded text, with ``dict.txt`` as ``--srcdict``) and ``label/`` (the sections; its own
  dictionary, built from the train labels);
- ``prepare.json``: counts, labels, the sentencepiece settings.

The steps are examples/translation/prepare_data.py's (``fairseq_moe_cli.recipe_data``:
``train_spm``, ``encode``, ``write_fairseq_dict``).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from fairseq_moe_cli.recipe_data import encode, train_spm, write_fairseq_dict

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Bad input; the message names the file and the problem."""


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing (run build_debian_corpus.py first)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"{path}: empty file")
    return lines


def check_corpus(corpus: Path) -> dict[str, int]:
    """Every file there and aligned; the number of examples per split."""
    counts = {}
    for split in SPLITS:
        text, label = (read_lines(corpus / f"{split}.{ext}") for ext in ("text", "label"))
        if len(text) != len(label):
            raise DataError(
                f"{corpus}/{split}.text has {len(text)} lines but {split}.label has "
                f"{len(label)}: they must be aligned line by line"
            )
        counts[split] = len(text)
    labels = {s: set(read_lines(corpus / f"{s}.label")) for s in SPLITS}
    for split in ("valid", "test"):
        unseen = sorted(labels[split] - labels["train"])
        if unseen:
            raise DataError(f"{corpus}/{split}.label has labels not in train: {unseen}")
    return counts


def split_mlm(corpus: Path, spm_dir: Path, valid_size: int) -> dict[str, int]:
    """``mlm.txt`` as ``spm_dir/mlm_raw.{train,valid}`` (valid: the first ``valid_size`` lines in
    sha1 order; the others keep their order)."""
    lines = read_lines(corpus / "mlm.txt")
    if len(lines) <= 2 * valid_size:
        valid_size = max(1, len(lines) // 10)
    order = sorted(range(len(lines)), key=lambda i: hashlib.sha1(lines[i].encode()).digest())
    held = set(order[:valid_size])
    parts = {"valid": [lines[i] for i in sorted(held)],
             "train": [x for i, x in enumerate(lines) if i not in held]}  # fmt: skip
    for name, part in parts.items():
        (spm_dir / f"mlm_raw.{name}").write_text("\n".join(part) + "\n", encoding="utf-8")
    return {name: len(part) for name, part in parts.items()}


def preprocess(args: list, dest: Path, log_file: Path, workers: int) -> None:
    """fairseq-preprocess --only-source; DataError naming its log when it fails."""
    cmd = [str(Path(sys.executable).parent / "fairseq-preprocess"), "--only-source",
           *map(str, args), "--destdir", str(dest), "--workers", str(workers)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log_file.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise DataError(f"fairseq-preprocess failed for {dest}: see {log_file}")


def prepare(a) -> dict:
    counts = check_corpus(a.corpus)
    spm_dir = a.out / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    mlm_counts = split_mlm(a.corpus, spm_dir, a.mlm_valid_size)
    print(f"prepare: sentencepiece ({a.vocab_size} pieces) on mlm.txt", flush=True)
    train_spm([spm_dir / "mlm_raw.train"], a.out / "spm", a.vocab_size, a.spm_max_sentences)
    model = a.out / "spm.model"
    for name in ("train", "valid"):
        encode(model, spm_dir / f"mlm_raw.{name}", spm_dir / f"mlm.{name}")
    for split in SPLITS:
        encode(model, a.corpus / f"{split}.text", spm_dir / f"{split}.input0")
    dictionary = a.out / "dict.txt"
    write_fairseq_dict(a.out / "spm.vocab", dictionary)
    bin_dir = a.out / "data-bin"
    print("prepare: fairseq-preprocess (mlm, input0, label)", flush=True)
    preprocess(["--trainpref", spm_dir / "mlm.train", "--validpref", spm_dir / "mlm.valid",
                "--srcdict", dictionary], bin_dir / "mlm", a.out / "preprocess.mlm.log",
               a.workers)  # fmt: skip
    preprocess(["--trainpref", spm_dir / "train.input0", "--validpref", spm_dir / "valid.input0",
                "--testpref", spm_dir / "test.input0", "--srcdict", dictionary],
               bin_dir / "cls" / "input0", a.out / "preprocess.input0.log", a.workers)  # fmt: skip
    preprocess([*(x for s in SPLITS for x in (f"--{s}pref", a.corpus / f"{s}.label"))],
               bin_dir / "cls" / "label", a.out / "preprocess.label.log", 1)  # fmt: skip
    labels = sorted(set(read_lines(a.corpus / "train.label")))
    return {
        "examples": counts,
        "labels": labels,
        "num_classes": len(labels),
        "mlm_lines": mlm_counts,
        "spm": {"model": str(model), "vocab_size": a.vocab_size, "type": "unigram"},
        "mlm_data": str(bin_dir / "mlm"),
        "cls_data": str(bin_dir / "cls"),
        "corpus": str(a.corpus),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="build_debian_corpus.py's --out")
    p.add_argument("--out", type=Path, required=True, help="work folder to write")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--mlm-valid-size", type=int, default=1000)
    p.add_argument("--spm-max-sentences", type=int, default=300000)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 2))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        summary = prepare(a)
    except DataError as err:
        print(f"prepare_classification: error: {err}", file=sys.stderr)
        return 2
    (a.out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"prepare: done: {summary['mlm_data']}, {summary['cls_data']} "
          f"({summary['num_classes']} labels)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
