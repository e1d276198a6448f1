"""The worked example of docs/contributing/extending.md: a routing method added in one file
(examples/extending/sampled_topk.py) and registered with one line, then used by the gate, the
MoE layer, the validation table and the FLOP count with no other change."""

import importlib.util
from argparse import Namespace

import pytest
import torch
from conftest import REPO
from moe_factories import make_gate, make_layer

from fairseq_moe_plugin.models.config_rules import check_layer_options, validate_moe_args
from fairseq_moe_plugin.models.moe_config import MoEConfig
from fairseq_moe_plugin.modules.routing import ROUTING_METHODS, RoutingMode

D, E = 8, 4


def _load_example():
    path = REPO / "examples" / "extending" / "sampled_topk.py"
    spec = importlib.util.spec_from_file_location("sampled_topk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def registered(monkeypatch):
    """The registry line of the example, for the duration of one test."""
    method = _load_example().SampledTopK()
    monkeypatch.setitem(ROUTING_METHODS, method.name, method)
    return method


def test_eval_routes_as_top_k(registered):
    sampled = make_gate(D, E, k=2, normalize_top_k=True, routing="sampled_topk").eval()
    top_k = make_gate(D, E, k=2, normalize_top_k=True).eval()
    x = torch.randn(10, D)
    a, b = sampled(x), top_k(x)
    assert a.mode is RoutingMode.TOKEN_CHOICE and sampled.method is registered
    assert torch.equal(a.expert_index, b.expert_index)
    torch.testing.assert_close(a.expert_weight, b.expert_weight)


def test_training_samples_experts_by_their_probability(registered):
    """Gumbel-max: with k = 1 an expert is picked with its router probability."""
    gate = make_gate(D, E, k=1, capacity_factor=0.0, routing="sampled_topk").train()
    x = torch.randn(1, D).expand(20000, D)  # one token, many draws
    torch.manual_seed(0)
    out = gate(x)
    share = torch.bincount(out.expert_index[:, 0], minlength=E).double() / x.shape[0]
    torch.testing.assert_close(share, out.probs[0].double(), atol=0.015, rtol=0)
    two = make_gate(D, E, k=2, routing="sampled_topk").train()(torch.randn(50, D))
    assert (two.expert_index[:, 0] != two.expert_index[:, 1]).all()  # without replacement


def test_layer_record_and_losses(registered):
    layer = make_layer(E, 2, routing="sampled_topk")
    y, record = layer(torch.randn(5, 3, 8, dtype=torch.float64))
    assert y.shape == (5, 3, 8) and record.k == 2 and not record.dense
    assert int(record.expert_counts_routed.sum()) == 30
    record.balance_loss.backward()
    assert layer.gate.wg.weight.grad.abs().sum() > 0


def test_validation_table_and_flops_read_its_capabilities(registered):
    cfg = MoEConfig(moe_expert_count=E, moe_routing="sampled_topk", moe_top_k=2)
    check_layer_options(cfg, "decoder.layers.1", causal=True)  # causal: a decoder may use it
    args = Namespace(**vars(cfg), arch="toy", encoder_layers=2, decoder_layers=2)
    validate_moe_args(args)
    gate = make_gate(D, E, k=2, routing="sampled_topk")
    assert gate.experts_per_token() == 2.0 and gate.expert_choice_factor is None
    with pytest.raises(ValueError, match="toy: --moe-bias-balancing-rate balances the top-k"):
        validate_moe_args(Namespace(**{**vars(args), "moe_bias_balancing_rate": 0.1}))
