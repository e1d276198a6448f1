"""A test helper: a small synthetic parallel corpus (train/valid/test.{src,tgt}) that a tiny model
can learn in a few hundred updates: each source word ``s<i>`` translates to ``t<perm(i)>`` and
the order of every adjacent pair of words is swapped. Used by ``conftest.py`` and the recipe
tests; ``python tests/helpers/toy_corpus.py OUT_DIR`` writes one by hand."""

import argparse
import os
import random


def make_pair(rng: random.Random, vocab: int, perm, min_len: int, max_len: int):
    ids = [rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))]
    src = [f"s{i}" for i in ids]
    tgt = [f"t{perm[i]}" for i in ids]
    for j in range(0, len(tgt) - 1, 2):  # local reordering, so the decoder needs attention
        tgt[j], tgt[j + 1] = tgt[j + 1], tgt[j]
    return " ".join(src), " ".join(tgt)


def write_corpus(
    out_dir: str,
    n_train: int = 2000,
    n_valid: int = 100,
    n_test: int = 100,
    vocab: int = 24,
    min_len: int = 3,
    max_len: int = 10,
    seed: int = 1,
    src: str = "src",
    tgt: str = "tgt",
) -> None:
    rng = random.Random(seed)
    perm = list(range(vocab))
    rng.shuffle(perm)
    os.makedirs(out_dir, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        pairs = [make_pair(rng, vocab, perm, min_len, max_len) for _ in range(n)]
        with (
            open(os.path.join(out_dir, f"{split}.{src}"), "w", encoding="utf-8") as fs,
            open(os.path.join(out_dir, f"{split}.{tgt}"), "w", encoding="utf-8") as ft,
        ):
            for s, t in pairs:
                fs.write(s + "\n")
                ft.write(t + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--vocab", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    write_corpus(a.out_dir, a.train, a.valid, a.test, a.vocab, seed=a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
