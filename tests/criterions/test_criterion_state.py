"""The balance boost survives a resume: the criterion's state goes in fairseq's extra_state
(fairseq_moe_plugin/criterions/criterion_state.py)."""

import pytest
import torch
from fairseq.logging import metrics

from fairseq_moe_plugin.criterions.criterion_state import EXTRA_STATE_KEY, with_criterion_state
from fairseq_moe_plugin.criterions.sentence_prediction_moe import (
    SentencePredictionMoEConfig,
    SentencePredictionMoECriterion,
)
from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

BOOST = dict(moe_monitor_interval=1, moe_monitor_high_load=1.0001,  # always "imbalanced"
             moe_balance_boost_factor=3.0, moe_balance_boost_max=1.0)  # fmt: skip


def _setup():
    from roberta_helpers import FakeTask, roberta_args, tokens

    task = FakeTask()
    model = MoERobertaModel.build_model(roberta_args("--encoder-moe-freq", 1), task)
    model.register_classification_head("sentence_classification_head", num_classes=3)
    src = tokens()
    sample = {"net_input": {"src_tokens": src}, "target": torch.tensor([0, 2, 1]),
              "ntokens": int(src.ne(1).sum())}  # fmt: skip
    return model, task, sample


class FakeTrainer:
    """What the wrapped Trainer methods use: the criterion, and fairseq's own methods."""

    def __init__(self, criterion):
        self.criterion = criterion
        self.saved = None

    def get_criterion(self):
        return self.criterion

    def state_dict(self):
        return {"model": {}, "extra_state": {"metrics": {}}}

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                        optimizer_overrides=None, reset_meters=False):  # fmt: skip
        return self.saved["extra_state"]  # as fairseq's: the extra_state it loaded


FakeTrainer.state_dict, FakeTrainer.load_checkpoint = with_criterion_state(
    FakeTrainer.state_dict, FakeTrainer.load_checkpoint
)


def _batches(criterion, model, sample, n, update):
    for _ in range(n):
        model.set_num_updates(update)
        _, _, log = criterion(model, sample)
        criterion.__class__.reduce_metrics([log])
        update += 1
    return update


def _run(model, task, sample, plan, save_after=None, resume=None, **load):
    """Train epochs of ``plan`` batches as fairseq_cli/train.py does (the ``train`` meters reset
    at each epoch's end), then one more batch; save after epoch ``save_after`` (end: a
    ``(epoch, batches)`` pair for mid-epoch), or start from the ``resume`` checkpoint."""
    criterion = SentencePredictionMoECriterion(SentencePredictionMoEConfig(**BOOST), task)
    trainer, saved, update = FakeTrainer(criterion), None, 0
    if resume is not None:
        trainer.saved = resume
        trainer.load_checkpoint("checkpoint_last.pt", **load)
    model.train()
    with metrics.aggregate(new_root=True):
        for epoch, batches in enumerate(plan):
            with metrics.aggregate("train"):
                if save_after == (epoch, 2):
                    update = _batches(criterion, model, sample, 2, update)
                    saved = trainer.state_dict()
                    saved["extra_state"]["train_iterator"] = {"version": 2, "epoch": epoch + 1,
                                                              "iterations_in_epoch": 2}  # fmt: skip
                    batches -= 2
                update = _batches(criterion, model, sample, batches, update)
            metrics.reset_meters("train")
            if save_after == epoch:
                saved = trainer.state_dict()
                saved["extra_state"]["train_iterator"] = {"version": 2, "epoch": epoch + 2,
                                                          "iterations_in_epoch": 0}  # fmt: skip
        model.set_num_updates(update)
        criterion(model, sample)
    return criterion, saved


def test_resume_keeps_the_balance_boost():
    model, task, sample = _setup()
    whole, _ = _run(model, task, sample, [3, 3])
    assert whole.moe_balance_loss_weight == pytest.approx(0.01 * 3 * 3)

    # Saved at the end of epoch 1: the resumed run takes epoch 1's decision at once.
    _, saved = _run(model, task, sample, [3], save_after=0)
    state = saved["extra_state"][EXTRA_STATE_KEY]
    assert state["balance_loss_weight"] == pytest.approx(0.01)  # decided at the next batch
    assert state["monitor"]["checks"] > 0
    resumed, _ = _run(model, task, sample, [3], resume=saved)
    assert resumed.moe_balance_loss_weight == pytest.approx(whole.moe_balance_loss_weight)

    # Saved in the middle of epoch 2 (the weight already raised once).
    _, saved = _run(model, task, sample, [3, 3], save_after=(1, 2))
    assert saved["extra_state"][EXTRA_STATE_KEY]["balance_loss_weight"] == pytest.approx(0.03)


def test_what_is_not_restored_starts_from_the_configured_weight():
    model, task, sample = _setup()
    _, saved = _run(model, task, sample, [3], save_after=0)
    fresh, _ = _run(model, task, sample, [3], resume=saved, reset_lr_scheduler=True)
    assert fresh.moe_balance_loss_weight == pytest.approx(0.03)  # one boost, as a new run
    old = {**saved, "extra_state": {"train_iterator": saved["extra_state"]["train_iterator"]}}
    before, _ = _run(model, task, sample, [3], resume=old)  # a checkpoint from before
    assert before.moe_balance_loss_weight == pytest.approx(0.03)
