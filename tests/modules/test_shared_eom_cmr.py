"""The layer-level routing methods: shared experts (+ their sigmoid gate), expert output masking
(EOM) and conditional MoE routing (CMR), the decoder's refusal of expert choice, and their
support in int8 models, the ONNX export and expert growth; every method's checkpoint round trip
(moe_transformer with beam search, moe_roberta)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch
from moe_factories import make_layer
from naive_moe import naive_moe
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.models.moe_config import MoEConfig
from fairseq_moe_plugin.modules.moe_layer_builder import build_moe_layer
from fairseq_moe_plugin.modules.shared_experts import SharedExperts

D, F_DIM, E = 16, 32, 4
MOE_ALL = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1]


# make_layer(E, 2, **LAYER): dropless, seed 0, fp32, left in the mode it is built in.
LAYER = dict(d_model=D, d_ff=F_DIM, normalize_top_k=False, name="moe", dtype=None, mode=None)


def _tokens(n=40, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))  # N x C


def _routed(layer, x):
    """The routed part by a per-token loop (no shared experts, no masking)."""
    return naive_moe(layer.experts, x, layer.gate(x), layer.gate.normalize_top_k)


def _ffn(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


# --- shared experts -------------------------------------------------------------------------


def test_no_shared_experts_and_no_eom_is_the_plain_layer():
    """shared=None, eom=0: the state dict is the plain MoE layer's, no random number is drawn
    (in training too) and the output is the per-token reference."""
    layer = make_layer(E, 2, **LAYER).train()
    assert sorted(layer.state_dict()) == sorted(make_layer(E, 2, seed=0, **LAYER).state_dict())
    assert not any("shared" in key for key in layer.state_dict())
    x = _tokens()
    rng = torch.get_rng_state()
    y, _ = layer(x)
    assert torch.equal(torch.get_rng_state(), rng)  # EOM at 0 draws nothing
    torch.testing.assert_close(y, _routed(layer, x), rtol=1e-5, atol=1e-6)


def test_zero_shared_experts_model_is_bit_identical(toy_data):
    """--moe-shared-experts 0 (and EOM 0, CMR off): the same parameters from the same seed, no
    new state-dict key, the same outputs bit for bit as the model built without the flags."""
    torch.manual_seed(7)
    plain, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL))
    torch.manual_seed(7)
    flags = ["--moe-shared-experts", 0, "--moe-eom", 0, "--moe-cmr-gate-dropout", 0]
    zero, _, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL, *flags))
    a, b = plain.state_dict(), zero.state_dict()
    assert list(a) == list(b)
    assert not [k for k in a if ".moe.shared." in k or "cmr_gate" in k or "layers.0.fc1" in k]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sample = toy_batch(task, n=6)
    plain.eval(), zero.eval()
    with torch.no_grad():
        assert torch.equal(plain(**sample["net_input"])[0], zero(**sample["net_input"])[0])


@pytest.mark.parametrize("gated", [False, True])
def test_shared_output_is_routed_plus_each_shared_ffn_by_hand(gated):
    """N = 2 shared FFNs of width F held as one FFN of width 2F: y = routed + sum_i FFN_i(x),
    times sigmoid(w . x) per token when gated (DeepSeekMoE eq. 9; Qwen's gate)."""
    torch.manual_seed(3)
    shared = SharedExperts(D, F_DIM, 2, gated=gated)
    assert shared.fc1.weight.shape == (2 * F_DIM, D) and shared.fc2.weight.shape == (D, 2 * F_DIM)
    assert (shared.gate is not None) == gated
    if gated:
        with torch.no_grad():
            shared.gate.weight.normal_()  # clearly not 1/2 everywhere
    layer = make_layer(E, 2, shared=shared, **LAYER).eval()
    x = _tokens()
    y, _ = layer(x)
    w1, b1, w2 = shared.fc1.weight, shared.fc1.bias, shared.fc2.weight
    experts = sum(  # expert i: rows i*F..(i+1)*F of fc1, columns of fc2; the biases add up
        _ffn(x, w1[i * F_DIM : (i + 1) * F_DIM], b1[i * F_DIM : (i + 1) * F_DIM],
             w2[:, i * F_DIM : (i + 1) * F_DIM], None)
        for i in range(2)
    ) + shared.fc2.bias  # fmt: skip
    if gated:
        experts = torch.sigmoid(x @ shared.gate.weight.t()) * experts  # N x 1 per token
    torch.testing.assert_close(y, _routed(layer, x) + experts, rtol=1e-5, atol=1e-5)
    keys = {k for k in layer.state_dict() if k.startswith("shared.")}
    expected = {"shared.fc1.weight", "shared.fc1.bias", "shared.fc2.weight", "shared.fc2.bias"}
    assert keys == expected | ({"shared.gate.weight"} if gated else set())


def test_shared_experts_see_real_tokens_only():
    """Padding positions get a zero output (shared part included), as from the routed part."""
    layer = make_layer(E, 2, shared=SharedExperts(D, F_DIM, 1, gated=True), **LAYER).eval()
    x = torch.randn(5, 3, D)  # T x B x C
    pad = torch.zeros(5, 3, dtype=torch.bool)
    pad[3:, 1] = True
    y, record = layer(x, pad)
    assert (y[pad] == 0).all() and int(record.routed_tokens) == 13
    y_tokens, _ = layer(x[~pad])
    torch.testing.assert_close(y[~pad], y_tokens)


def test_bad_shared_and_eom_arguments():
    with pytest.raises(ValueError, match=r"--moe-shared-experts\) must be >= 1, got 0"):
        SharedExperts(D, F_DIM, 0)
    with pytest.raises(ValueError, match=r"--moe-eom\) must be in \[0, 1\), got 1.0"):
        make_layer(E, 2, eom=1.0, **LAYER)


# --- expert output masking -------------------------------------------------------------------


def test_eom_is_the_identity_in_eval():
    x = _tokens()
    layer = make_layer(E, 2, eom=0.5, **LAYER).eval()
    torch.testing.assert_close(layer(x)[0], _routed(layer, x), rtol=1e-5, atol=1e-6)


def test_eom_masks_whole_tokens_at_rate_p_and_spares_the_shared_experts():
    """Training, p = 0.3: each token's routed output is either 0 or routed / (1 - p), whole
    rows; about p of the tokens are masked; the shared part is added unmasked."""
    p, n = 0.3, 4000
    x = _tokens(n)
    shared = SharedExperts(D, F_DIM, 1)
    layer = make_layer(E, 2, shared=shared, eom=p, **LAYER).train()
    torch.manual_seed(11)
    y, _ = layer(x)
    with torch.no_grad():
        routed = _routed(layer, x)
        routed_part = y - shared(x)  # N x C
    masked = routed_part.abs().amax(dim=1) < 1e-6  # N
    torch.testing.assert_close(routed_part[~masked], routed[~masked] / (1 - p), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    rate = float(masked.float().mean())
    assert abs(rate - p) < 0.03, rate  # 4000 draws: sd 0.007
    y.sum().backward()  # the mask is a constant: gradients flow through the kept tokens
    assert layer.experts.fc1_weight.grad.abs().sum() > 0


# --- conditional MoE routing -----------------------------------------------------------------


def _cmr_model(toy_data, *flags):
    return build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL, "--moe-cmr", *flags))


def test_cmr_mixes_the_dense_ffn_and_the_moe_output_by_a_gate_by_hand(toy_data):
    model, _, _ = _cmr_model(toy_data)
    model.eval()
    for layer in (model.encoder.layers[0], model.decoder.layers[1]):
        state = layer.state_dict()
        assert {"fc1.weight", "fc2.weight", "cmr_gate.weight", "cmr_gate.bias"} <= set(state)
        with torch.no_grad():
            layer.cmr_gate.weight.normal_(std=0.2)  # g away from a constant
        x = torch.randn(6, 3, 64)  # T x B x C
        pad = torch.zeros(3, 6, dtype=torch.bool)  # B x T
        pad[1, 4:] = True
        with torch.no_grad():
            _, fc_result, _ = layer._moe_block(x, pad)
            h = x  # post-norm tiny model: the FFN sees x itself
            g = torch.sigmoid(h @ layer.cmr_gate.weight.t() + layer.cmr_gate.bias)  # T x B x 1
            dense = layer.fc2(F.relu(layer.fc1(h)))
            moe, _ = layer.moe(h, pad.t())
        assert float(g.max() - g.min()) > 0.3  # a real mix, different per token
        torch.testing.assert_close(fc_result, (1 - g) * dense + g * moe, rtol=1e-5, atol=1e-5)


def test_cmr_gate_dropout_only_in_training(toy_data):
    """Gate dropout p = 0.5 zeroes g for about half the positions, whose output is then the
    dense FFN's alone; in eval the gate is never dropped."""
    model, _, _ = _cmr_model(toy_data, "--moe-cmr-gate-dropout", 0.5)
    layer = model.encoder.layers[0]
    x = torch.randn(40, 5, 64)
    with torch.no_grad():
        dense = layer.fc2(F.relu(layer.fc1(x)))
        layer.train()
        torch.manual_seed(0)
        _, train_out, _ = layer._moe_block(x, None)
        layer.eval()
        _, eval_out, _ = layer._moe_block(x, None)
    dense_only = (train_out - dense).abs().amax(dim=-1) < 1e-6  # T x B
    assert 0.35 < float(dense_only.float().mean()) < 0.65
    assert not ((eval_out - dense).abs().amax(dim=-1) < 1e-6).any()


def test_cmr_refuses_parallel_placement_and_lora(toy_data):
    from fairseq_moe_plugin.modules.moe_transformer_layer import MoETransformerEncoderLayer

    _, _, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL))
    from fairseq.models.transformer import TransformerConfig

    tcfg = TransformerConfig.from_namespace(cfg.model)
    for field, value in (("moe_expert_placement", "parallel"), ("moe_expert_type", "lora")):
        moe_cfg = MoEConfig(moe_expert_count=4, moe_cmr=True)
        setattr(moe_cfg, field, value)
        with pytest.raises(ValueError, match="enc: --moe-cmr mixes the layer's own dense FFN"):
            MoETransformerEncoderLayer(tcfg, moe_cfg, "enc")


# --- build_moe_layer: routing per side, the decoder's refusal of expert choice ---------------


def test_build_moe_layer_routes_the_decoder_by_its_own_option_and_refuses_expert_choice():
    cfg = MoEConfig(moe_expert_count=4, moe_routing="expert_choice", moe_shared_experts=2,
                    moe_shared_expert_gate=True, moe_eom=0.1)  # fmt: skip
    encoder = build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "encoder.layers.1")
    assert encoder.gate.routing == "expert_choice" and encoder.eom == 0.1
    assert encoder.shared.num_shared == 2 and encoder.shared.gated
    with pytest.raises(ValueError, match=r"decoder.layers.1: expert-choice routing is not causal"):
        build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "decoder.layers.1", causal=True)
    cfg.moe_decoder_routing = "topk"
    decoder = build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "decoder.layers.1", causal=True)
    assert decoder.gate.routing == "topk"
    # bias balancing applies to the top-k side only
    cfg.moe_bias_balancing_rate = 0.01
    assert build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "e").gate.bias_balancing_rate == 0.0
    decoder = build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "d", causal=True)
    assert decoder.gate.bias_balancing_rate == 0.01


def test_shared_experts_refuse_lora_and_parallel():
    for field, value in (("moe_expert_placement", "parallel"), ("moe_expert_type", "lora")):
        cfg = MoEConfig(moe_expert_count=4, moe_shared_experts=1)
        setattr(cfg, field, value)
        with pytest.raises(ValueError, match="l1: --moe-shared-experts needs --moe-expert-type"):
            build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "l1")


# --- checkpoints: save -> load -> the same outputs and beam search ---------------------------

METHODS = {
    "shared_gate": ["--moe-shared-experts", 2, "--moe-shared-expert-gate"],
    "eom": ["--moe-eom", 0.3],
    "cmr": ["--moe-cmr", "--moe-cmr-gate-dropout", 0.2],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_moe_transformer_checkpoint_round_trip_and_beam_search(toy_data, tmp_path, method):
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_moe_plugin import checkpoint_io

    torch.manual_seed(5)
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL,
                                                      *METHODS[method]))  # fmt: skip
    _perturb_new_gates(model)
    path = tmp_path / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    (fairseq_loaded,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    (plugin_loaded,), _, _ = checkpoint_io.load_model_ensemble_and_task(path)
    sample = toy_batch(task, n=6)
    model.eval()
    with torch.no_grad():
        expected = model(**sample["net_input"])[0]
    for loaded in (fairseq_loaded.eval(), plugin_loaded.eval()):
        assert list(loaded.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(**sample["net_input"])[0], expected)

    def beam(m):
        generator = SequenceGenerator([m], task.target_dictionary, beam_size=3, max_len_b=12)
        with torch.no_grad():
            hypos = generator.generate([m], sample)
        return [[(h["tokens"].tolist(), round(float(h["score"]), 5)) for h in hs] for hs in hypos]

    assert beam(fairseq_loaded) == beam(model)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_moe_roberta_checkpoint_round_trip(tmp_path, method):
    from fairseq import checkpoint_utils, models
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_moe_plugin import checkpoint_io
    from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

    class Task(FakeTask):  # sentence_prediction's build_model, without data
        def build_model(self, cfg, from_checkpoint=False):
            model = models.build_model(cfg, self, from_checkpoint)
            model.register_classification_head("sentence_classification_head", num_classes=3)
            return model

    torch.manual_seed(6)
    args = roberta_args("--encoder-moe-freq", 1, *METHODS[method])
    model = MoERobertaModel.build_model(args, FakeTask())
    model.register_classification_head("sentence_classification_head", num_classes=3)
    _perturb_new_gates(model)
    path = tmp_path / "roberta.pt"
    save_trainer_style_checkpoint(model, convert_namespace_to_omegaconf(args), path)
    loaded = checkpoint_utils.load_model_ensemble_and_task([str(path)], task=Task())
    fairseq_loaded = loaded[0][0]
    (plugin_loaded,), _, _ = checkpoint_io.load_model_ensemble_and_task(path, task=Task())
    model.eval()
    head = "sentence_classification_head"
    with torch.no_grad():
        expected, extra = model(tokens(), classification_head_name=head)
    assert len(extra["moe_records"]) == 2
    for loaded in (fairseq_loaded.eval(), plugin_loaded.eval()):
        assert list(loaded.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(tokens(), classification_head_name=head)[0], expected)


def _perturb_new_gates(model):
    """Give the new gates and the shared experts values a fresh init would not have, so that a
    loader that re-initialised them would be caught."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe.shared." in name or "cmr_gate" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


# --- int8, ONNX, expert growth ---------------------------------------------------------------


def test_int8_model_with_shared_experts_and_cmr(toy_data):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from fairseq_moe_plugin.models.quantize import quantize_model_

    flags = [*METHODS["shared_gate"], "--moe-cmr"]
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE_ALL, *flags))
    model.eval()
    sample = toy_batch(task, n=6)
    with torch.no_grad():
        expected = model(**sample["net_input"])[0]
        quantize_model_(model, "weight_only")
        got = model(**sample["net_input"])[0]
    layer = model.encoder.layers[0]
    assert isinstance(layer.moe.shared.fc1, DynamicLinear) and isinstance(layer.fc1, DynamicLinear)
    assert type(layer.moe.shared.gate) is torch.nn.Linear  # the gates stay fp32
    assert type(layer.cmr_gate) is torch.nn.Linear
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    assert (got[real] - expected[real]).abs().max() < 0.05 * expected[real].abs().max()


def test_onnx_export_with_shared_experts_and_cmr_and_refuses_expert_choice():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fairseq_moe_plugin.deploy import onnx_export as ox
    from fairseq_moe_plugin.deploy.onnx_moe import ExportError
    from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

    def classifier(*flags):
        torch.manual_seed(4)
        model = MoERobertaModel.build_model(roberta_args("--encoder-moe-freq", 1, *flags),
                                            FakeTask())  # fmt: skip
        model.register_classification_head(ox.DEFAULT_HEAD, num_classes=3)
        _perturb_new_gates(model)
        return model.eval()

    model = classifier(*METHODS["shared_gate"], "--moe-cmr", "--moe-top-k", 2)
    module = ox.build_export_module(model, "classifier")
    x = tokens()
    with torch.no_grad():
        expected = ox.reference(model, "classifier", ox.DEFAULT_HEAD, x)[0]
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="expert-choice routing is not supported"):
        ox.build_export_module(classifier("--moe-routing", "expert_choice"), "classifier")


def test_grow_keeps_shared_experts_extends_the_balance_bias_and_refuses_expert_choice():
    from fairseq_moe_plugin.models.grow import grow_state_dict

    cfg = MoEConfig(moe_expert_count=4, moe_shared_experts=1, moe_bias_balancing_rate=0.01)
    layer = build_moe_layer(cfg, D, F_DIM, "relu", 0.0, "l")
    layer.gate.balance_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    state = {f"encoder.layers.1.moe.{k}": v for k, v in layer.state_dict().items()}
    grown, updates = grow_state_dict(state, {"moe_expert_count": 4}, 2)
    assert updates["moe_expert_count"] == 6
    prefix = "encoder.layers.1.moe"
    assert grown[f"{prefix}.gate.balance_bias"].tolist() == pytest.approx(
        [0.3, -0.2, 0.1, 0.0, -0.2, -0.2]
    )
    assert grown[f"{prefix}.gate.balance_load"].shape == (6,)
    for key in state:
        if ".shared." in key:
            assert grown[key] is state[key]
    copied, _ = grow_state_dict(state, None, 1, router_init="copy", source_experts=[0])
    assert copied[f"{prefix}.gate.balance_bias"][-1] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="cannot grow an expert-choice model"):
        grow_state_dict(state, {"moe_routing": "expert_choice"}, 2)
