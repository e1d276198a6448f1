"""fairseq_moe_plugin/analysis/flops.py and its CLI fairseq_moe_cli/flops.py: fvcore and analytic
FLOP counts agree, active parameters, the CLI."""

import json

import pytest
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch

from fairseq_moe_cli.flops import main
from fairseq_moe_plugin.analysis.flops import (
    BatchShape,
    ModelSpec,
    analytic_macs,
    flops_report,
    fvcore_macs,
    parameter_counts,
)
from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.moe_layer import MoELayer

D, FFN = 64, 128  # moe_transformer_tiny
DENSE = ("--encoder-moe-freq", 0, "--decoder-moe-freq", 0)
MOE = ("--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-expert-count", 4)
MOE += ("--moe-top-k", 2)


def _build(toy_data, flags):
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *flags))
    return model, task, cfg


LORA = (*MOE, "--moe-expert-type", "lora", "--moe-lora-rank", 4)
PARALLEL = (*MOE, "--moe-expert-placement", "parallel")
DENSE_ROUTING = (*MOE, "--moe-routing", "dense", "--moe-balance-loss", "mse")
SHARED = (*MOE, "--moe-shared-experts", 2, "--moe-shared-expert-gate")
CMR = (*MOE, "--moe-cmr", "--moe-shared-experts", 1)
EXPERT_CHOICE = (*MOE, "--moe-routing", "expert_choice", "--moe-decoder-routing", "topk",
                 "--moe-expert-capacity-factor", 1.5)  # fmt: skip


@pytest.mark.parametrize(
    "flags", [DENSE, MOE, LORA, PARALLEL, DENSE_ROUTING, SHARED, CMR, EXPERT_CHOICE],
    ids=["dense", "moe", "lora", "parallel", "dense_routing", "shared", "cmr", "expert_choice"],
)  # fmt: skip
def test_fvcore_agrees_with_analytic(toy_data, flags):
    model, task, _ = _build(toy_data, flags)
    sample = toy_batch(task)
    report = flops_report(model, [sample])
    fv, an = report["fvcore"], report["analytic"]
    assert fv["macs"] > 0 and fv["flops"] == 2 * fv["macs"]
    assert abs(report["fvcore_vs_analytic_rel_diff"]) < 0.03, (fv["macs"], an["macs"])
    assert fv["per_target_token"]["macs"] == pytest.approx(fv["macs"] / sample["ntokens"])
    assert report["counts"]["target_tokens"] == sample["ntokens"]
    assert report["counts"]["sentences"] == sample["nsentences"]
    # Padding costs the dense parts: the padding-free count is smaller on a padded batch.
    assert report["analytic_padding_free"]["macs"] < an["macs"]
    assert report["fvcore"]["uncounted_matmul_like_ops"] == []
    assert model.training  # the train/eval mode is restored


def test_fvcore_counts_only_the_active_experts(toy_data):
    model, task, _ = _build(toy_data, MOE)
    sample = toy_batch(task)
    shape = BatchShape.from_sample(sample, model.encoder.padding_idx)
    by_module = fvcore_macs(model, sample).by_module()
    for side, tokens in (("encoder", sum(shape.src_lens)), ("decoder", sum(shape.tgt_lens))):
        for i in range(2):
            prefix = f"model.{side}.layers.{i}.moe"
            # k=2 experts per non-padding token, fc1 and fc2; not E=4 experts on every position.
            assert by_module[f"{prefix}.experts"] == tokens * 2 * 2 * D * FFN
            assert by_module[f"{prefix}.gate"] == tokens * D * 4  # the fp32 router


def test_active_parameters(toy_data):
    dense, _, _ = _build(toy_data, DENSE)
    params = parameter_counts(dense)
    assert params["active_per_token"] == params["total"] and params["moe_layers"] == []
    moe, _, _ = _build(toy_data, MOE)
    params = parameter_counts(moe)
    per_expert = 2 * D * FFN + FFN + D
    assert len(params["moe_layers"]) == 4
    assert all(layer["params_per_expert"] == per_expert for layer in params["moe_layers"])
    assert params["total"] == sum(p.numel() for p in moe.parameters())
    assert params["active_per_token"] == params["total"] - 4 * 2 * per_expert
    assert params["active_per_token"] < params["total"]
    # With k of E experts active, the active count equals the dense model plus the routers
    # and (k - 1) extra experts per layer.
    assert params["active_per_token"] == parameter_counts(dense)["total"] + 4 * (D * 4) + 4 * (
        per_expert
    )


def test_lora_parallel_and_dense_routing_hand_counts(toy_data):
    """LoRA experts: the shared FFN once per token and k deltas of 2 r (d + d_ff); parallel:
    the dense FFN on every position as well; dense routing: all E experts per token."""
    shape = BatchShape(src_lens=[5, 5], tgt_lens=[7, 7], src_width=5, tgt_width=7)
    r, n_src = 4, 10
    lora = analytic_macs(ModelSpec.from_model(_build(toy_data, LORA)[0]), shape)
    assert lora["encoder.moe_experts"] == 2 * (n_src * 2 * D * FFN + n_src * 2 * 2 * r * (D + FFN))
    parallel = analytic_macs(ModelSpec.from_model(_build(toy_data, PARALLEL)[0]), shape)
    assert parallel["encoder.ffn"] == 2 * (2 * n_src * D * FFN)
    assert parallel["encoder.moe_experts"] == 2 * (n_src * 2 * 2 * D * FFN)
    dense_routing = analytic_macs(ModelSpec.from_model(_build(toy_data, DENSE_ROUTING)[0]), shape)
    assert dense_routing["encoder.moe_experts"] == 2 * (n_src * 4 * 2 * D * FFN)
    lora_params = parameter_counts(_build(toy_data, LORA)[0])
    assert lora_params["moe_layers"][0]["params_per_expert"] == 2 * r * (D + FFN)
    routed_all = parameter_counts(_build(toy_data, DENSE_ROUTING)[0])
    assert routed_all["active_per_token"] == routed_all["total"]


def test_single_moe_layer_hand_count():
    d, ff, num_experts, k = 16, 32, 4, 2
    layer = MoELayer(TopKGate(d, num_experts, k=k), StackedExperts(num_experts, d, ff))
    per_expert = d * ff + ff + ff * d + d  # fc1 weight + bias, fc2 weight + bias
    total = num_experts * per_expert + d * num_experts  # experts + router
    params = parameter_counts(layer)
    assert params["total"] == total
    assert params["moe_layers"][0]["params_per_expert"] == per_expert
    assert params["active_per_token"] == total - 2 * per_expert


def test_analytic_padding_free_on_an_unpadded_batch_equals_padded(toy_data):
    model, _, _ = _build(toy_data, MOE)
    spec = ModelSpec.from_model(model)
    shape = BatchShape(src_lens=[5, 5], tgt_lens=[7, 7], src_width=5, tgt_width=7)
    assert analytic_macs(spec, shape, padded=True) == analytic_macs(spec, shape, padded=False)
    macs = analytic_macs(spec, shape)
    # Encoder self-attention projections: 2 layers x 4 d^2 per source position.
    assert macs["encoder.self_attention_projections"] == 2 * 4 * D * D * 10
    assert macs["output_projection"] == 14 * D * len(model.decoder.dictionary)


def test_cli_on_a_checkpoint(toy_data, tmp_path, capsys):
    model, _, cfg = _build(toy_data, MOE)
    path = tmp_path / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    out = tmp_path / "flops.json"
    argv = ["--path", str(path), "--data", str(toy_data["bin"]), "--subset", "valid"]
    assert main([*argv, "--max-sentences", "16", "--num-batches", "2", "--json", str(out)]) == 0
    assert "MFLOPs/target token" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["counts"]["sentences"] == 32
    assert abs(report["fvcore_vs_analytic_rel_diff"]) < 0.03
    assert report["parameters"]["active_per_token"] < report["parameters"]["total"]
    assert "non-padding target tokens" in report["denominators"]["per_target_token"]

    assert main(["--path", str(tmp_path / "missing.pt"), "--data", str(toy_data["bin"])]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main([*argv[:4], "--subset", "nosuchsplit"]) == 2
    assert "nosuchsplit" in capsys.readouterr().err


def test_shared_experts_cmr_and_expert_choice_hand_counts(toy_data):
    """Shared experts: 2 d (N_s d_ff) + d (gate) per non-padding token, active for every token;
    CMR: the dense FFN and the gate d -> 1 on every position; expert choice: E x ceil(c N / E)
    assignments, c experts per token in the active parameters. fvcore counts the same."""
    shape = BatchShape(src_lens=[5, 3], tgt_lens=[7, 7], src_width=5, tgt_width=7)
    n_src, src_pos = 8, 10
    shared_model = _build(toy_data, SHARED)[0]
    shared = analytic_macs(ModelSpec.from_model(shared_model), shape)
    assert shared["encoder.moe_shared"] == 2 * n_src * (2 * D * 2 * FFN + D)
    params = parameter_counts(shared_model)
    per_expert = 2 * D * FFN + FFN + D
    shared_params = (2 * D * 2 * FFN + 2 * FFN + D) + D  # fc1, fc2 (N_s = 2), gate
    assert params["moe_layers"][0]["shared_params"] == shared_params
    assert params["active_per_token"] == params["total"] - 4 * 2 * per_expert  # shared: active
    cmr = analytic_macs(ModelSpec.from_model(_build(toy_data, CMR)[0]), shape)
    assert cmr["encoder.ffn"] == 2 * (2 * src_pos * D * FFN)
    assert cmr["encoder.cmr_gate"] == 2 * src_pos * D
    assert cmr["encoder.moe_shared"] == 2 * n_src * 2 * D * FFN
    model, task, _ = _build(toy_data, EXPERT_CHOICE)
    choice = analytic_macs(ModelSpec.from_model(model), shape)
    assert choice["encoder.moe_experts"] == 2 * (4 * 3 * 2 * D * FFN)  # C = ceil(1.5 * 8 / 4)
    assert choice["decoder.moe_experts"] == 2 * (14 * 2 * 2 * D * FFN)  # top-2
    params = parameter_counts(model)
    assert [layer["top_k"] for layer in params["moe_layers"]] == [1.5, 1.5, 2, 2]
    assert params["active_per_token"] == params["total"] - 2 * (4 - 1.5) * per_expert - 2 * (
        2 * per_expert
    )
    sample = toy_batch(task)
    by_module = fvcore_macs(model, sample).by_module()
    tokens = int(sample["net_input"]["src_tokens"].ne(model.encoder.padding_idx).sum())
    capacity = -(-3 * tokens // 8)  # ceil(1.5 * N / 4)
    assert by_module["model.encoder.layers.0.moe.experts"] == 4 * capacity * 2 * D * FFN
