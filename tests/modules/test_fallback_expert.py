"""``--moe-fallback-expert``: at inference a token whose router logits are not finite goes to the
fallback expert alone, is counted, and changes nothing for the other tokens of its batch."""

import pytest
import torch
from conftest import build_model_and_task, tiny_args, toy_batch

from fairseq_moe_plugin.modules.experts import StackedExperts
from fairseq_moe_plugin.modules.gate import TopKGate
from fairseq_moe_plugin.modules.moe_layer import MoELayer
from fairseq_moe_plugin.modules.routing.router import FALLBACK_OTHER_LOGIT, fallback_nonfinite


def test_fallback_nonfinite_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0], [0.5, float("inf"), 0.0]])
    fixed, finite = fallback_nonfinite(logits, 1)
    other = FALLBACK_OTHER_LOGIT
    torch.testing.assert_close(fixed, torch.tensor([[1.0, 2.0, 3.0], [other, 0.0, other],
                                                    [other, 0.0, other]]))  # fmt: skip
    assert finite.tolist() == [[True], [False], [False]]  # the rows that did not fall back
    probs = torch.softmax(fixed, -1)
    assert probs[1].tolist() == [0.0, 1.0, 0.0]  # exactly one-hot in fp32


@pytest.mark.parametrize("routing,k,normalize", [("topk", 1, False), ("topk", 2, True),
                                                 ("topk", 2, False), ("dense", 1, False)])  # fmt: skip
def test_bad_token_goes_to_the_fallback_expert_and_the_others_are_unchanged(routing, k, normalize):
    torch.manual_seed(0)
    layer = MoELayer(
        TopKGate(8, 4, k=k, normalize_top_k=normalize, routing=routing, fallback_expert=2),
        StackedExperts(4, 8, 16),
    ).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer.gate.wg.weight[1, 0] = float("inf")  # a corrupted router: tokens with x0 != 0 ...
        x_bad = x.clone()
        x_bad[1:, 0] = 0.0  # ... and 0 * inf = NaN: every token's logits are non-finite
        y, rec = layer(x_bad)
        assert rec.fallback_tokens.item() == 5
        expert2 = layer.experts.expert_forward(2, x_bad)
        torch.testing.assert_close(y, expert2)  # all weight on the fallback expert
        assert torch.isfinite(rec.probs).all() and rec.expert_counts[2] == 5
        # One NaN token among clean ones: the others route and compute as without it.
        torch.manual_seed(0)
        clean = MoELayer(
            TopKGate(8, 4, k=k, normalize_top_k=normalize, routing=routing, fallback_expert=2),
            StackedExperts(4, 8, 16),
        ).eval()
        x_nan = x.clone()
        x_nan[3, 5] = float("nan")
        y2, rec2 = clean(x_nan)
        y_ref, rec_ref = clean(x)
    assert rec2.fallback_tokens.item() == 1 and rec_ref.fallback_tokens.item() == 0
    rows = [0, 1, 2, 4]
    # equal up to float rounding (the experts' matmuls see other row counts)
    torch.testing.assert_close(y2[rows], y_ref[rows], rtol=1e-6, atol=1e-7)
    assert torch.equal(rec2.expert_index[rows], rec_ref.expert_index[rows])
    assert rec2.probs[3].tolist() == [0.0, 0.0, 1.0, 0.0]  # one-hot on the fallback expert


def test_finite_logits_are_untouched_and_training_never_falls_back():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    on, off = TopKGate(8, 4, k=2, fallback_expert=0), TopKGate(8, 4, k=2, fallback_expert=-1)
    off.load_state_dict(on.state_dict())
    on.eval(), off.eval()
    a, b = on(x), off(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.expert_weight, b.expert_weight)
    assert a.fallback_tokens.item() == 0 and b.fallback_tokens is None
    x[0, 0] = float("nan")
    assert torch.isnan(on.train()(x).logits[0]).all()  # training: the NaN must surface
    assert on.train()(x).fallback_tokens is None
    assert torch.isnan(off(x).logits[0]).all()  # -1: off


def test_bad_fallback_expert_is_refused(toy_data):
    for bad in (-2, 4):
        with pytest.raises(ValueError, match=r"--moe-fallback-expert must be -1 \(off\) or an"):
            TopKGate(8, 4, fallback_expert=bad)
    with pytest.raises(ValueError, match="moe_transformer_tiny: --moe-fallback-expert"):
        build_model_and_task(tiny_args(toy_data["bin"], "--moe-fallback-expert", 9))


def test_model_with_a_corrupted_router_still_translates(toy_data):
    torch.manual_seed(0)
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], "--moe-expert-count", 4))
    model.eval()
    batch = toy_batch(task)
    with torch.no_grad():
        model.encoder.layers[1].moe.gate.wg.weight[0, 0] = float("inf")
        out, extra = model(**batch["net_input"])
    assert torch.isfinite(out).all()
    records = {r.layer: r for r in extra["moe_records"]}
    bad = records["encoder.layers.1"]
    assert bad.fallback_tokens.item() == bad.expert_index.shape[0] > 0
    assert not bool(bad.logits_finite)  # validation's NaN check still sees the broken router
    assert all(r.fallback_tokens.item() == 0 for name, r in records.items() if name != bad.layer)
