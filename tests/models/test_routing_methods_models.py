"""Expert choice, bias balancing and the random capacity priority in whole models: configuration
checks, checkpoint save -> load -> generate, and a fairseq-train -> fairseq-generate run."""

import json

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
from fairseq import checkpoint_utils
from fairseq.sequence_generator import SequenceGenerator
from roberta_helpers import FakeTask, roberta_args, tokens

from fairseq_moe_plugin.checkpoint_io import read_checkpoint_state
from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel
from fairseq_moe_plugin.modules.moe_layer import MoELayer

EC = ["--moe-routing", "expert_choice", "--moe-decoder-routing", "topk"]
FREQ = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-expert-count", 4]


def _gates(model) -> dict:
    return {m.name: m.gate for m in model.modules() if isinstance(m, MoELayer)}


def _generate(model, task, sample, beam=3):
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_b=12)
    with torch.no_grad():
        return generator.generate([model], sample)


def _save_load_generate_equal(model, task, cfg, tmp_path):
    """The model saved as a trained checkpoint and loaded by fairseq gives the same outputs,
    routing and beam search as the model in memory; returns the loaded model."""
    model.eval()
    path = tmp_path / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    loaded = models[0].eval()
    sample = toy_batch(task, n=6)
    with torch.no_grad():
        a, extra_a = model(**sample["net_input"])
        b, extra_b = loaded(**sample["net_input"])
    assert torch.equal(a, b)
    for ra, rb in zip(extra_a["moe_records"], extra_b["moe_records"], strict=True):
        assert torch.equal(ra.keep, rb.keep) and torch.equal(ra.expert_index, rb.expert_index)
    for ha, hb in zip(_generate(model, task, sample), _generate(loaded, task, sample), strict=True):
        for x, y in zip(ha, hb, strict=True):
            assert torch.equal(x["tokens"], y["tokens"])
            assert torch.equal(x["score"], y["score"])
    return loaded


def test_expert_choice_encoder_topk_decoder_save_load_generate(toy_data, tmp_path):
    args = tiny_args(toy_data["bin"], *FREQ, *EC, "--moe-expert-capacity-factor", 1.5)
    model, task, cfg = build_model_and_task(args)
    routings = {name: gate.routing for name, gate in _gates(model).items()}
    assert routings == {"encoder.layers.0": "expert_choice", "encoder.layers.1": "expert_choice",
                        "decoder.layers.0": "topk", "decoder.layers.1": "topk"}  # fmt: skip
    model.eval()
    sample = toy_batch(task, n=6)
    with torch.no_grad():
        _, extra = model(**sample["net_input"])
    for record in extra["moe_records"]:
        if record.layer.startswith("encoder"):
            assert record.expert_choice
            n = record.expert_index.shape[0]
            assert record.keep.sum(dim=0).tolist() == [min(n, -(-3 * n // 8))] * 4
    _save_load_generate_equal(model, task, cfg, tmp_path)


@pytest.mark.parametrize(
    "flags",
    [["--moe-routing", "expert_choice"], ["--moe-decoder-routing", "expert_choice"]],
)
def test_expert_choice_in_a_decoder_is_refused_with_the_reason(toy_data, flags):
    args = tiny_args(toy_data["bin"], *FREQ, *flags)
    with pytest.raises(
        ValueError, match=r"^moe_transformer_tiny: expert-choice .* decoder.*future"
    ):
        build_model_and_task(args)


def test_expert_choice_without_decoder_moe_layers_is_allowed(toy_data):
    args = tiny_args(toy_data["bin"], "--moe-routing", "expert_choice", "--decoder-moe-freq", 0)
    model, _, _ = build_model_and_task(args)
    assert {g.routing for g in _gates(model).values()} == {"expert_choice"}


def test_bias_balancing_is_saved_and_applied_at_inference(toy_data, tmp_path):
    args = tiny_args(toy_data["bin"], *FREQ, "--moe-bias-balancing-rate", 0.01)
    model, task, cfg = build_model_and_task(args)
    state = model.state_dict()
    assert {k for k in state if k.endswith("balance_bias")} == {
        f"{side}.layers.{i}.moe.gate.balance_bias"
        for side in ("encoder", "decoder")
        for i in (0, 1)
    }
    torch.manual_seed(5)
    for gate in _gates(model).values():
        gate.balance_bias.normal_(0, 2.0)  # a trained bias that changes the selection
    loaded = _save_load_generate_equal(model, task, cfg, tmp_path)
    for name, gate in _gates(loaded).items():
        assert torch.equal(gate.balance_bias, _gates(model)[name].balance_bias)
    # the bias really routes: without it, the selection differs
    sample = toy_batch(task, n=6)
    for gate in _gates(loaded).values():
        gate.balance_bias.zero_()
    with torch.no_grad():
        _, with_bias = model(**sample["net_input"])
        _, without = loaded(**sample["net_input"])
    assert any(
        not torch.equal(a.expert_index, b.expert_index)
        for a, b in zip(with_bias["moe_records"], without["moe_records"], strict=True)
    )


def test_bias_balancing_applies_to_the_top_k_stack_beside_expert_choice(toy_data):
    args = tiny_args(toy_data["bin"], *FREQ, *EC, "--moe-bias-balancing-rate", 0.01)
    model, _, _ = build_model_and_task(args)
    rates = {name: gate.bias_balancing_rate for name, gate in _gates(model).items()}
    assert rates == {"encoder.layers.0": 0.0, "encoder.layers.1": 0.0,
                     "decoder.layers.0": 0.01, "decoder.layers.1": 0.01}  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--moe-routing", "dense", "--moe-bias-balancing-rate", 0.1], "does not apply"),
        (["--moe-capacity-priority", "first"], "capacity-priority|invalid choice"),
        (["--moe-expert-capacity-factor", 0], "--moe-expert-capacity-factor"),
    ],
)
def test_bad_method_flags_are_refused(toy_data, flags, message):
    try:
        args = tiny_args(toy_data["bin"], *FREQ, *flags)
    except SystemExit:  # argparse refused the choice itself
        assert "invalid choice" in message
        return
    with pytest.raises(ValueError, match=message):
        build_model_and_task(args)


def test_moe_roberta_expert_choice_and_bias(tmp_path):
    for flags in (["--moe-routing", "expert_choice"], ["--moe-bias-balancing-rate", 0.05]):
        args = roberta_args("--encoder-moe-freq", 1, "--moe-expert-count", 4, *flags)
        model = MoERobertaModel.build_model(args, FakeTask()).eval()
        x = tokens()
        with torch.no_grad():
            out, extra = model(x, classification_head_name=None)
        records = extra["moe_records"]
        assert records
        if flags[1] == "expert_choice":
            assert all(r.expert_choice for r in records)
            assert all(len(set(r.keep.sum(0).tolist())) == 1 for r in records)
        path = tmp_path / "roberta.pt"
        torch.save(model.state_dict(), path)
        again = MoERobertaModel.build_model(args, FakeTask()).eval()
        again.load_state_dict(torch.load(path))
        with torch.no_grad():
            assert torch.equal(again(x, classification_head_name=None)[0], out)


@pytest.mark.slow
def test_train_and_generate_with_expert_choice_bias_and_random_priority(toy_data, tmp_path):
    """fairseq-train with expert choice in the encoder, aux-loss-free balancing in the decoder
    (balance loss weight 0) and the random capacity priority; the routing metrics are logged,
    the bias moves and is saved, and fairseq-generate decodes the checkpoint."""
    log = run_cli(
        [BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR,
         "--arch", "moe_transformer_tiny", *FREQ, *EC, "--moe-expert-capacity-factor", 1.0,
         "--moe-bias-balancing-rate", 0.01, "--moe-capacity-priority", "random",
         "--moe-capacity-factor", 1.0,
         "--criterion", "label_smoothed_cross_entropy_moe", "--moe-balance-loss-weight", 0,
         "--optimizer", "adam", "--lr", 0.003, "--max-tokens", 2000, "--max-update", 20,
         "--update-freq", 2, "--log-interval", 5, "--log-format", "json", "--seed", 1,
         "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints", "--num-workers", 0],
        cwd=tmp_path,
    )  # fmt: skip
    logged = [json.loads(line[line.index("{") :]) for line in log.splitlines() if '"loss"' in line]
    last = logged[-1]
    assert 0 <= float(last["moe_unchosen_frac"]) < 1
    assert float(last["moe_experts_per_token"]) > 0
    assert float(last["moe_enc0_experts_per_token"]) == pytest.approx(1.0, abs=0.05)  # c = 1
    assert float(last["moe_enc0_max_load"]) == float(last["moe_enc0_min_load"]) == 0.25
    assert {f"moe_dec{i}_bias_e{e}" for i in (0, 1) for e in range(4)} <= set(last)
    assert not any(k.startswith("moe_enc") and "_bias_" in k for k in last)
    state = read_checkpoint_state(tmp_path / "ckpt" / "checkpoint_last.pt")["model"]
    biases = [v for k, v in state.items() if k.endswith("balance_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)
    # every step is +-0.01 per expert: after at most 20 updates, |bias| <= 0.2
    assert all(float(b.abs().max()) <= 0.2 + 1e-6 for b in biases)
    out = run_cli(
        [BIN / "fairseq-generate", toy_data["bin"], "--user-dir", PLUGIN_DIR,
         "--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--beam", 2, "--max-tokens", 2000,
         "--gen-subset", "valid", "--num-workers", 0],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Generate valid with beam=2" in out


def test_frozen_base_trains_shared_experts_and_the_cmr_gate(toy_data):
    args = tiny_args(toy_data["bin"], *FREQ, "--moe-freeze-base", "--moe-shared-experts", 1,
                     "--moe-shared-expert-gate", "--moe-cmr")  # fmt: skip
    model, _, _ = build_model_and_task(args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer = "encoder.layers.0"
    assert {f"{layer}.moe.shared.fc1.weight", f"{layer}.moe.shared.gate.weight",
            f"{layer}.cmr_gate.weight", f"{layer}.moe.gate.wg.weight"} <= trainable  # fmt: skip
    assert f"{layer}.fc1.weight" not in trainable  # CMR's dense branch: the frozen FFN
    assert f"{layer}.self_attn.k_proj.weight" not in trainable


@pytest.mark.parametrize(
    "flags",
    [
        ["--moe-shared-experts", 1, "--moe-shared-expert-gate"],
        ["--moe-bias-balancing-rate", 0.01],
        ["--moe-eom", 0.3],
        ["--moe-cmr", "--moe-cmr-gate-dropout", 0.2],
        ["--moe-capacity-priority", "random", "--moe-capacity-factor", 0.25],
    ],
    ids=["shared", "bias", "eom", "cmr", "random_priority"],
)
def test_eval_routing_stays_batch_independent(toy_data, flags):
    """Every method but expert choice keeps dropless eval routing per token: a sentence's
    output is the same alone or in a batch."""
    args = tiny_args(toy_data["bin"], *FREQ, *flags)
    model, task, _ = build_model_and_task(args)
    for gate in _gates(model).values():
        if gate.bias_balancing_rate > 0:
            gate.balance_bias.normal_(0, 1.0)
    model.eval()
    batch = toy_batch(task, n=8)
    ds = task.dataset("valid")
    with torch.no_grad():
        full, _ = model(**batch["net_input"])
        for row in (0, 5):
            alone = ds.collater([ds[int(batch["id"][row])]])
            single, _ = model(**alone["net_input"])
            n = single.shape[1]
            torch.testing.assert_close(single[0], full[row, :n], rtol=1e-5, atol=1e-5)
