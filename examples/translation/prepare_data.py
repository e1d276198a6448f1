#!/usr/bin/env python
"""Parallel text -> joint sentencepiece -> fairseq-preprocess, for one or several language pairs.

Input (``--raw DIR``), per pair ``SRC-TGT`` and split in train/valid/test, either
``DIR/{split}.SRC-TGT.{SRC,TGT}`` (several pairs, as build_gettext_corpus.py writes) or
``DIR/{split}.{SRC,TGT}`` (plain parallel text, one sentence per line). Nothing here assumes the
gettext domain.

Output (``--out WORK``):
- ``WORK/spm.model``, ``WORK/spm.vocab``: one sentencepiece model for all languages (or the one
  given with ``--spm-model``);
- ``WORK/spm/{split}.SRC-TGT.{SRC,TGT}``: the encoded text;
- ``WORK/data-bin``: binarised with one shared dictionary (``dict.<lang>.txt`` for every
  language), the layout of fairseq's ``translation_multi_simple_epoch`` task (and, for one pair,
  of the plain ``translation`` task);
- ``WORK/prepare.json``: languages, pairs, sentence counts, the sentencepiece settings.

Every input problem (a missing or empty file, a line-count mismatch, an unknown language, a
missing sentencepiece model) stops the script before any work, naming the file and the problem.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fairseq_moe_cli.recipe_data import encode, train_spm, write_fairseq_dict

SPLITS = ("train", "valid", "test")
LANG_RE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]+)*(@[A-Za-z]+)?$")


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


def parse_pairs(pairs: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs.split(","):
        parts = pair.strip().split("-")
        if len(parts) != 2 or not all(LANG_RE.match(p) for p in parts):
            raise DataError(f"--pairs: {pair!r} is not a language pair like en-de")
        out.append((parts[0], parts[1]))
    if not out:
        raise DataError("--pairs is empty")
    return out


def available_languages(raw: Path) -> list[str]:
    langs = set()
    for f in raw.glob("train.*"):
        langs.add(f.name.rsplit(".", 1)[-1])
    return sorted(langs)


def pair_files(raw: Path, split: str, src: str, tgt: str) -> tuple[Path, Path]:
    """The two files of ``src-tgt`` in ``split``; raises DataError naming what is missing."""
    for s, t in (
        (raw / f"{split}.{src}-{tgt}.{src}", raw / f"{split}.{src}-{tgt}.{tgt}"),
        (raw / f"{split}.{src}", raw / f"{split}.{tgt}"),
    ):
        if s.exists() and t.exists():
            return s, t
    known = available_languages(raw)
    for lang in (src, tgt):
        if lang not in known:
            raise DataError(
                f"unknown language code {lang!r}: {raw} has no file for it "
                f"(expected {split}.{src}-{tgt}.{lang} or {split}.{lang}); "
                f"languages found there: {', '.join(known) or 'none'}"
            )
    raise DataError(
        f"{raw}: no {split} files for {src}-{tgt} "
        f"(expected {split}.{src}-{tgt}.{src}/.{tgt} or {split}.{src}/{split}.{tgt})"
    )


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def validate(raw: Path, pairs) -> dict:
    """Check every file before any work; return ``{(split, src, tgt): (src_file, tgt_file, n)}``."""
    if not raw.is_dir():
        raise DataError(f"--raw {raw}: no such directory")
    found = {}
    for src, tgt in pairs:
        for split in SPLITS:
            s, t = pair_files(raw, split, src, tgt)
            ns, nt = count_lines(s), count_lines(t)
            for path, n in ((s, ns), (t, nt)):
                if n == 0:
                    raise DataError(f"{path}: empty file")
            if ns != nt:
                raise DataError(
                    f"line counts differ: {s} has {ns} lines, {t} has {nt}; "
                    "parallel files must be aligned line by line"
                )
            found[(split, src, tgt)] = (s, t, ns)
    return found


def check_inputs(a) -> tuple[list[tuple[str, str]], dict]:
    """The pairs and the files found for them; DataError naming the first bad input."""
    pairs = parse_pairs(a.pairs)
    found = validate(a.raw, pairs)
    if a.spm_model is not None and not a.spm_model.is_file():
        raise DataError(f"--spm-model {a.spm_model}: no such sentencepiece model")
    if a.spm_model is not None and not a.spm_model.with_suffix(".vocab").is_file():
        raise DataError(
            f"--spm-model {a.spm_model}: its vocabulary "
            f"{a.spm_model.with_suffix('.vocab')} is missing"
        )
    return pairs, found


def sentencepiece(a, found: dict) -> Path:
    """``WORK/spm.model`` (given, or trained on the train files) and the text encoded with it
    in ``WORK/spm/``; returns that folder."""
    model = a.out / "spm.model"
    if a.spm_model is not None:
        shutil.copy(a.spm_model, model)
        shutil.copy(a.spm_model.with_suffix(".vocab"), a.out / "spm.vocab")
    else:
        train_files = sorted(
            {f for (split, *_), (s, t, _) in found.items() if split == "train" for f in (s, t)}
        )
        print(f"prepare_data: training sentencepiece ({a.vocab_size} pieces) on "
              f"{len(train_files)} files", flush=True)  # fmt: skip
        train_spm(train_files, a.out / "spm", a.vocab_size, a.spm_max_sentences)
    enc_dir = a.out / "spm"
    enc_dir.mkdir(exist_ok=True)
    for (split, src, tgt), (s, t, _) in found.items():
        encode(model, s, enc_dir / f"{split}.{src}-{tgt}.{src}")
        encode(model, t, enc_dir / f"{split}.{src}-{tgt}.{tgt}")
    return enc_dir


def binarise(a, pairs, enc_dir: Path) -> Path:
    """fairseq-preprocess of every pair into ``WORK/data-bin`` with the shared dictionary;
    DataError naming the pair when it fails."""
    bin_dir = a.out / "data-bin"
    bin_dir.mkdir(exist_ok=True)
    shared_dict = a.out / "dict.txt"
    write_fairseq_dict(a.out / "spm.vocab", shared_dict)
    preprocess = Path(sys.executable).parent / "fairseq-preprocess"
    for src, tgt in pairs:
        cmd = [str(preprocess), "--source-lang", src, "--target-lang", tgt,
               "--trainpref", f"{enc_dir}/train.{src}-{tgt}",
               "--validpref", f"{enc_dir}/valid.{src}-{tgt}",
               "--testpref", f"{enc_dir}/test.{src}-{tgt}",
               "--destdir", str(bin_dir), "--srcdict", str(shared_dict),
               "--tgtdict", str(shared_dict), "--workers", str(a.workers)]  # fmt: skip
        print(f"prepare_data: binarising {src}-{tgt}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            raise DataError(f"fairseq-preprocess failed for {src}-{tgt}")
    for lang in sorted({lang for pair in pairs for lang in pair}):  # dict.<lang>.txt for each
        shutil.copy(shared_dict, bin_dir / f"dict.{lang}.txt")
    return bin_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder of parallel text")
    p.add_argument("--pairs", required=True, help="comma-separated pairs, e.g. en-de,en-fr")
    p.add_argument("--out", type=Path, required=True, help="work folder to write")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    p.add_argument("--spm-model", type=Path, help="use this sentencepiece model, do not train one")
    p.add_argument("--spm-max-sentences", type=int, default=300000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    try:
        pairs, found = check_inputs(a)
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        bin_dir = binarise(a, pairs, sentencepiece(a, found))
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    summary = {
        "languages": sorted({lang for pair in pairs for lang in pair}),
        "pairs": [f"{s}-{t}" for s, t in pairs],
        "sentences": {f"{split}.{s}-{t}": n for (split, s, t), (_, _, n) in found.items()},
        "spm": {"model": str(a.out / "spm.model"), "vocab_size": a.vocab_size, "type": "unigram",
                "given": str(a.spm_model) if a.spm_model else None},
        "raw": str(a.raw),
    }  # fmt: skip
    (a.out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"prepare_data: done: {bin_dir} ({', '.join(summary['pairs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
