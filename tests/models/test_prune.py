"""Expert pruning (models/prune.py): the chosen experts on hand-made routing logs for every
criterion, per-language plans, the sliced state dict and config, refusals; and on real models,
that the pruned model computes what the full one did when the pruned experts get no token
(renormalised top-k, and raw top-k with zero probability for them), with identical beam-search
hypotheses."""

from argparse import Namespace

import numpy as np
import pytest
import torch

from fairseq_moe_plugin.models import prune as pr

# -- choosing from a hand-made log -------------------------------------------------------------


def make_log(rows, layer_names=("encoder.layers.1", "decoder.layers.1"), num_experts=4,
             langs=("de", "en"), pairs=("en-de",)):  # fmt: skip
    """A routing log from rows ``(layer, lang, pair, experts, weights)`` (k = 2)."""
    layer, lang, pair, experts, weights = (np.array(c) for c in zip(*rows, strict=True))
    n = len(rows)
    return {"layer": layer, "lang": lang, "pair": pair, "experts": experts,
            "weights": weights.astype(np.float32), "sentence": np.zeros(n, int),
            "batch": np.zeros(n, int), "position": np.zeros(n, int), "token": np.zeros(n, int),
            "entropy": np.zeros(n), "layer_names": np.array(layer_names), "langs": np.array(langs),
            "pairs": np.array(pairs), "vocab": np.array(["a"]), "num_experts": np.array(num_experts),
            "k": np.array(2)}  # fmt: skip


# Layer 0: expert 0 is chosen most often but with small weights, expert 3 less often but with
# large ones. Layer 1: a tie between experts 1 and 2 on load.
ROWS = [
    (0, 1, 0, [0, 1], [0.1, 0.1]),
    (0, 1, 0, [0, 2], [0.1, 0.1]),
    (0, 1, 0, [0, 3], [0.1, 0.8]),
    (0, 1, 0, [3, 1], [0.9, 0.1]),
    (1, 0, 0, [2, 1], [0.6, 0.4]),
    (1, 0, 0, [1, 2], [0.5, 0.5]),
    (1, 0, 0, [2, 0], [0.7, 0.3]),
    (1, 0, 0, [1, -1], [1.0, 0.0]),  # an empty slot counts for nothing
]


def test_load_and_weighted_load_choose_the_hand_counted_experts():
    log = make_log(ROWS)
    np.testing.assert_array_equal(pr.layer_scores(log, "load"), [[3, 2, 1, 2], [1, 3, 3, 0]])
    np.testing.assert_allclose(pr.layer_scores(log, "weighted-load"),
                               [[0.3, 0.2, 0.1, 1.7], [0.3, 1.9, 1.8, 0.0]], rtol=1e-6)  # fmt: skip
    load = pr.plan(log, "load", 2)
    # layer 0: 0 (3) then 1 and 3 tie at 2 -> the lower id; layer 1: 1 and 2 (3 each)
    assert load["kept"] == {"encoder.layers.1.moe": [0, 1], "decoder.layers.1.moe": [1, 2]}
    weighted = pr.plan(log, "weighted-load", 2)
    assert weighted["kept"] == {"encoder.layers.1.moe": [0, 3], "decoder.layers.1.moe": [1, 2]}
    assert pr.plan(log, "weighted-load", 1)["kept"]["encoder.layers.1.moe"] == [3]
    assert pr.plan(log, "load", 3)["kept"]["decoder.layers.1.moe"] == [0, 1, 2]
    assert load["scores"]["encoder.layers.1.moe"] == [3.0, 2.0, 1.0, 2.0]


def test_language_plans_score_encoders_on_the_source_and_decoders_on_the_target():
    # langs de=0, en=1, fr=2; pairs en-de (0) and en-fr (1). Encoder rows carry the source
    # language (en), decoder rows the target (de or fr).
    rows = [(0, 1, 0, [0, 1], [0.5, 0.5]), (0, 1, 1, [0, 2], [0.5, 0.5]),
            (1, 0, 0, [3, 2], [0.5, 0.5]), (1, 0, 0, [3, 2], [0.5, 0.5]),
            (1, 2, 1, [1, 0], [0.5, 0.5]), (1, 2, 1, [1, 3], [0.5, 0.5])]  # fmt: skip
    log = make_log(rows, langs=("de", "en", "fr"), pairs=("en-de", "en-fr"))
    plans = pr.language_plans(log, 2)
    assert list(plans) == ["en-de", "en-fr"]
    enc, dec = "encoder.layers.1.moe", "decoder.layers.1.moe"
    # the encoder is shared by both pairs' source, en: experts 0 (2), then 1 and 2 tie -> 1
    assert plans["en-de"]["kept"][enc] == plans["en-fr"]["kept"][enc] == [0, 1]
    assert plans["en-de"]["kept"][dec] == [2, 3]  # de tokens
    assert plans["en-fr"]["kept"][dec] == [0, 1]  # fr tokens: 1 (2), then 0 and 3 tie -> 0
    assert plans["en-fr"]["scores"][dec] == [1.0, 2.0, 0.0, 1.0]
    assert plans["en-de"]["langs"] == {"encoder.layers.1": "en", "decoder.layers.1": "de"}


def test_language_plans_need_several_pairs():
    with pytest.raises(ValueError, match="needs a multilingual model .* has 1 \\(en-de\\)"):
        pr.language_plans(make_log(ROWS), 2)


def test_log_of_another_model_is_refused():
    log = make_log(ROWS)
    prefixes = ["decoder.layers.1.moe", "encoder.layers.1.moe"]  # any order
    pr.check_log(log, prefixes, 4)
    with pytest.raises(ValueError, match="recorded from another model: its MoE layers are"):
        pr.check_log(log, ["encoder.layers.3.moe", "decoder.layers.1.moe"], 4)
    with pytest.raises(ValueError, match="it has 4 experts per layer, the checkpoint 8"):
        pr.check_log(log, prefixes, 8)
    with pytest.raises(ValueError, match="--keep must be between 1 and the 4 experts, got 5"):
        pr.choose_experts(np.zeros((2, 4)), 5)


# -- slicing the state dict and the config ------------------------------------------------------

P = "encoder.layers.1.moe"


def make_state(kind="ffn", e=4, c=3, f=5):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    state = {f"{P}.gate.wg.weight": rand(e, c), f"{P}.gate.wg.bias": rand(e),
             f"{P}.gate.usage_ema": torch.tensor([0.4, 0.3, 0.2, 0.1]),
             f"{P}.gate.balance_bias": rand(e), f"{P}.gate.balance_load": rand(e),
             f"{P}.gate.routing_updates": torch.tensor(7), f"{P}.shared.fc1.weight": rand(f, c),
             "encoder.layers.1.cmr_gate.weight": rand(1, c), "encoder.embed_tokens.weight": rand(9, c)}  # fmt: skip
    if kind == "ffn":
        state.update({f"{P}.experts.fc1_weight": rand(e, f, c), f"{P}.experts.fc1_bias": rand(e, f),
                      f"{P}.experts.fc2_weight": rand(e, c, f), f"{P}.experts.fc2_bias": rand(e, c)})  # fmt: skip
    else:
        state.update({f"{P}.experts.fc1.weight": rand(f, c), f"{P}.experts.fc1.bias": rand(f),
                      f"{P}.experts.fc2.weight": rand(c, f), f"{P}.experts.fc2.bias": rand(c),
                      f"{P}.experts.lora_a1": rand(e, 2, c), f"{P}.experts.lora_b1": rand(e, f, 2),
                      f"{P}.experts.lora_a2": rand(e, 2, f), f"{P}.experts.lora_b2": rand(e, c, 2)})  # fmt: skip
    return state


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_router_rows_buffers_and_experts_are_sliced_the_rest_kept(kind):
    state = make_state(kind)
    new = pr.prune_state_dict(state, {P: [1, 3]})
    per_expert = [f"{P}.gate.{g}" for g in ("wg.weight", "wg.bias", "balance_bias",
                                            "balance_load")]  # fmt: skip
    stacks = pr.layer_stacks(state, P)
    for key in per_expert + [f"{P}.experts.{s}" for s in stacks]:
        assert torch.equal(new[key], state[key][[1, 3]]), key
    assert new[f"{P}.gate.wg.weight"].shape == (2, 3)
    torch.testing.assert_close(new[f"{P}.gate.usage_ema"], torch.tensor([0.75, 0.25]))
    for key in set(state) - set(per_expert) - {f"{P}.experts.{s}" for s in stacks}:
        if key != f"{P}.gate.usage_ema":
            assert new[key] is state[key], key  # shared experts, CMR gate, LoRA's frozen FFN...
    assert state[f"{P}.gate.wg.weight"].shape == (4, 3)  # input untouched


BAD_STATE = [
    ({"encoder.layers.0.fc1.weight": torch.zeros(2)}, {P: [0]}, "no MoE layer .*dense"),
    ("extra", {P: [0]}, f"cannot prune {P}.gate.extra"),
    ("ok", {P: [0, 0]}, "must be distinct ids in 0..3"),
    ("ok", {P: [0, 4]}, "must be distinct ids in 0..3"),
    ("ok", {"decoder.layers.1.moe": [0]}, "the plan names the MoE layers"),
    ("counts", {P: [0]}, "inconsistent expert counts"),
]


@pytest.mark.parametrize("state,kept,message", BAD_STATE, ids=[m[2][:20] for m in BAD_STATE])
def test_bad_state_or_plan_is_refused(state, kept, message):
    if isinstance(state, str):
        change, state = state, make_state()
        if change == "extra":
            state[f"{P}.gate.extra"] = torch.zeros(4)
        if change == "counts":
            state[f"{P}.gate.usage_ema"] = torch.zeros(5)
    with pytest.raises(ValueError, match=message):
        pr.prune_state_dict(state, kept)


def test_config_updates_remap_the_fallback_and_the_parallel_size():
    kept = {"a.moe": [0, 2, 5], "b.moe": [0, 1, 7]}
    cfg = Namespace(moe_top_k=2, moe_fallback_expert=0, moe_expert_parallel_size=4)
    assert pr.config_updates(cfg, kept) == {
        "moe_expert_count": 3, "moe_fallback_expert": 0, "moe_expert_parallel_size": 1,
        "moe_checkpoint_format": "consolidated"}  # fmt: skip
    cfg = {"moe_top_k": 2, "moe_fallback_expert": 2, "moe_expert_parallel_size": 4}
    with pytest.raises(ValueError, match="fallback expert \\(--moe-fallback-expert 2\\) is pruned "
                       "from \\['b.moe'\\]: give the pruned model's --fallback-expert"):  # fmt: skip
        pr.config_updates(cfg, kept)
    kept4 = {"a.moe": [0, 2, 5, 6], "b.moe": [1, 2, 3, 5]}
    cfg["moe_fallback_expert"] = 5
    with pytest.raises(ValueError, match="given different new ids per layer"):
        pr.config_updates(cfg, kept4)
    assert pr.config_updates(cfg, kept4, fallback=-1)["moe_fallback_expert"] == -1
    assert pr.config_updates(cfg, kept4, fallback=1)["moe_expert_parallel_size"] == 4
    cfg["moe_fallback_expert"] = 2
    assert pr.config_updates(cfg, kept4)["moe_fallback_expert"] == 1
    with pytest.raises(ValueError, match="--fallback-expert must be -1 or an id in 0..3, got 4"):
        pr.config_updates(cfg, kept4, fallback=4)


@pytest.mark.parametrize("cfg,message", [
    ({"moe_top_k": 4}, "--keep 3 is below the model's top-k \\(--moe-top-k 4\\)"),
    ({"moe_routing": "expert_choice"}, "cannot prune an expert-choice model"),
    ({"moe_int8": "dynamic"}, "cannot prune an int8 checkpoint .*then quantise"),
    ({"moe_save_trainable_only": True}, "cannot prune an adapter-only checkpoint"),
])  # fmt: skip
def test_config_refusals(cfg, message):
    with pytest.raises(ValueError, match=message):
        pr.config_updates(cfg, {"a.moe": [0, 1, 2]}, fallback=0)


# -- real models: the pruned model computes what the full one did ---------------------------------

MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-expert-count", 4,
       "--moe-top-k", 2, "--moe-capacity-factor", 0, "--moe-router-bias"]  # fmt: skip
KEPT = [0, 2]  # the pruned experts 1 and 3 get no token


def _models(toy_data, normalise: bool, pruned_bias: float):
    """The full model (its pruned experts' router bias at ``pruned_bias``, the kept ones' random)
    and the pruned one, in fp64."""
    from conftest import build_model_and_task, tiny_args

    flags = [*MOE, *(["--moe-normalize-top-k"] if normalise else [])]
    torch.manual_seed(4)
    full, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *flags))
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith("gate.wg.bias"):
                p.normal_(0.0, 0.5)
                p[[1, 3]] = pruned_bias
    state = full.state_dict()
    kept = {prefix: KEPT for prefix in pr.moe_layer_prefixes(state)}
    updates = pr.config_updates(cfg.model, kept)
    assert updates["moe_expert_count"] == 2 and updates["moe_fallback_expert"] == 0
    pruned, _, _ = build_model_and_task(tiny_args(toy_data["bin"], *flags, "--moe-expert-count", 2))
    pruned.load_state_dict(pr.prune_state_dict(state, kept), strict=True)
    return full.double().eval(), pruned.double().eval(), task


def _log_probs(model, sample, task):
    with torch.no_grad():
        out = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(out, log_probs=True)
    real = sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad())
    return lprobs[real], out[1]["moe_records"]


def _hypotheses(model, task, sample):
    from fairseq.dataclass.configs import GenerationConfig

    generator = task.build_generator([model], GenerationConfig(beam=4, max_len_b=20))
    with torch.no_grad():
        hypos = task.inference_step(generator, [model], sample)
    return [h[0]["tokens"].tolist() for h in hypos]


# Renormalised top-k is exact as long as the pruned experts never win (their probability may be
# non-zero, here e^-40 of the others'); raw top-k needs it to be 0 (exp(-1e4) underflows).
@pytest.mark.parametrize("normalise,pruned_bias", [(True, -40.0), (False, -1.0e4)],
                         ids=["renormalised", "raw-softmax"])  # fmt: skip
def test_pruned_model_computes_what_the_full_one_did(toy_data, normalise, pruned_bias):
    from conftest import toy_batch

    full, pruned, task = _models(toy_data, normalise, pruned_bias)
    sample = toy_batch(task, n=16)
    expected, records = _log_probs(full, sample, task)
    for record in records:  # the premise: no token chose expert 1 or 3
        assert set(record.expert_index.unique().tolist()) == {0, 2}, record.layer
    got, pruned_records = _log_probs(pruned, sample, task)
    # fp64 experts; the router runs in fp32 (a softmax over 2 instead of 4 terms): the combine
    # weights agree to fp32 rounding, the rest is exact arithmetic on the same tokens.
    assert (got - expected).abs().max().item() < 1e-6
    for a, b in zip(records, pruned_records, strict=True):
        old_ids = torch.tensor(KEPT)[b.expert_index]  # pruned ids -> old ids
        assert torch.equal(old_ids, a.expert_index), a.layer
        torch.testing.assert_close(b.expert_weight, a.expert_weight, rtol=1e-6, atol=1e-7)
    assert _hypotheses(pruned, task, sample) == _hypotheses(full, task, sample)


def test_raw_softmax_is_not_exact_when_pruned_experts_keep_probability_mass(toy_data):
    """The counter-case: the pruned experts never win a top-2 slot, but their softmax mass (bias
    -3) goes to the kept experts' raw weights, which change."""
    from conftest import toy_batch

    full, pruned, task = _models(toy_data, normalise=False, pruned_bias=-3.0)
    sample = toy_batch(task, n=16)
    expected, records = _log_probs(full, sample, task)
    assert all(set(r.expert_index.unique().tolist()) <= {0, 2} for r in records)
    got, _ = _log_probs(pruned, sample, task)
    assert (got - expected).abs().max().item() > 1e-4
