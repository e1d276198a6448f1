"""Text -> sentencepiece -> a fairseq dictionary, as the recipes in examples/ prepare their data
(translation: prepare_data.py; classification: prepare_classification.py): a unigram model
trained on text files, text encoded with it, and its vocabulary as a fairseq ``dict.txt``."""

import os
from pathlib import Path


def train_spm(files: list[Path], prefix: Path, vocab_size: int, max_sentences: int) -> None:
    """A unigram sentencepiece model of about ``vocab_size`` pieces trained on ``files`` (at
    most ``max_sentences`` lines, shuffled): ``prefix.model`` and ``prefix.vocab``."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files],
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=0.9995,  # covers CJK scripts
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def encode(model: Path, src: Path, dst: Path) -> None:
    """``src`` encoded line by line with the sentencepiece ``model`` into ``dst`` (pieces
    separated by spaces)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")


def write_fairseq_dict(vocab: Path, out: Path) -> None:
    """sentencepiece's vocabulary as a fairseq dictionary (specials are fairseq's own)."""
    with open(vocab, encoding="utf-8") as fin, open(out, "w", encoding="utf-8") as fout:
        for line in fin:
            piece = line.split("\t")[0]
            if piece in ("<unk>", "<s>", "</s>", "<pad>"):
                continue
            fout.write(f"{piece} 1\n")
