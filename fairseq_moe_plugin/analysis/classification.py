"""Scoring a fairseq ``sentence_prediction`` classifier on a binarised split: the head's
predictions in dataset order, and accuracy / macro-F1 / per-label F1 (scikit-learn). Used by
``examples/classification/evaluate_classifier.py`` and ``fairseq-moe-benchmark-quantize``."""

from __future__ import annotations


def scores(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over ``labels`` and per-label F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    per_label = f1_score(gold, pred, labels=labels, average=None, zero_division=0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "f1_per_label": {label: float(f) for label, f in zip(labels, per_label, strict=True)},
    }


def head_labels(task) -> list[str]:
    """The head's classes: the label dictionary's first ``num_classes`` symbols after the
    specials (fairseq pads the dictionary with "madeupword"s and the task adds "<mask>")."""
    d, n = task.label_dictionary, task.cfg.num_classes
    return sorted(d[d.nspecial + i] for i in range(n))


def predict(model, task, head: str, split: str, batch_size: int) -> tuple[list[str], list[str]]:
    """(gold labels, predicted labels) of every sentence of ``split``, in dataset order."""
    import torch
    from fairseq import utils

    task.load_dataset(split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
    ).next_epoch_itr(shuffle=False)
    labels = task.label_dictionary
    gold, pred = {}, {}
    with torch.no_grad():
        for sample in itr:
            logits, _ = model(**sample["net_input"], features_only=True,
                              classification_head_name=head)  # fmt: skip  # B x classes
            target = model.get_targets(sample, [logits]).view(-1)  # B
            for i, t, p in zip(sample["id"].tolist(), target.tolist(),
                               logits.argmax(dim=-1).tolist(), strict=True):  # fmt: skip
                gold[i] = labels[t + labels.nspecial]
                pred[i] = labels[p + labels.nspecial]
    order = sorted(gold)
    return [gold[i] for i in order], [pred[i] for i in order]


def evaluate(model, task, head: str, split: str, batch_size: int = 64) -> dict:
    """``scores`` of the head's predictions on ``split``."""
    gold, pred = predict(model, task, head, split, batch_size)
    return scores(gold, pred, head_labels(task))
