"""--checkpoint-activations and --offload-activations change nothing in what is learnt: after one
criterion forward and backward, every parameter's gradient (the routers' included, which get
the balance and z losses' gradients) equals the one without checkpointing, for moe_transformer's
encoder and decoder layers and for moe_roberta; and fairseq-train runs with the flag."""

import pytest
import torch
from conftest import BIN, PLUGIN_DIR, build_model_and_task, run_cli, tiny_args, toy_batch
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.criterions.sentence_prediction_moe import (
    SentencePredictionMoEConfig,
    SentencePredictionMoECriterion,
)
from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

CHECKPOINTING = [("--checkpoint-activations",), ("--offload-activations",)]
# The set-up (balance weight 1, dropout 0), with a z-loss too so both losses are covered.
LOSSES = ["--moe-balance-loss-weight", 1, "--moe-z-loss-weight", 0.1]
MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-capacity-factor", 1.0]


def _grads(model, criterion, sample) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    loss, _, _ = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("moe.gate.wg.weight") for n in grads), sorted(grads)
    return grads


def _translation(toy_data, *flags):
    args = tiny_args(toy_data["bin"], *MOE, "--criterion", "label_smoothed_cross_entropy_moe",
                     "--label-smoothing", 0.1, *LOSSES, *flags)  # fmt: skip
    torch.manual_seed(0)
    model, task, cfg = build_model_and_task(args)
    criterion = tasks.setup_task(cfg.task).build_criterion(cfg.criterion)
    return model, task, criterion, args


# Issue 14's layers: LoRA experts, experts beside the dense FFN, dense routing with the MSE loss
# and the usage EMA (which the criterion updates once, whatever the recompute).
ADAPTERS = [
    (),
    ("--moe-expert-type", "lora", "--moe-lora-rank", 4),
    ("--moe-expert-placement", "parallel", "--moe-routing", "dense", "--moe-balance-loss", "mse",
     "--moe-usage-ema", 0.9),
]  # fmt: skip


@pytest.mark.parametrize("flags", CHECKPOINTING)
@pytest.mark.parametrize("adapter", ADAPTERS, ids=["ffn", "lora", "parallel_dense"])
def test_moe_transformer_gradients_equal_with_checkpointing(toy_data, flags, adapter):
    plain, task, criterion, _ = _translation(toy_data, *adapter)
    wrapped, _, wrapped_criterion, args = _translation(toy_data, *adapter, *flags)
    assert args.checkpoint_activations  # --offload-activations implies it
    assert all(
        layer.checkpoint_activations for layer in wrapped.encoder.layers if hasattr(layer, "moe")
    )
    for a, b in zip(plain.state_dict().values(), wrapped.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sample = toy_batch(task, split="train", n=16)
    expected = _grads(plain, criterion, sample)
    got = _grads(wrapped, wrapped_criterion, sample)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # The routers' gradients include the aux losses' share: without it they would differ.
    for name in ("encoder.layers.1.moe.gate.wg.weight", "decoder.layers.1.moe.gate.wg.weight"):
        assert got[name].norm() > 0
    # One batch folded into the usage EMA once, recompute or not.
    emas = {n: b for n, b in plain.named_buffers() if n.endswith("usage_ema")}
    for name, buffer in wrapped.named_buffers():
        if name in emas:
            torch.testing.assert_close(buffer, emas[name])
            assert not torch.allclose(buffer, torch.full_like(buffer, 1 / buffer.numel()))


def test_the_aux_losses_reach_the_router_under_checkpointing(toy_data):
    """The bug this guards against: losses read from the no_grad first forward left the routers
    with the cross-entropy's gradient only."""
    model, task, criterion, _ = _translation(toy_data, "--checkpoint-activations")
    no_aux_args = tiny_args(toy_data["bin"], *MOE, "--criterion",
                            "label_smoothed_cross_entropy_moe", "--label-smoothing", 0.1,
                            "--moe-balance-loss-weight", 0, "--moe-z-loss-weight", 0)  # fmt: skip
    cfg = convert_namespace_to_omegaconf(no_aux_args)
    no_aux = tasks.setup_task(cfg.task).build_criterion(cfg.criterion)
    sample = toy_batch(task, split="train", n=16)
    with_aux = _grads(model, criterion, sample)["encoder.layers.1.moe.gate.wg.weight"].clone()
    without = _grads(model, no_aux, sample)["encoder.layers.1.moe.gate.wg.weight"]
    assert (with_aux - without).norm() > 0.1 * without.norm()


@pytest.mark.parametrize("flags", CHECKPOINTING)
def test_moe_roberta_gradients_equal_with_checkpointing(flags):
    def build(*extra):
        torch.manual_seed(0)
        task = FakeTask()
        model = MoERobertaModel.build_model(roberta_args("--encoder-moe-freq", 1, *extra), task)
        model.register_classification_head("sentence_classification_head", num_classes=3)
        return model, task

    plain, task = build()
    wrapped, _ = build(*flags)
    cfg = SentencePredictionMoEConfig(moe_balance_loss_weight=1.0, moe_z_loss_weight=0.1)
    criterion = SentencePredictionMoECriterion(cfg, task)
    src = tokens()
    sample = {"net_input": {"src_tokens": src}, "target": torch.tensor([0, 2, 1]),
              "ntokens": int(src.ne(1).sum())}  # fmt: skip
    expected = _grads(plain, criterion, sample)
    got = _grads(wrapped, criterion, sample)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fairseq_train_with_checkpoint_activations(toy_data, tmp_path):
    log = run_cli(
        [BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR,
         "--arch", "moe_transformer_tiny", *MOE, "--checkpoint-activations",
         "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", 0.1, *LOSSES,
         "--optimizer", "adam", "--lr", 0.003, "--max-tokens", 2000, "--max-update", 20,
         "--save-dir", tmp_path / "ck", "--no-epoch-checkpoints", "--num-workers", 0,
         "--log-format", "simple", "--log-interval", 5, "--seed", 1],
        cwd=tmp_path,
    )  # fmt: skip
    assert "checkpoint_activations': True" in log or "checkpoint_activations=True" in log
    assert "moe_balance_loss" in log and (tmp_path / "ck" / "checkpoint_last.pt").exists()
