"""Evaluate a ``moe_glue`` checkpoint on a GLUE task directory: predictions for every dev and
test split, official metrics, and GLUE submission files.

    fairseq-moe-glue-eval --checkpoint checkpoints/checkpoint_best.pt --glue-dir GLUE/MNLI \
        --out results/mnli

(or ``python scripts/eval_glue.py ...``).

Writes under ``--out``:
- ``predictions.<split>.tsv``: ``index``, ``prediction`` (and ``label`` for dev splits), with the
  official label names;
- ``metrics.json``: one entry per dev split, e.g. ``{"task": "MNLI-m", "split": "dev_matched",
  "accuracy": ..., "f1_macro": ..., "n": ...}``: accuracy and macro F1 for classification, F1 of
  the positive class for MRPC/QQP, Matthews correlation for CoLA, Pearson and Spearman for
  STS-B (scikit-learn / scipy);
- ``<Task>.tsv`` for every test split (``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``SST-2.tsv``, ...):
  ``index\\tprediction``, the GLUE submission format.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SUBMISSION_NAMES = {"dev_matched": "MNLI-m", "dev_mismatched": "MNLI-mm",
                    "test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}  # fmt: skip


def load(checkpoint, glue_dir):
    from fairseq import checkpoint_utils

    import fairseq_moe_plugin  # noqa: F401  (registers moe_glue/moe_roberta, checkpoint allow-list)

    checkpoint, glue_dir = Path(checkpoint), Path(glue_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if not glue_dir.is_dir():
        raise FileNotFoundError(f"GLUE task directory {glue_dir} does not exist")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(glue_dir)}
    )
    if not hasattr(task, "glue"):
        raise ValueError(f"{checkpoint} was not trained with --task moe_glue")
    return models[0].eval(), cfg, task


def predict(model, task, split, head, batch_size):
    """Predictions of ``split`` in file order: class indices, or floats for regression."""
    import torch

    dataset = task.load_dataset(split)
    itr = task.get_batch_iterator(dataset=dataset, max_sentences=batch_size,
                                  max_positions=task.max_positions()).next_epoch_itr(shuffle=False)  # fmt: skip
    out = np.zeros(len(dataset), dtype=np.float64)
    seen = np.zeros(len(dataset), dtype=bool)
    with torch.no_grad():
        for sample in itr:
            logits, _ = model(**sample["net_input"], features_only=True,
                              classification_head_name=head)  # fmt: skip
            values = logits.view(-1) if task.glue.is_regression else logits.argmax(-1)
            out[sample["id"].numpy()] = values.float().numpy()
            seen[sample["id"].numpy()] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise RuntimeError(
            f"{split}: {missing} rows got no prediction (longer than --max-positions?)"
        )
    return out


def official_metrics(glue, predictions, gold) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if glue.is_regression:
        return {"pearson": float(pearsonr(predictions, gold)[0]),
                "spearman": float(spearmanr(predictions, gold)[0])}  # fmt: skip
    result = {
        "accuracy": float(accuracy_score(gold, predictions)),
        "f1_macro": float(f1_score(gold, predictions, average="macro")),
    }
    if "f1" in glue.metrics:  # MRPC, QQP: F1 of the positive class "1"
        result["f1"] = float(f1_score(gold, predictions, pos_label=glue.labels.index("1")))
    if "mcc" in glue.metrics:
        result["mcc"] = float(matthews_corrcoef(gold, predictions))
    return result


def gold_labels(task, split) -> np.ndarray:
    from fairseq_moe_plugin.tasks.glue_data import read_split

    rows = read_split(task.cfg.data, task.glue, task.resolve_split(split))
    if task.glue.is_regression:
        return np.array([float(r.label) for r in rows])
    return np.array([task.glue.labels.index(r.label) for r in rows])


def label_name(glue, value, submission: bool = False) -> str:
    """The official label name; for STS-B the score (clipped to GLUE's [0, 5] in submissions)."""
    if glue.is_regression:
        value = float(value)
        return f"{min(max(value, 0.0), 5.0):.3f}" if submission else f"{value:.6f}"
    return glue.labels[int(value)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--glue-dir", required=True, help="the task's GLUE directory, e.g. GLUE/MNLI"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head", default="sentence_classification_head")
    args = parser.parse_args(argv)
    model, _, task = load(args.checkpoint, args.glue_dir)
    glue, out = task.glue, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for split in glue.dev_splits + glue.test_splits:
        if not (Path(args.glue_dir) / f"{split}.tsv").is_file():
            print(f"eval_glue: no {split}.tsv in {args.glue_dir}, skipped")
            continue
        predictions = predict(model, task, split, args.head, args.batch_size)
        ids = task.row_ids(split)
        names = [label_name(glue, p) for p in predictions]
        labelled = split in glue.dev_splits
        lines = ["index\tprediction" + ("\tlabel" if labelled else "")]
        gold = gold_labels(task, split) if labelled else None
        for i, name in enumerate(names):
            lines.append(
                f"{ids[i]}\t{name}" + (f"\t{label_name(glue, gold[i])}" if labelled else "")
            )
        (out / f"predictions.{split}.tsv").write_text("\n".join(lines) + "\n")
        name = SUBMISSION_NAMES.get(split, glue.name)
        if labelled:
            entry = {"task": name, "split": split, **official_metrics(glue, predictions, gold),
                     "n": len(predictions)}  # fmt: skip
            results.append(entry)
            print("eval_glue: " + json.dumps(entry))
        else:
            rows = ["index\tprediction"] + [
                f"{ids[i]}\t{label_name(glue, p, submission=True)}"
                for i, p in enumerate(predictions)
            ]
            (out / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"eval_glue: wrote {out}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
