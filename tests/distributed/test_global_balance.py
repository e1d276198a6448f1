"""The global-batch balance loss (``--moe-balance-scope global``; Qiu et al. 2025): the Switch
loss with the expert frequencies of the whole update, hand-checked; handed to the criterion in
the sample; and W processes equal one process with ``--update-freq W`` (fairseq-train, gloo)."""

import pytest
import torch
from conftest import build_model_and_task, tiny_args, toy_batch
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_runs import assert_same_updates, train

from fairseq_moe_plugin.distributed.global_balance import ALLREDUCE_KEY, COUNTS_KEY
from fairseq_moe_plugin.modules.routing.losses import global_load_balance_loss, load_balance_loss


def test_global_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], requires_grad=True)  # N=3, E=2
    loss = global_load_balance_loss(probs, torch.tensor([3, 1]))
    # f = [3/4, 1/4] from the global counts; P = mean probs = [2/3, 1/3]
    assert loss.item() == pytest.approx(2 * (0.75 * 2 / 3 + 0.25 * 1 / 3))
    loss.backward()  # the gradient is E * f_i / N on every token's p_i
    torch.testing.assert_close(probs.grad, torch.tensor([[0.5, 1 / 6]] * 3))
    # with the micro-batch's own counts it is Switch Transformer's loss (eq. 4-6)
    index = torch.tensor([[0], [1], [0]])  # top-1 choices: counts [2, 1]
    own = global_load_balance_loss(probs, torch.tensor([2, 1]))
    assert own.item() == pytest.approx(load_balance_loss(probs, index).item())
    assert global_load_balance_loss(probs[:0], torch.tensor([3, 1])).item() == 0.0


def _criterion(args):
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task).build_criterion(cfg.criterion)


MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-capacity-factor", 0,
       "--criterion", "label_smoothed_cross_entropy_moe", "--moe-z-loss-weight", 0]  # fmt: skip


def test_the_criterion_uses_the_counts_the_sample_carries(toy_data):
    """With the global scope, a training sample carrying the update's counts gets the Switch loss
    on them, layer by layer; without them (a dummy batch, validation) the micro-batch's."""
    args = tiny_args(toy_data["bin"], *MOE, "--moe-balance-scope", "global")
    model, task, _ = build_model_and_task(args)
    criterion = _criterion(args)
    sample = toy_batch(task, n=8)
    model.train()
    counts = criterion.moe_routing_counts(model, sample)
    assert sorted(counts) == ["decoder.layers.0", "decoder.layers.1", "encoder.layers.0",
                              "encoder.layers.1"]  # fmt: skip
    experts = len(next(iter(counts.values())))
    skewed = {layer: torch.tensor([100] + [0] * (experts - 1)) for layer in counts}  # all to e0
    _, _, own = criterion(model, sample)
    _, _, given = criterion(model, {**sample, COUNTS_KEY: skewed})
    probs = {}
    _, extra = model(**sample["net_input"])
    for record in extra["moe_records"]:
        probs[record.layer] = record.probs.detach()
    expected = sum(experts * probs[layer].mean(0)[0].item() for layer in probs) / 4  # E f_0 P_0
    assert float(given["moe_balance_loss"]) / given["sample_size"] == pytest.approx(expected)
    assert float(own["moe_balance_loss"]) != pytest.approx(float(given["moe_balance_loss"]))
    model.eval()
    _, _, valid = criterion(model, {**sample, COUNTS_KEY: skewed})  # validation: micro-batch
    assert float(valid["moe_balance_loss"]) == pytest.approx(float(own["moe_balance_loss"]))
    model.train()
    one_process = {**sample, ALLREDUCE_KEY: True}  # no process group: its own counts
    _, _, alone = criterion(model, one_process)
    assert float(alone["moe_balance_loss"]) == pytest.approx(float(own["moe_balance_loss"]))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one_process_with_update_freq(toy_data, tmp_path):
    """W=2 (P=2, the counts all-reduced by the criterion) equals one process with --update-freq 2
    (the pre-pass); W=2 with --update-freq 2 (pre-pass, then one all-reduce) equals one process
    with --update-freq 4. The micro-batch scope logs another balance loss, so the comparison can
    fail."""
    scope = ["--moe-balance-scope", "global", "--max-update", 4]
    w2, _ = train(toy_data, tmp_path / "w2", 2, "--moe-expert-parallel-size", 2, *scope)
    w1, _ = train(toy_data, tmp_path / "w1", 1, "--update-freq", 2, *scope)
    assert_same_updates(w2, w1, range(1, 5))
    micro, _ = train(toy_data, tmp_path / "micro", 1, "--update-freq", 2, "--max-update", 4)
    assert micro[1]["moe_balance_loss"] != pytest.approx(w1[1]["moe_balance_loss"], rel=1e-3)
    assert micro[1]["loss"] == pytest.approx(w1[1]["loss"], rel=2e-2)  # the same model otherwise
    w2u2, _ = train(toy_data, tmp_path / "w2u2", 2, "--update-freq", 2, *scope)
    w1u4, _ = train(toy_data, tmp_path / "w1u4", 1, "--update-freq", 4, *scope)
    assert_same_updates(w2u2, w1u4, range(1, 5))
