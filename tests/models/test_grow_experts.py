"""Expert growth (models/grow.py, fairseq-moe-grow-experts): shapes, old weights kept, router
bias values, exact equivalence of the grown layer (offset: top-k and dense; copy: dense), errors
for bad input; then on real models, and a slow fairseq-train -> grow -> train run in which the
new experts take load."""

import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from fairseq_moe_cli.grow_experts import main as grow_main
from fairseq_moe_plugin.models.grow import (
    FFN_STACKS,
    LORA_STACKS,
    add_routing_schedule_buffers,
    grow_state_dict,
)

LAYERS = ("encoder.layers.1.moe", "decoder.layers.0.moe")
C, FF, R = 6, 8, 2  # d_model, d_ff, LoRA rank
LORA_SCALE = 2.0


def make_state(kind="ffn", num_experts=4, bias=False, ema=False, updates=False, seed=0):
    """A model state dict with two MoE layers of ``kind`` experts and some other weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    state = {"encoder.embed_tokens.weight": rand(10, C)}
    for p in LAYERS:
        e = num_experts
        state[f"{p}.gate.wg.weight"] = rand(e, C)
        if bias:
            state[f"{p}.gate.wg.bias"] = rand(e)
        if ema:
            state[f"{p}.gate.usage_ema"] = torch.softmax(rand(e), 0)
        if updates:
            state[f"{p}.gate.routing_updates"] = torch.tensor(17)
        if kind == "ffn":
            state.update({f"{p}.experts.fc1_weight": rand(e, FF, C), f"{p}.experts.fc1_bias": rand(e, FF),
                          f"{p}.experts.fc2_weight": rand(e, C, FF), f"{p}.experts.fc2_bias": rand(e, C)})  # fmt: skip
        else:
            state.update({f"{p}.experts.fc1.weight": rand(FF, C), f"{p}.experts.fc1.bias": rand(FF),
                          f"{p}.experts.fc2.weight": rand(C, FF), f"{p}.experts.fc2.bias": rand(C),
                          f"{p}.experts.lora_a1": rand(e, R, C), f"{p}.experts.lora_b1": rand(e, FF, R),
                          f"{p}.experts.lora_a2": rand(e, R, FF), f"{p}.experts.lora_b2": rand(e, C, R)})  # fmt: skip
        state[p.replace(".moe", ".self_attn.k_proj.weight")] = rand(C, C)
    return state


def combine_weights(state, p, x, routing="dense", k=2, temperature=1.0):
    """N x E: each token's combine weight per expert, dense or top-k (raw probabilities)."""
    bias = state.get(f"{p}.gate.wg.bias")
    probs = torch.softmax(F.linear(x, state[f"{p}.gate.wg.weight"], bias) / temperature, -1)
    if routing == "dense":
        return probs
    top_p, top_i = torch.topk(probs, k, dim=-1)  # N x k
    return torch.zeros_like(probs).scatter(1, top_i, top_p)


def layer_output(state, p, x, routing="dense", k=2, temperature=1.0):
    """N x C: the MoE layer ``p`` on x (relu): FFN experts mixed by their outputs; LoRA experts
    mixed at each linear layer, the frozen FFN once per token (``LoRAExperts``)."""
    w = combine_weights(state, p, x, routing, k, temperature)  # N x E
    if f"{p}.experts.fc1_weight" in state:
        h = torch.einsum("nc,efc->enf", x, state[f"{p}.experts.fc1_weight"])
        a = F.relu(h + state[f"{p}.experts.fc1_bias"][:, None])
        y = torch.einsum("enf,ecf->enc", a, state[f"{p}.experts.fc2_weight"])
        return torch.einsum("ne,enc->nc", w, y + state[f"{p}.experts.fc2_bias"][:, None])
    a1, b1 = state[f"{p}.experts.lora_a1"], state[f"{p}.experts.lora_b1"]
    a2, b2 = state[f"{p}.experts.lora_a2"], state[f"{p}.experts.lora_b2"]
    h = F.linear(x, state[f"{p}.experts.fc1.weight"], state[f"{p}.experts.fc1.bias"])  # N x F
    a = F.relu(h + LORA_SCALE * torch.einsum("ne,nc,erc,efr->nf", w, x, a1, b1))
    y = F.linear(a, state[f"{p}.experts.fc2.weight"], state[f"{p}.experts.fc2.bias"])
    return y + LORA_SCALE * torch.einsum("ne,nf,erf,ecr->nc", w, a, a2, b2)


def test_offset_grows_every_layer_and_keeps_the_old_weights():
    state = make_state("ffn")
    grown, updates = grow_state_dict(state, Namespace(moe_expert_count=4), 2, seed=1)
    assert updates == {"moe_expert_count": 6, "moe_router_bias": True}
    for p in LAYERS:
        assert grown[f"{p}.gate.wg.weight"].shape == (6, C)
        assert torch.equal(grown[f"{p}.gate.wg.weight"][:4], state[f"{p}.gate.wg.weight"])
        assert not grown[f"{p}.gate.wg.weight"][4:].any()
        assert grown[f"{p}.gate.wg.bias"].tolist() == [0, 0, 0, 0, -30, -30]
        for name, shape in (("fc1_weight", (FF, C)), ("fc1_bias", (FF,)),
                            ("fc2_weight", (C, FF)), ("fc2_bias", (C,))):  # fmt: skip
            key = f"{p}.experts.{name}"
            assert grown[key].shape == (6, *shape)
            assert torch.equal(grown[key][:4], state[key])
            fan_in = C if name.startswith("fc1") else FF  # nn.Linear's U(+-1/sqrt(fan_in))
            new = grown[key][4:]
            assert new.abs().max() <= 1 / math.sqrt(fan_in) and new.std() > 0.2 / math.sqrt(fan_in)
    for key in ("encoder.embed_tokens.weight", "decoder.layers.0.self_attn.k_proj.weight"):
        assert grown[key] is state[key]
    assert state["encoder.layers.1.moe.gate.wg.weight"].shape == (4, C)  # input untouched
    again, _ = grow_state_dict(state, None, 2, seed=1)
    assert all(torch.equal(again[k], grown[k]) for k in grown)  # seeded


def test_offset_lora_experts_start_with_peft_init():
    state = make_state("lora")
    grown, _ = grow_state_dict(state, None, 3)
    p = LAYERS[0]
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):  # shared frozen FFN
        assert grown[f"{p}.experts.{name}"] is state[f"{p}.experts.{name}"]
    for name, fan_in in (("lora_a1", C), ("lora_a2", FF)):  # kaiming-uniform(a=sqrt(5))
        new = grown[f"{p}.experts.{name}"][4:]
        assert new.shape[0] == 3 and 0 < new.abs().max() <= 1 / math.sqrt(fan_in)
    for name in ("lora_b1", "lora_b2"):
        assert grown[f"{p}.experts.{name}"].shape[0] == 7
        assert not grown[f"{p}.experts.{name}"][4:].any()


def test_offset_bias_is_below_the_smallest_old_bias_in_softmax_units():
    state = make_state("ffn", bias=True)
    cfg = {"moe_expert_count": 4, "moe_router_temperature": 2.0}
    grown, _ = grow_state_dict(state, cfg, 1, offset=12.5)
    for p in LAYERS:
        old = state[f"{p}.gate.wg.bias"]
        assert torch.equal(grown[f"{p}.gate.wg.bias"][:4], old)
        assert grown[f"{p}.gate.wg.bias"][4].item() == pytest.approx(old.min().item() - 25.0)


@pytest.mark.parametrize("kind", ["ffn", "lora"])
@pytest.mark.parametrize("routing,k", [("topk", 1), ("topk", 2), ("dense", 0)])
def test_offset_grown_layer_computes_what_the_old_one_did(kind, routing, k):
    state = make_state(kind, bias=True)
    grown, _ = grow_state_dict(state, None, 3)
    x = torch.randn(16, C)
    for p in LAYERS:
        expected = layer_output(state, p, x, routing, k)
        torch.testing.assert_close(layer_output(grown, p, x, routing, k), expected,
                                   rtol=3e-5, atol=3e-5)  # fmt: skip


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_copy_splits_the_source_mass_and_dense_output_is_unchanged(kind):
    state = make_state(kind, bias=kind == "ffn")
    grown, _ = grow_state_dict(state, None, 3, router_init="copy", source_experts=[1, 1, 3])
    x = torch.randn(16, C)
    for p in LAYERS:
        old_bias = state.get(f"{p}.gate.wg.bias", torch.zeros(4))
        split = torch.tensor([0.0, math.log(3), 0.0, math.log(2)])  # expert 1 copied twice
        expected_bias = torch.cat([old_bias - split, (old_bias - split)[[1, 1, 3]]])
        torch.testing.assert_close(grown[f"{p}.gate.wg.bias"], expected_bias)
        stacks = FFN_STACKS if kind == "ffn" else LORA_STACKS
        for key in [f"{p}.gate.wg.weight"] + [f"{p}.experts.{s}" for s in stacks]:
            assert torch.equal(grown[key][4:], state[key][[1, 1, 3]]), key  # exact copies
        torch.testing.assert_close(layer_output(grown, p, x), layer_output(state, p, x),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_copy_noise_is_relative_to_the_source_and_seeded():
    state = make_state("ffn")
    grown, _ = grow_state_dict(state, None, 2, router_init="copy", noise=0.01, seed=3)
    p = LAYERS[1]
    for name in ("gate.wg.weight", "experts.fc1_weight", "experts.fc2_weight"):
        source, new = state[f"{p}.{name}"][:2], grown[f"{p}.{name}"][4:]
        spread = (new - source).std() / source.std()
        assert 0.005 < float(spread) < 0.02, name
    for name in ("experts.fc1_bias", "experts.fc2_bias"):  # biases copied exactly
        assert torch.equal(grown[f"{p}.{name}"][4:], state[f"{p}.{name}"][:2])
    same, _ = grow_state_dict(state, None, 2, router_init="copy", noise=0.01, seed=3)
    other, _ = grow_state_dict(state, None, 2, router_init="copy", noise=0.01, seed=4)
    key = f"{p}.experts.fc1_weight"
    assert torch.equal(same[key], grown[key]) and not torch.equal(other[key], grown[key])


def test_usage_ema_is_extended_and_routing_updates_kept():
    state = make_state("ffn", ema=True, updates=True)
    offset, _ = grow_state_dict(state, None, 2)
    copy, _ = grow_state_dict(state, None, 2, router_init="copy", source_experts=[2, 2])
    for p in LAYERS:
        ema = state[f"{p}.gate.usage_ema"]
        assert torch.equal(offset[f"{p}.gate.usage_ema"], torch.cat([ema, torch.zeros(2)]))
        third = ema[2] / 3
        expected = torch.cat([ema[:2], third[None], ema[3:], third.repeat(2)])
        torch.testing.assert_close(copy[f"{p}.gate.usage_ema"], expected)
        assert float(copy[f"{p}.gate.usage_ema"].sum()) == pytest.approx(1.0)
        assert offset[f"{p}.gate.routing_updates"] is state[f"{p}.gate.routing_updates"]
    plain = make_state("ffn")
    assert add_routing_schedule_buffers(plain) == [f"{p}.gate.routing_updates" for p in
                                                   sorted(LAYERS)]  # fmt: skip
    assert add_routing_schedule_buffers(plain) == []


def _state_with(change):
    state = make_state("ffn")
    change(state)
    return state


BAD = [
    (dict(num_new=0), "--num-new\\) must be >= 1, got 0"),
    (dict(state={"encoder.layers.0.fc1.weight": torch.zeros(2, 2)}), "no MoE layer"),
    (dict(state=_state_with(lambda s: s.update({"decoder.layers.0.moe.experts.fc2_bias": torch.zeros(5, C)}))),
     "inconsistent expert counts .*decoder.layers.0.moe.experts.fc2_bias: 5"),
    (dict(cfg={"moe_expert_count": 8}), "moe_expert_count=8 but its MoE layers have 4 experts"),
    (dict(router_init="copy", source_experts=[0, 4]), r"--source-experts \[4\] out of range.*0..3"),
    (dict(router_init="copy", source_experts=[0]), "names 1 experts but --num-new is 2"),
    (dict(source_experts=[0, 1]), "--source-experts applies to --router-init copy only"),
    (dict(cfg=Namespace(moe_expert_parallel_size=4)),
     "--moe-expert-parallel-size 4 does not divide the grown expert count 4 \\+ 2 = 6"),
    (dict(router_init="random"), "--router-init must be one of"),
    (dict(noise=-1.0), "--noise must be >= 0"),
    (dict(state=_state_with(lambda s: s.update({"encoder.layers.1.moe.gate.extra": torch.zeros(4)}))),
     "cannot grow encoder.layers.1.moe.gate.extra"),
    (dict(state=_state_with(lambda s: s.pop("encoder.layers.1.moe.experts.fc2_bias"))),
     "encoder.layers.1.moe lacks its ffn expert tensors \\['fc2_bias'\\]"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_refused_with_a_clear_error(kwargs, message):
    call = {"state": make_state("ffn"), "cfg": None, "num_new": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        grow_state_dict(call.pop("state"), call.pop("cfg"), call.pop("num_new"), **call)


# -- the command line -------------------------------------------------------------------------------


def _checkpoint(path, state, num_updates=40, model_cfg=None):
    """What fairseq's trainer saves, around a constructed state dict."""
    history = {"criterion_name": "LabelSmoothedCrossEntropyMoECriterion", "optimizer_name": "Adam",
               "lr_scheduler_state": {}, "num_updates": num_updates}  # fmt: skip
    cfg = model_cfg if model_cfg is not None else Namespace(moe_expert_count=4, arch="x")
    torch.save({"args": None, "cfg": {"model": cfg, "task": {"_name": "translation"}},
                "model": state, "extra_state": {"train_iterator": {"epoch": 1}},
                "last_optimizer_state": {"state": {}}, "optimizer_history": [history]}, path)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "model_cfg", [None, {"moe_expert_count": 4, "_name": "x"}], ids=["ns", "dict"]
)
def test_cli_writes_the_grown_checkpoint_and_prints_the_flags(tmp_path, capsys, model_cfg):
    from fairseq import checkpoint_utils

    src = _checkpoint(tmp_path / "in.pt", make_state("ffn"), model_cfg=model_cfg)
    out = tmp_path / "grown" / "out.pt"
    argv = ["--checkpoint", str(src), "--out", str(out), "--num-new", "2", "--router-init", "copy",
            "--source-experts", "0,3", "--dense-updates", "25"]  # fmt: skip
    assert grow_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == (
        f"--moe-expert-count 6 --moe-router-bias --restore-file {out} --reset-optimizer "
        "--moe-routing topk --moe-dense-routing-until 25"
    )
    assert "dropped the optimizer state" in printed and "after 40 updates" in printed
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out))  # weights-only, as fairseq loads
    assert "last_optimizer_state" not in state
    model_cfg = state["cfg"]["model"]
    assert model_cfg.moe_expert_count == 6 and model_cfg.moe_router_bias is True
    assert model_cfg.moe_dense_routing_until == 25
    assert state["model"]["decoder.layers.0.moe.experts.fc1_weight"].shape == (6, FF, C)
    assert int(state["model"]["decoder.layers.0.moe.gate.routing_updates"]) == 0
    assert state["optimizer_history"][-1]["num_updates"] == 40


def test_cli_names_the_file_it_cannot_grow(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    dense = _checkpoint(tmp_path / "dense.pt", {"encoder.layers.0.fc1.weight": torch.zeros(2, 2)})
    for path, message in ((missing, f"checkpoint {missing} does not exist"),
                          (text, f"{text} is not a fairseq checkpoint"),
                          (other, f"{other} is not a fairseq checkpoint"),
                          (dense, f"{dense}: no MoE layer")):  # fmt: skip
        assert grow_main(["--checkpoint", str(path), "--out", str(tmp_path / "o.pt"),
                          "--num-new", "1"]) == 2  # fmt: skip
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


# -- real models ------------------------------------------------------------------------------------

MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-expert-count", 4,
       "--moe-top-k", 2, "--moe-capacity-factor", 0]  # fmt: skip
KINDS = {"ffn": [], "lora": ["--moe-expert-type", "lora", "--moe-lora-rank", 4]}


def _old_model(toy_data, flags, router_bias):
    """A tiny moe_transformer whose experts and router bias differ from their init (LoRA B and
    the bias start at zero, which would make the equivalences trivial)."""
    from conftest import build_model_and_task, tiny_args

    torch.manual_seed(2)
    extra = ["--moe-router-bias"] if router_bias else []
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *flags, *extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b1", "lora_b2", "gate.wg.bias")):
                p.normal_(0.0, 0.5)
    return model, task, cfg


def _outputs(model, sample, task):
    """The decoder's output at the real (non-padding) target positions, in eval mode."""
    model.eval()
    with torch.no_grad():
        out, _ = model(**sample["net_input"])
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    return out[real]


@pytest.mark.parametrize("kind", ["ffn", "lora"])
@pytest.mark.parametrize(
    "init,routing", [("offset", "topk"), ("offset", "dense"), ("copy", "dense")]
)
def test_grown_model_computes_what_the_old_one_did(toy_data, kind, init, routing):
    from conftest import build_model_and_task, tiny_args, toy_batch

    flags = [*MOE, *KINDS[kind], "--moe-routing", routing]
    old, task, cfg = _old_model(toy_data, flags, router_bias=kind == "lora")
    sources = [0, 3] if init == "copy" else None
    grown, updates = grow_state_dict(old.state_dict(), cfg.model, 2, router_init=init,
                                     source_experts=sources)  # fmt: skip
    assert updates == {"moe_expert_count": 6, "moe_router_bias": True}
    new, _, _ = build_model_and_task(
        tiny_args(toy_data["bin"], *flags, "--moe-expert-count", 6, "--moe-router-bias")
    )
    new.load_state_dict(grown, strict=True)
    sample = toy_batch(task, n=8)
    expected = _outputs(old, sample, task)
    torch.testing.assert_close(_outputs(new, sample, task), expected, rtol=1e-5, atol=1e-5)
    if init == "copy":  # the copies are real: without the bias split the output would differ
        with torch.no_grad():
            for layer in new.encoder.layers:
                layer.moe.gate.wg.bias[[0, 3, 4, 5]] += math.log(2)
        assert not torch.allclose(_outputs(new, sample, task), expected, rtol=1e-3, atol=1e-3)


def test_cli_checkpoint_loads_as_the_grown_model(toy_data, tmp_path, capsys):
    from conftest import save_trainer_style_checkpoint, toy_batch
    from fairseq import checkpoint_utils

    old, task, cfg = _old_model(toy_data, [*MOE, "--moe-usage-ema", 0.9], router_bias=False)
    src, out = tmp_path / "old.pt", tmp_path / "grown.pt"
    save_trainer_style_checkpoint(old, cfg, src)
    assert grow_main(["--checkpoint", str(src), "--out", str(out), "--num-new", "2"]) == 0
    assert "--moe-expert-count 6 --moe-router-bias" in capsys.readouterr().out
    # fairseq builds the model from the config saved in the grown checkpoint and loads it strictly.
    models, loaded_cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(out)])
    new = models[0]
    assert loaded_cfg.model.moe_expert_count == 6 and loaded_cfg.model.moe_router_bias
    gate = new.encoder.layers[0].moe.gate
    assert gate.wg.weight.shape[0] == 6 and gate.usage_ema.tolist()[4:] == [0, 0]
    sample = toy_batch(task, n=8)
    torch.testing.assert_close(_outputs(new, sample, task), _outputs(old, sample, task),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


# -- fairseq-train, grow, train on (slow) -----------------------------------------------------------

TRAIN = ["--arch", "moe_transformer_tiny", "--moe-expert-count", 2, "--moe-top-k", 1,
         "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", 0.1,
         "--optimizer", "adam", "--lr", 0.003, "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", 5, "--max-tokens", 2000, "--seed", 1, "--num-workers", 0,
         "--log-format", "json", "--log-interval", 2, "--disable-validation",
         "--no-epoch-checkpoints", "--cpu"]  # fmt: skip


def _train(toy_data, save_dir, *flags):
    """fairseq-train; its train_inner records."""
    from conftest import BIN, PLUGIN_DIR, run_cli

    from fairseq_moe_plugin.analysis.training_log import TRAIN_INNER, parse_line

    out = run_cli([BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR, *TRAIN,
                   "--save-dir", save_dir, *flags], cwd=save_dir.parent)  # fmt: skip
    parsed = [parse_line(line) for line in out.splitlines()]
    return [p[1] for p in parsed if p is not None and p[0] == TRAIN_INNER]


def _new_share(record, layer):
    """The share of the layer's load that went to the new experts 2 and 3."""
    loads = [record[f"moe_{layer}_load_e{e}"] for e in range(4)]
    return (loads[2] + loads[3]) / sum(loads)


@pytest.mark.slow
def test_training_continues_and_new_experts_take_load(toy_data, tmp_path):
    from conftest import BIN, run_cli

    first = _train(toy_data, tmp_path / "first", "--max-update", 16)
    grown = tmp_path / "grown.pt"
    printed = run_cli([BIN / "fairseq-moe-grow-experts", "--checkpoint",
                       tmp_path / "first" / "checkpoint_last.pt", "--out", grown, "--num-new", 2,
                       "--router-init", "copy", "--noise", 0.01, "--dense-updates", 8], tmp_path)  # fmt: skip
    flags = printed.strip().splitlines()[-1].split()
    assert flags == ["--moe-expert-count", "4", "--moe-router-bias", "--restore-file", str(grown),
                     "--reset-optimizer", "--moe-routing", "topk",
                     "--moe-dense-routing-until", "8"]  # fmt: skip
    records = _train(toy_data, tmp_path / "second", *flags, "--max-update", 20)
    # After --reset-optimizer fairseq counts updates from 0 again (so the schedule's 8 is 8 updates
    # after the restart, not after the checkpoint's 16).
    assert [int(r["num_updates"]) for r in records] == list(range(2, 21, 2))
    # Training goes on from the trained model (not from scratch: the loss starts below the first
    # run's start).
    assert records[0]["loss"] < first[0]["loss"] - 1.0, (first[0]["loss"], records[0]["loss"])
    dense = [r for r in records if r["num_updates"] <= 8]
    topk = [r for r in records if r["num_updates"] > 8]
    for layer in ("enc1", "dec1"):
        # Dense routing: the loads are probability mass; each copy has half its source's, and
        # both old experts were copied, so the new ones carry about half of it.
        assert all(0.45 < _new_share(r, layer) < 0.55 for r in dense), [
            _new_share(r, layer) for r in dense
        ]
        # Top-1 routing afterwards: the copies receive tokens.
        assert all(_new_share(r, layer) > 0.1 for r in topk), [_new_share(r, layer) for r in topk]
