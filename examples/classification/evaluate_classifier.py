#!/usr/bin/env python
"""Test-set accuracy and macro-F1 of fairseq ``sentence_prediction`` checkpoints (dense
``roberta`` or ``moe_roberta``, adapter-only ones included), and of two reference baselines.

Each checkpoint is loaded with ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` (the
plugin imported first), on the binarised data of prepare_classification.py; its
classification head scores every test sentence and the arg-max is the prediction. An
adapter-only checkpoint (``--moe-save-trainable-only``) takes its frozen weights from the base
checkpoint it records; ``--base PATH`` overrides that path (``moe_base_checkpoint``), e.g. when
the results folder moved.

    python examples/classification/evaluate_classifier.py --data WORK/data-bin/cls \\
        --checkpoint full_ft=results/cls/full_ft/checkpoints/checkpoint_best.pt \\
        --out-dir results/cls [--base results/cls/pretrained.pt] [--baselines CORPUS]

writes ``OUT/<name>/test.json`` per checkpoint (skipped when it exists) and, with
``--baselines``, ``OUT/baselines.json``: the majority class, and a TF-IDF (word 1-2 grams)
logistic regression trained on the train split (scikit-learn), for scale.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from fairseq_moe_plugin.analysis.classification import head_labels, predict, scores

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "fairseq_moe_plugin"


def load(ckpt: Path, data: Path, base: Path | None):
    """(model in eval mode, task, the name of its classification head)."""
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(argparse.Namespace(user_dir=str(PLUGIN)))
    overrides = {"data": str(data)}
    if base is not None:
        overrides["moe_base_checkpoint"] = str(base)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(ckpt)], arg_overrides=overrides
    )
    head = getattr(cfg.criterion, "classification_head_name", "sentence_classification_head")
    return models[0].eval(), task, head


def evaluate_checkpoint(ckpt: Path, data: Path, base, split: str, batch_size: int) -> dict:
    t0 = time.time()
    model, task, head = load(ckpt, data, base)
    gold, pred = predict(model, task, head, split, batch_size)
    labels = head_labels(task)
    return {"checkpoint": str(ckpt), "split": split, **scores(gold, pred, labels),
            "eval_seconds": time.time() - t0}  # fmt: skip


def read_split(corpus: Path, split: str) -> tuple[list[str], list[str]]:
    text = (corpus / f"{split}.text").read_text(encoding="utf-8").splitlines()
    label = (corpus / f"{split}.label").read_text(encoding="utf-8").splitlines()
    return text, label


def baselines(corpus: Path) -> dict:
    """The majority class and TF-IDF + logistic regression, on ``corpus``'s test split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = read_split(corpus, "train")
    test_x, test_y = read_split(corpus, "test")
    labels = sorted(set(train_y))
    majority = max(labels, key=train_y.count)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=5.0)
    clf.fit(vectorizer.fit_transform(train_x), train_y)
    pred = list(clf.predict(vectorizer.transform(test_x)))
    return {
        "majority": {"label": majority, **scores(test_y, [majority] * len(test_y), labels)},
        "tfidf_logreg": {
            "features": "tf-idf word 1-2 grams, min_df 2",
            "C": 5.0,
            **scores(test_y, pred, labels),
        },  # fmt: skip
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the sentence_prediction data-bin")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--out-dir", type=Path, required=True, help="writes OUT/<NAME>/test.json")
    p.add_argument("--base", type=Path, help="base checkpoint of adapter-only checkpoints")
    p.add_argument("--baselines", type=Path, metavar="CORPUS", help="also the baselines")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    bad = [c for c in a.checkpoint if "=" not in c]
    if bad:
        p.error(f"--checkpoint {bad[0]!r}: expected NAME=PATH")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    for name, path in (c.split("=", 1) for c in a.checkpoint):
        out = a.out_dir / name / f"{a.split}.json"
        if out.exists():
            continue
        if not Path(path).is_file():
            print(f"evaluate_classifier: error: {name}: no checkpoint {path}", file=sys.stderr)
            return 2
        try:
            result = evaluate_checkpoint(Path(path), a.data, a.base, a.split, a.batch_size)
        except (ValueError, FileNotFoundError) as err:  # e.g. an adapter-only checkpoint's base
            print(f"evaluate_classifier: error: {name} ({path}): {err}", file=sys.stderr)
            return 2
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
              f"({result['n']} sentences)", flush=True)  # fmt: skip
    if a.baselines is not None and not (a.out_dir / "baselines.json").exists():
        result = baselines(a.baselines)
        (a.out_dir / "baselines.json").write_text(json.dumps(result, indent=2) + "\n")
        for name, r in result.items():
            print(f"{name}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
