"""int8 inference (``--moe-int8``, ``fairseq-moe-quantize``): the quantisation itself on hand
cases, int8 experts against fp32 ones, whole models, and the checkpoint round trip through
fairseq's own loader and ``fairseq-generate``."""

import pytest
import torch
from conftest import (
    BIN,
    PLUGIN_DIR,
    build_model_and_task,
    run_cli,
    save_trainer_style_checkpoint,
    tiny_args,
    toy_batch,
)
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.modules.dispatch import DispatchPlan
from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.int8_experts import (
    Int8StackedExperts,
    dequantize,
    quantize_per_channel,
)
from fairseq_moe_plugin.modules.moe_layer import MoELayer


def test_quantize_per_channel_hand_computed():
    w = torch.tensor([[[127.0, -63.5, 0.0], [0.0, 0.0, 0.0], [0.2, -0.1, 0.05]]])  # 1 x 3 x 3
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (1, 3)
    torch.testing.assert_close(scale, torch.tensor([[1.0, 1.0, 0.2 / 127]]))
    assert q[0, 0].tolist() == [127, -64, 0]  # round half to even: -63.5 -> -64
    assert q[0, 1].tolist() == [0, 0, 0]  # an all-zero channel: scale 1, q 0
    assert q[0, 2].tolist() == [127, -64, 32]  # -0.1 * 635 = -63.5 -> -64; 0.05 * 635 = 31.75
    # the rounding error is at most half a step per weight
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-7).all()


def _experts_and_plan(k=2, num_tokens=37, E=4, C=16, F=32, empty_expert=True):
    torch.manual_seed(1)
    experts = StackedExperts(E, C, F, activation_fn="gelu").eval()
    x = torch.randn(num_tokens, C)
    index = torch.stack([torch.randperm(E - 1)[:k] for _ in range(num_tokens)])  # N x k
    if not empty_expert:
        index[0] = torch.arange(E)[-k:]
    weight = torch.rand(num_tokens, k)
    plan = DispatchPlan.from_routing(index, None, E)
    return experts, x, plan, weight


def test_weight_only_int8_experts_compute_the_dequantised_fp32_experts():
    experts, x, plan, weight = _experts_and_plan()
    assert 0 in plan.tokens_per_expert  # an expert with no rows is skipped
    int8 = Int8StackedExperts.from_float(experts, "weight_only")
    reference = StackedExperts(4, 16, 32, activation_fn="gelu").eval()
    with torch.no_grad():
        for fc in ("fc1", "fc2"):
            deq = dequantize(getattr(int8, f"{fc}_qweight"), getattr(int8, f"{fc}_scale"))
            getattr(reference, f"{fc}_weight").copy_(deq)
            getattr(reference, f"{fc}_bias").copy_(getattr(experts, f"{fc}_bias"))
        torch.testing.assert_close(int8(x, plan, weight), reference(x, plan, weight))


def test_dynamic_int8_experts_are_close_to_fp32():
    experts, x, plan, weight = _experts_and_plan(empty_expert=False)
    with torch.no_grad():
        y = experts(x, plan, weight)
        y8 = Int8StackedExperts.from_float(experts, "dynamic")(x, plan, weight)
    rel = (y8 - y).norm() / y.norm()
    assert rel < 0.03, rel  # int8 weights and activations: about 1% on random weights


def test_int8_experts_refuse_training_and_bad_modes():
    experts, x, plan, weight = _experts_and_plan()
    int8 = Int8StackedExperts.from_float(experts)
    with pytest.raises(RuntimeError, match="for inference"):
        int8.train()(x, plan, weight)
    with pytest.raises(ValueError, match="int8 compute must be one of"):
        Int8StackedExperts(4, 16, 32, compute="int4")


def test_state_dict_round_trip_repacks_the_weights():
    experts, x, plan, weight = _experts_and_plan()
    a = Int8StackedExperts.from_float(experts)
    a(x, plan, weight)  # packs a's weights
    b = Int8StackedExperts(4, 16, 32, activation_fn="gelu").eval()
    b(x, plan, weight)  # packs b's zeros
    b.load_state_dict(a.state_dict())  # must drop the stale packed copies
    torch.testing.assert_close(b(x, plan, weight), a(x, plan, weight), rtol=0, atol=0)


def test_layer_with_int8_experts_routes_as_before():
    torch.manual_seed(0)
    layer = MoELayer(TopKGate(16, 4, k=2), StackedExperts(4, 16, 32)).eval()
    x = torch.randn(6, 3, 16)  # T x B x C
    pad = torch.zeros(6, 3, dtype=torch.bool)
    pad[4:, 0] = True
    y, record = layer(x, pad)
    layer.experts = Int8StackedExperts.from_float(layer.experts, "weight_only")
    y8, record8 = layer(x, pad)
    assert torch.equal(record8.expert_index, record.expert_index)  # the router stays fp32
    assert (y8[pad] == 0).all()
    assert (y8 - y).abs().max() < 0.05 * y.abs().max()


def _tiny_moe_checkpoint(toy_data, tmp_path, *extra):
    torch.manual_seed(5)
    model, task, cfg = build_model_and_task(
        tiny_args(toy_data["bin"], "--moe-expert-count", 4, "--moe-top-k", 2, *extra)
    )
    path = tmp_path / "fp32.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path, model.eval(), task


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_structure_and_outputs(toy_data, tmp_path, tied):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from fairseq_moe_plugin.models.quantize import quantize_model_

    extra = ["--share-decoder-input-output-embed"] if tied else []
    _, model, task = _tiny_moe_checkpoint(toy_data, tmp_path, *extra)
    batch = toy_batch(task)
    with torch.no_grad():
        ref = model(**batch["net_input"])[0]
        quantize_model_(model, "dynamic")
        out = model(**batch["net_input"])[0]
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers and all(isinstance(m.experts, Int8StackedExperts) for m in layers)
    assert all(type(m.gate.wg) is torch.nn.Linear for m in layers)  # routers stay fp32
    assert isinstance(model.encoder.layers[0].self_attn.q_proj, DynamicLinear)
    assert isinstance(model.encoder.layers[0].fc1, DynamicLinear)  # a dense FFN
    # an output projection tied to the embeddings stays fp32 and tied; an untied one is int8
    proj = model.decoder.output_projection
    if tied:
        assert type(proj) is torch.nn.Linear and proj.weight is model.decoder.embed_tokens.weight
    else:
        assert isinstance(proj, DynamicLinear)
    lp, lp8 = ref.log_softmax(-1), out.log_softmax(-1)
    assert (lp8 - lp).abs().max() < 0.25
    assert (lp8.argmax(-1) == lp.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_quantized_checkpoint_loads_with_fairseq_and_matches(toy_data, tmp_path, mode):
    from fairseq import checkpoint_utils

    from fairseq_moe_cli.quantize import quantize_checkpoint
    from fairseq_moe_plugin.models.quantize import quantize_model_

    path, model, task = _tiny_moe_checkpoint(toy_data, tmp_path)
    out = tmp_path / f"{mode}.pt"
    report = quantize_checkpoint(path, out, mode)
    assert report["output_bytes"] < report["input_bytes"]
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(out)])
    assert cfg.model.moe_int8 == mode
    loaded = models[0].eval()
    batch = toy_batch(task)
    with torch.no_grad():
        expected = quantize_model_(model, mode)(**batch["net_input"])[0]
        got = loaded(**batch["net_input"])[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_fairseq_generate_decodes_an_int8_checkpoint(toy_data, tmp_path):
    from fairseq_moe_cli.quantize import main

    path, _, _ = _tiny_moe_checkpoint(toy_data, tmp_path)
    out = tmp_path / "int8.pt"
    assert main([str(path), str(out)]) == 0
    log = run_cli(
        [BIN / "fairseq-generate", toy_data["bin"], "--user-dir", PLUGIN_DIR, "--path", out,
         "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "valid",
         "--beam", 2, "--max-len-b", 8, "--batch-size", 4, "--cpu"],
        cwd=tmp_path,
    )  # fmt: skip
    assert log.count("\nH-") >= 8


def test_moe_roberta_int8_keeps_heads_fp32_and_reloads(tmp_path):
    from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel
    from fairseq_moe_plugin.models.quantize import quantize_model_

    task = FakeTask()
    args = roberta_args("--encoder-moe-freq", 1, "--moe-expert-count", 4, "--moe-top-k", 2)
    model = MoERobertaModel.build_model(args, task).eval()
    model.register_classification_head("cls", num_classes=3)
    x = tokens()
    with torch.no_grad():
        ref = model(x, features_only=True, classification_head_name="cls")[0]
        quantize_model_(model, "dynamic")
        out = model(x, features_only=True, classification_head_name="cls")[0]
    assert type(model.classification_heads["cls"].out_proj) is torch.nn.Linear
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.02
    args.moe_int8 = "dynamic"
    fresh = MoERobertaModel.build_model(args, task).eval()
    fresh.register_classification_head("cls", num_classes=3)  # as sentence_prediction does
    fresh.load_state_dict(model.state_dict(), strict=True, model_cfg=args)
    with torch.no_grad():
        again = fresh(x, features_only=True, classification_head_name="cls")[0]
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_bad_int8_requests_are_refused(toy_data, tmp_path):
    from fairseq_moe_cli.quantize import main, quantize_checkpoint

    with pytest.raises(ValueError, match="--moe-int8 dynamic supports FFN experts only"):
        build_model_and_task(
            tiny_args(toy_data["bin"], "--moe-int8", "dynamic", "--moe-expert-type", "lora")
        )
    path, _, _ = _tiny_moe_checkpoint(toy_data, tmp_path)
    out = tmp_path / "int8.pt"
    quantize_checkpoint(path, out)
    with pytest.raises(ValueError, match="already an int8 checkpoint"):
        quantize_checkpoint(out, tmp_path / "again.pt")
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2
    assert main([str(path), str(out)]) == 2  # exists, no --force
    assert main([str(path), str(path), "--force"]) == 2
