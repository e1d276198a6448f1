"""Tokenise and binarise a GLUE task directory once, into the layout fairseq's
``sentence_prediction`` reads (``input0/``, ``input1/``, ``label/``, each with ``dict.txt``).

The sentencepiece model is the one given, or one trained on the train split's text (cached with
the data). The cache directory is keyed by a hash of the GLUE files, the sentencepiece settings
and this module's format version, so an edited file is re-binarised and an unchanged one never
is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .glue_data import GlueTask, check_label_sets, read_split

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


def splits_present(task_dir: Path, task: GlueTask) -> list[str]:
    """train (required) and whichever dev/test splits exist."""
    if not (Path(task_dir) / "train.tsv").is_file():
        raise FileNotFoundError(f"{Path(task_dir) / 'train.tsv'}: missing {task.name} train file")
    return ["train"] + [s for s in task.dev_splits + task.test_splits
                        if (Path(task_dir) / f"{s}.tsv").is_file()]  # fmt: skip


def cache_key(task_dir: Path, task: GlueTask, splits, spm_model, vocab_size: int) -> str:
    h = hashlib.sha1(f"{FORMAT_VERSION}:{task.name}:{vocab_size}".encode())
    for split in splits:
        h.update((Path(task_dir) / f"{split}.tsv").read_bytes())
    if spm_model:
        h.update(Path(spm_model).read_bytes())
    return f"{task.name}-{h.hexdigest()[:12]}"


def build_cache(task_dir, task: GlueTask, cache_root, spm_model=None, vocab_size=8000) -> Path:
    """The binarised cache of ``task_dir`` (built if missing); returns its directory."""
    task_dir = Path(task_dir)
    if spm_model and not Path(spm_model).is_file():
        raise FileNotFoundError(f"--moe-glue-spm-model {spm_model}: no such sentencepiece model")
    splits = splits_present(task_dir, task)
    out = Path(cache_root) / cache_key(task_dir, task, splits, spm_model, vocab_size)
    if (out / "done.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a build that was interrupted before done.json
    examples = {split: read_split(task_dir, task, split) for split in splits}
    check_label_sets(task, examples)
    # Built under a per-process name and renamed into place: several workers of one training
    # run may build it at once, and a half-written cache is never read.
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_path = _sentencepiece(examples["train"], tmp, spm_model, vocab_size)
    _binarise(task, examples, tmp, model_path)
    (tmp / "done.json").write_text(json.dumps({
        "task": task.name, "source": str(task_dir), "splits": {s: len(e) for s, e in examples.items()},
        "spm_model": str(spm_model or "trained on train.tsv"), "vocab_size": vocab_size,
    }, indent=1))  # fmt: skip
    try:
        tmp.rename(out)
    except OSError:  # another worker finished first
        if not (out / "done.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"binarised {task.name} from {task_dir} into {out}")
    return out


def _sentencepiece(train, out: Path, spm_model, vocab_size: int) -> Path:
    import sentencepiece as spm

    target = out / "spm.model"
    if spm_model:
        shutil.copy(spm_model, target)
        return target
    text = out / "spm_train.txt"
    lines = [e.text_a for e in train] + [e.text_b for e in train if e.text_b is not None]
    text.write_text("\n".join(line for line in lines if line.strip()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "spm"), vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
        bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    text.unlink()
    return target


def _binarise(task: GlueTask, examples, out: Path, model_path: Path) -> None:
    import sentencepiece as spm
    from fairseq.data import Dictionary, indexed_dataset

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    dictionary = Dictionary()
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if piece != "<unk>":
            dictionary.add_symbol(piece)
    inputs = ["input0"] + (["input1"] if examples["train"][0].text_b is not None else [])
    for key in inputs:
        (out / key).mkdir()
        dictionary.save(str(out / key / "dict.txt"))
    (out / "label").mkdir()
    labels = Dictionary()
    for label in task.labels or ():
        labels.add_symbol(label)
    if not task.is_regression:
        labels.save(str(out / "label" / "dict.txt"))
    for split, rows in examples.items():
        for n, key in enumerate(inputs):
            texts = [r.text_a if n == 0 else r.text_b for r in rows]
            _write(out / key / split, [" ".join(sp.encode(t, out_type=str)) for t in texts],
                   dictionary, indexed_dataset)  # fmt: skip
        if rows[0].label is None:
            continue  # an unlabelled test split
        if task.is_regression:
            (out / "label" / f"{split}.label").write_text("\n".join(r.label for r in rows) + "\n")
        else:
            _write(out / "label" / split, [r.label for r in rows], labels, indexed_dataset)
    for split, rows in examples.items():
        (out / f"{split}.index").write_text("\n".join(r.index for r in rows) + "\n")


def _write(prefix: Path, lines, dictionary, indexed_dataset) -> None:
    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(dictionary))
    for line in lines:
        builder.add_item(
            dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long()
        )
    builder.finalize(f"{prefix}.idx")
