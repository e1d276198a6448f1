"""sentence_prediction_moe: fairseq's sentence_prediction plus the MoE losses and metrics."""

import pytest
import torch
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)
from fairseq.logging import metrics
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.criterions.sentence_prediction_moe import (
    SentencePredictionMoEConfig,
    SentencePredictionMoECriterion,
)
from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

HEAD = "sentence_classification_head"


def _model_and_sample(num_classes=3, regression=False):
    task = FakeTask()
    model = MoERobertaModel.build_model(roberta_args("--encoder-moe-freq", 1), task)
    model.register_classification_head(HEAD, num_classes=num_classes)
    src = tokens()
    target = torch.tensor([0.5, 1.5, 4.0]) if regression else torch.tensor([0, 2, 1])
    sample = {"net_input": {"src_tokens": src}, "target": target, "ntokens": int(src.ne(1).sum())}
    return model, task, sample


def _grads(model, criterion, sample):
    model.zero_grad()
    loss, size, log = criterion(model, sample)
    loss.backward()
    return loss.detach(), size, log, {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None}  # fmt: skip


def test_zero_weights_equal_fairseq_sentence_prediction():
    model, task, sample = _model_and_sample()
    model.train()
    ours = SentencePredictionMoECriterion(
        SentencePredictionMoEConfig(moe_balance_loss_weight=0, moe_z_loss_weight=0), task
    )
    theirs = SentencePredictionCriterion(SentencePredictionConfig(), task)
    torch.manual_seed(5)
    loss_a, size_a, log_a, grads_a = _grads(model, ours, sample)
    torch.manual_seed(5)
    loss_b, size_b, log_b, grads_b = _grads(model, theirs, sample)
    assert size_a == size_b == 3
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert int(log_a["ncorrect"]) == int(log_b["ncorrect"])
    assert "moe_balance_loss" in log_a and "moe_count:enc0:0" in log_a


@pytest.mark.parametrize("regression", [False, True])
def test_aux_loss_is_added_times_the_number_of_sentences(regression):
    model, task, sample = _model_and_sample(1 if regression else 3, regression)
    model.eval()  # deterministic routing: both criteria see the same records
    cfg = dict(regression_target=regression)
    ours = SentencePredictionMoECriterion(
        SentencePredictionMoEConfig(moe_balance_loss_weight=0.5, moe_z_loss_weight=0.25, **cfg),
        task,
    )
    plain = SentencePredictionCriterion(SentencePredictionConfig(**cfg), task)
    with torch.no_grad():
        loss, size, log = ours(model, sample)
        base, _, _ = plain(model, sample)
        _, extra = model(**sample["net_input"], features_only=True, classification_head_name=HEAD)
    records = extra["moe_records"]
    assert len(records) == 2
    aux = sum(0.5 * r.balance_loss + 0.25 * r.z_loss for r in records)
    torch.testing.assert_close(loss, base + aux * 3)
    torch.testing.assert_close(log["loss"], loss)
    with metrics.aggregate(new_root=True) as agg:
        SentencePredictionMoECriterion.reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert {"moe_balance_loss", "moe_enc1_load_e0", "moe_enc0_entropy"} <= set(values)
    assert ("accuracy" in values) == (not regression)
