"""Experts on a frozen pretrained model (issue 14): the parallel placement and LoRA experts start
from what the dense model computed, --moe-freeze-base trains only routers, experts (and heads
when asked), the flags refuse impossible combinations, for moe_transformer and moe_roberta."""

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel
from fairseq_moe_plugin.modules.moe_layer import MoELayer

FFN = ["--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim", 128]
MOE_ALL = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1]


def _adapted(toy_data, path, *extra):
    return build_model_and_task(
        tiny_args(toy_data["bin"], *MOE_ALL, "--moe-init-from-dense", path, *extra)
    )


def _assert_computes_dense(toy_data, dense, model, task):
    sample = toy_batch(task, n=8)
    dense.eval(), model.eval()
    with torch.no_grad():
        expected, _ = dense(**sample["net_input"])
        got, extra = model(**sample["net_input"])
    assert len(extra["moe_records"]) == 4
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    return extra["moe_records"]


@pytest.mark.parametrize("routing", [["--moe-top-k", 2], ["--moe-routing", "dense"]])
def test_parallel_experts_start_from_the_dense_model(toy_data, dense_checkpoint, routing):
    """Beside the dense FFN, with zero output projections, the experts add nothing at step 0,
    whatever the routing weights (no normalisation needed)."""
    path, dense = dense_checkpoint
    model, task, _ = _adapted(toy_data, path, "--moe-expert-placement", "parallel", *routing)
    layer = model.encoder.layers[0]
    torch.testing.assert_close(layer.fc1.weight, dense.encoder.layers[0].fc1.weight)
    assert not layer.moe.experts.fc2_weight.any() and not layer.moe.experts.fc2_bias.any()
    assert layer.moe.experts.fc1_weight.std() > 0  # experts start random, not as FFN copies
    _assert_computes_dense(toy_data, dense, model, task)


@pytest.mark.parametrize(
    "routing",
    [["--moe-top-k", 1, "--moe-normalize-top-k"], ["--moe-top-k", 2, "--moe-normalize-top-k"],
     ["--moe-routing", "dense"],
     ["--moe-top-k", 1]],
)  # fmt: skip
def test_lora_experts_start_from_the_dense_model(toy_data, dense_checkpoint, routing):
    """LoRA experts adapt the dense FFN with deltas whose B is zero: whatever the combine
    weights (unnormalised top-1 included), the model computes what the dense one did."""
    path, dense = dense_checkpoint
    model, task, _ = _adapted(toy_data, path, "--moe-expert-type", "lora", *routing)
    experts = model.decoder.layers[1].moe.experts
    torch.testing.assert_close(experts.fc2.weight, dense.decoder.layers[1].fc2.weight)
    records = _assert_computes_dense(toy_data, dense, model, task)
    if routing[1] == "dense":
        assert all(r.dense and r.k == 4 for r in records)


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_base_trains_only_routers_and_experts(toy_data, dense_checkpoint):
    path, _ = dense_checkpoint
    model, *_ = _adapted(toy_data, path, "--moe-freeze-base", "--moe-expert-placement",
                         "parallel")  # fmt: skip
    trainable = _trainable(model)
    assert trainable and all(".moe.gate." in n or ".moe.experts." in n for n in trainable)
    assert "encoder.layers.0.moe.gate.wg.weight" in trainable
    assert "encoder.layers.0.fc1.weight" not in trainable  # the dense FFN beside the experts
    assert "encoder.embed_tokens.weight" not in trainable

    lora, *_ = _adapted(toy_data, path, "--moe-freeze-base", "--moe-expert-type", "lora")
    trainable = _trainable(lora)
    assert all(".moe.gate." in n or ".moe.experts.lora_" in n for n in trainable)
    assert "encoder.layers.0.moe.experts.lora_b1" in trainable
    assert "encoder.layers.0.moe.experts.fc1.weight" not in trainable  # LoRA's frozen FFN


def test_train_heads_refuses_an_output_projection_tied_to_the_embeddings(toy_data,
                                                                          dense_checkpoint):  # fmt: skip
    path, _ = dense_checkpoint
    with pytest.raises(ValueError, match="output projection is its embedding matrix"):
        _adapted(toy_data, path, "--moe-freeze-base", "--moe-train-heads",
                 "--share-decoder-input-output-embed")  # fmt: skip


def test_moe_roberta_parallel_and_frozen_heads(tmp_path):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.roberta import RobertaModel

    task = FakeTask()
    dense_args = roberta_args("--encoder-layers", 2, "--encoder-embed-dim", 64,
                              "--encoder-ffn-embed-dim", 128, "--encoder-attention-heads", 2,
                              arch="roberta")  # fmt: skip
    torch.manual_seed(1)
    dense = RobertaModel.build_model(dense_args, task).eval()
    path = tmp_path / "roberta.pt"
    save_trainer_style_checkpoint(dense, convert_namespace_to_omegaconf(dense_args), path)
    for heads in ([], ["--moe-train-heads"]):
        args = roberta_args("--moe-init-from-dense", path, "--encoder-moe-freq", 1,
                            "--moe-expert-placement", "parallel", "--moe-freeze-base", *heads)  # fmt: skip
        model = MoERobertaModel.build_model(args, task).eval()
        model.register_classification_head("cls", num_classes=3)
        x = tokens()
        with torch.no_grad():
            expected, _ = dense(x, features_only=True)
            got, _ = model(x, features_only=True)
        real = x.ne(1)
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
        head_trains = any(p.requires_grad for p in model.classification_heads.parameters())
        assert head_trains == bool(heads)
        assert not any(p.requires_grad for p in model.encoder.lm_head.parameters())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--moe-expert-type", "lora", "--moe-expert-placement", "parallel"], "placement replace"),
        (["--moe-expert-type", "lora", "--moe-lora-rank", 0], "--moe-lora-rank must be >= 1"),
        (["--moe-expert-type", "lora", "--moe-expert-ffn-dim", 64], "share the layer's dense FFN"),
        (["--moe-save-trainable-only"], "needs --moe-freeze-base"),
        (["--moe-save-trainable-only", "--moe-freeze-base"], "needs --moe-init-from-dense"),
        (["--moe-router-temperature", 0], "--moe-router-temperature must be > 0"),
        (["--moe-usage-ema", 1.0], r"--moe-usage-ema must be in \[0, 1\)"),
        (["--moe-dense-routing-until", -1], "--moe-dense-routing-until must be >= 0"),
    ],
)
def test_impossible_combinations_are_refused(toy_data, flags, message):
    with pytest.raises(ValueError, match=message):
        build_model_and_task(tiny_args(toy_data["bin"], *flags))


def test_maturity_schedule_routes_densely_then_top_k(toy_data):
    model, task, _ = build_model_and_task(
        tiny_args(toy_data["bin"], "--moe-dense-routing-until", 3, "--moe-top-k", 1)
    )
    sample = toy_batch(task, n=4)
    model.eval()

    def ks():
        with torch.no_grad():
            _, extra = model(**sample["net_input"])
        return {r.k for r in extra["moe_records"]}

    model.set_num_updates(2)
    assert ks() == {4}  # dense: every expert
    model.set_num_updates(3)
    assert ks() == {1}
    # The count is saved with the model: a checkpoint routes as it was trained.
    gates = [m.gate for m in model.modules() if isinstance(m, MoELayer)]
    assert all(int(g.routing_updates) == 3 for g in gates)
    state = model.state_dict()
    fresh, *_ = build_model_and_task(
        tiny_args(toy_data["bin"], "--moe-dense-routing-until", 3, "--moe-top-k", 1)
    )
    fresh.load_state_dict(state)
    fresh_gates = [m.gate for m in fresh.modules() if isinstance(m, MoELayer)]
    assert all(not g.routes_densely for g in fresh_gates)


@pytest.mark.parametrize("expert_type", ["ffn", "lora"])
def test_moe_roberta_adapter_state_dict_round_trip(tmp_path, expert_type):
    """An adapter-only state dict of moe_roberta (frozen head kept, frozen base dropped) loads
    into a freshly built model, which takes the base from the dense checkpoint and then
    computes what the saved model computed."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.roberta import RobertaModel

    task = FakeTask()
    dense_args = roberta_args("--encoder-layers", 2, "--encoder-embed-dim", 64,
                              "--encoder-ffn-embed-dim", 128, "--encoder-attention-heads", 2,
                              arch="roberta")  # fmt: skip
    dense = RobertaModel.build_model(dense_args, task)
    path = tmp_path / "roberta.pt"
    save_trainer_style_checkpoint(dense, convert_namespace_to_omegaconf(dense_args), path)
    args = roberta_args("--moe-init-from-dense", path, "--encoder-moe-freq", 1,
                        "--moe-expert-type", expert_type, "--moe-freeze-base",
                        "--moe-save-trainable-only")  # fmt: skip
    model = MoERobertaModel.build_model(args, task).eval()
    model.register_classification_head("cls", num_classes=3)
    with torch.no_grad():  # as if trained
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = model.state_dict()
    assert "encoder.sentence_encoder.layers.0.self_attn.k_proj.weight" not in state
    assert "classification_heads.cls.dense.weight" in state  # frozen but not from the base
    fresh = MoERobertaModel.build_model(args, task).eval()  # args: the base recorded, no upcycle
    fresh.register_classification_head("cls", num_classes=3)
    fresh.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        expected, _ = model(x, classification_head_name="cls")
        got, _ = fresh(x, classification_head_name="cls")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
