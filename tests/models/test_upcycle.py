"""Sparse upcycling (--moe-init-from-dense): an upcycled top-1 model computes what the dense
model computed; noise, router init, errors, and a saved upcycled model loads without the
dense checkpoint."""

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch

from fairseq_moe_plugin.models.upcycle import load_dense_state, upcycle

FFN = ["--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim", 128]
MOE_ALL = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1]


def _upcycled(toy_data, path, *extra):
    return build_model_and_task(
        tiny_args(toy_data["bin"], *MOE_ALL, "--moe-init-from-dense", path, *extra)
    )


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_model_computes_what_the_dense_model_computed(toy_data, dense_checkpoint, k):
    path, dense = dense_checkpoint
    model, task, cfg = _upcycled(toy_data, path, "--moe-top-k", k, "--moe-normalize-top-k")
    sample = toy_batch(task, n=8)
    dense.eval(), model.eval()
    with torch.no_grad():
        expected, _ = dense(**sample["net_input"])
        got, extra = model(**sample["net_input"])
    assert len(extra["moe_records"]) == 4  # every FFN is an MoE layer
    # Padding positions differ by design (the MoE layer gives them a zero FFN output; they are
    # masked everywhere downstream); every real position is the dense model's, to float rounding.
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    assert (~real).any()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # The flag is cleared in the saved config; the provenance is kept.
    assert cfg.model.moe_init_from_dense is None
    assert cfg.model.moe_upcycled_from == str(path)


def test_noise_makes_experts_differ_and_router_can_start_at_zero(toy_data, dense_checkpoint):
    path, dense = dense_checkpoint
    model, *_ = _upcycled(toy_data, path, "--moe-upcycle-noise", 0.01,
                          "--moe-upcycle-router-init", "zero")  # fmt: skip
    experts = model.encoder.layers[0].moe.experts
    fc1 = dense.encoder.layers[0].fc1.weight
    assert not torch.equal(experts.fc1_weight[0], experts.fc1_weight[1])
    spread = (experts.fc1_weight - fc1).std() / fc1.std()
    assert 0.005 < float(spread) < 0.02  # noise of 0.01 standard deviations
    assert torch.equal(experts.fc1_bias[3], dense.encoder.layers[0].fc1.bias)  # biases exact
    assert not model.encoder.layers[0].moe.gate.wg.weight.any()
    # Non-FFN weights are copied exactly.
    torch.testing.assert_close(model.encoder.embed_tokens.weight, dense.encoder.embed_tokens.weight,
                               rtol=0, atol=0)  # fmt: skip


def test_saved_upcycled_model_loads_without_the_dense_checkpoint(toy_data, dense_checkpoint,
                                                                 tmp_path):  # fmt: skip
    from fairseq import checkpoint_utils

    src, _ = dense_checkpoint
    copy = tmp_path / "dense_copy.pt"
    copy.write_bytes(src.read_bytes())
    model, _, cfg = _upcycled(toy_data, copy, "--moe-normalize-top-k")
    saved = tmp_path / "moe.pt"
    save_trainer_style_checkpoint(model, cfg, saved)
    copy.unlink()
    models, loaded_cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(saved)])
    assert loaded_cfg.model.moe_upcycled_from == str(copy)
    for (name, a), (_, b) in zip(model.state_dict().items(), models[0].state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_mismatched_sizes_and_missing_checkpoint_are_named(toy_data, dense_checkpoint, tmp_path):
    path, _ = dense_checkpoint
    with pytest.raises(
        ValueError, match=r"fc1.weight has shape \(128, 64\) but .*needs \(256, 64\)"
    ):
        _upcycled(toy_data, path, "--encoder-ffn-embed-dim", 256)
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        _upcycled(toy_data, tmp_path / "nope.pt")
    model, *_ = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL))
    dense = load_dense_state(path)
    del dense["encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="has no weight for encoder.layers.0.self_attn.k_proj"):
        upcycle(model, dense)
    with pytest.raises(ValueError, match="--moe-upcycle-noise"):
        _upcycled(toy_data, path, "--moe-upcycle-noise", -1)


LAYER_OPTIONS = [
    ["--encoder-normalize-before", "--decoder-normalize-before"],
    ["--cross-self-attention"],
    ["--no-cross-attention", "--activation-fn", "gelu"],
]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: " ".join(o))
def test_moe_layers_are_fairseqs_layers_under_fairseqs_layer_options(toy_data, options):
    """The MoE layers have their own forward (fairseq's attention blocks, the MoE layer as the
    FFN): with one expert, upcycled, they compute what fairseq's dense layers compute, with the
    layer options fairseq offers, in full and in incremental decoding."""
    torch.manual_seed(4)
    dense, task, _ = build_model_and_task(
        tiny_args(toy_data["bin"], *FFN, *options, arch="transformer_tiny")
    )
    model, _, _ = build_model_and_task(
        tiny_args(toy_data["bin"], *FFN, *options, *MOE_ALL, "--moe-expert-count", 1,
                  "--moe-top-k", 1, "--moe-normalize-top-k")
    )  # fmt: skip
    upcycle(model, dense.state_dict())
    dense.eval(), model.eval()
    net_input = toy_batch(task, n=6)["net_input"]
    real = net_input["prev_output_tokens"].ne(task.target_dictionary.pad())
    with torch.no_grad():
        expected, _ = dense(**net_input)
        got, _ = model(**net_input)
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
        encoder_out = model.encoder(net_input["src_tokens"], net_input["src_lengths"])
        state, steps = {}, []
        for t in range(net_input["prev_output_tokens"].size(1)):
            out, _ = model.decoder(net_input["prev_output_tokens"][:, : t + 1],
                                   encoder_out=encoder_out, incremental_state=state)  # fmt: skip
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1)[real], expected[real], rtol=1e-5, atol=1e-5)


UPCYCLE_METHODS = {
    "shared1": ["--moe-shared-experts", 1],
    "shared2_gate": ["--moe-shared-experts", 2, "--moe-shared-expert-gate"],
    "cmr_shared": ["--moe-cmr", "--moe-shared-experts", 1],
    "expert_choice_enc": [
        "--moe-routing",
        "expert_choice",
        "--moe-decoder-routing",
        "topk",
        "--moe-expert-capacity-factor",
        4,
    ],  # fmt: skip
}


@pytest.mark.parametrize("method", sorted(UPCYCLE_METHODS))
def test_upcycled_model_with_shared_experts_or_cmr_starts_as_the_dense_model(
    toy_data, dense_checkpoint, method
):
    """Routed and shared copies each give half of the dense output (the shared gate starts at
    zero: 1/2), the CMR gate starts at zero and both its branches are the dense FFN: with top-1
    and --moe-normalize-top-k the upcycled model computes what the dense one did. Expert choice
    with c = E: every expert takes every token, weights renormalised to 1."""
    from fairseq_moe_plugin.models.upcycle import dense_tensor

    path, dense = dense_checkpoint
    model, task, _ = _upcycled(toy_data, path, "--moe-top-k", 1, "--moe-normalize-top-k",
                               *UPCYCLE_METHODS[method])  # fmt: skip
    sample = toy_batch(task, n=8)
    dense.eval(), model.eval()
    with torch.no_grad():
        expected, _ = dense(**sample["net_input"])
        got, _ = model(**sample["net_input"])
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # What upcycling wrote is what an adapter-only checkpoint rebuilds from the base, tensor by
    # tensor (dense_tensor); the new gates start at zero, the balance buffers as built.
    state = model.state_dict()
    names, dense_state = set(state), load_dense_state(path)
    for name, value in state.items():
        if ".moe.shared." in name or "cmr_gate" in name or ".moe.experts." in name:
            rebuilt = dense_tensor(dense_state, name, tuple(value.shape), names, "dense")
            assert torch.equal(rebuilt[0].to(value.dtype), value), name
    if "shared" in method:
        layer = model.encoder.layers[0]
        fc1 = dense.encoder.layers[0].fc1.weight
        n = layer.moe.shared.num_shared
        assert torch.equal(layer.moe.shared.fc1.weight, torch.cat([fc1] * n))
        torch.testing.assert_close(layer.moe.experts.fc2_weight[0],
                                   dense.encoder.layers[0].fc2.weight / 2)  # fmt: skip
    if "gate" in method:
        assert not model.encoder.layers[0].moe.shared.gate.weight.any()


def test_shared_expert_copies_get_noise_and_bad_shapes_are_named(toy_data, dense_checkpoint):
    path, dense = dense_checkpoint
    model, *_ = _upcycled(toy_data, path, "--moe-shared-experts", 2, "--moe-upcycle-noise", 0.01)
    shared = model.encoder.layers[0].moe.shared
    first, second = shared.fc1.weight[:128], shared.fc1.weight[128:]
    assert not torch.equal(first, second)  # the two copies can diverge
    spread = (first - dense.encoder.layers[0].fc1.weight).std() / first.std()
    assert 0.005 < float(spread) < 0.02
    from fairseq_moe_plugin.models.upcycle import dense_tensor

    name = "encoder.layers.0.moe.shared.fc1.weight"  # 100 rows are no whole number of copies
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(128, 64\) but .*shared.fc1"):
        dense_tensor(load_dense_state(path), name, (100, 64), {name}, "dense")
