"""``--moe-compile``: torch.compile(fullgraph=True, dynamic=True) of the MoE layer, the experts
behind one operator (``modules/compiled_experts.py``). Equal to eager in training (outputs,
routing counts, gradients of input and every parameter, activation dropout included) and in
eval; no graph break, and no recompilation across batch sizes, padding patterns and routings
once each mode has compiled."""

import copy
from argparse import Namespace

import pytest
import torch
from torch._dynamo.utils import counters

from fairseq_moe_plugin.models.config_rules import validate_moe_args
from fairseq_moe_plugin.models.moe_config import MoEConfig
from fairseq_moe_plugin.modules import MoELayer, StackedExperts, TopKGate


def _pair(dropout: float = 0.0):
    torch.manual_seed(0)
    gate = TopKGate(16, 4, k=2, capacity_factor=0.0)
    eager = MoELayer(gate, StackedExperts(4, 16, 32, activation_dropout=dropout))
    compiled = copy.deepcopy(eager)
    compiled.compile = True
    return eager, compiled


def _step(layer, x, mask):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks in both layers
    y, record = layer(x, mask)
    (y.pow(2).sum() + record.balance_loss).backward()
    return y, record, x.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.slow  # inductor compiles a few graphs
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_layer_equals_eager_without_recompiling(dropout):
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _pair(dropout)
    shapes = [(6, 3, True), (6, 3, False), (9, 2, True), (3, 5, False), (11, 1, True)]
    for i, (t, b, padded) in enumerate(shapes):
        if i == 2:  # both modes and both mask cases have compiled: none may compile again
            torch._dynamo.config.error_on_recompile = True
        try:
            x = torch.randn(t, b, 16)
            mask = torch.rand(t, b) < 0.3 if padded else None
            for layer in (eager, compiled):
                layer.train()
            ye, re, gxe, gpe = _step(eager, x, mask)
            yc, rc, gxc, gpc = _step(compiled, x, mask)
            torch.testing.assert_close(yc, ye)
            assert torch.equal(rc.expert_counts, re.expert_counts)
            torch.testing.assert_close(rc.balance_loss, re.balance_loss)
            torch.testing.assert_close(gxc, gxe)
            for a, b_ in zip(gpc, gpe, strict=True):
                torch.testing.assert_close(a, b_)
            for layer in (eager, compiled):
                layer.eval()
            with torch.no_grad():
                torch.testing.assert_close(compiled(x, mask)[0], eager(x, mask)[0])
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert not counters["graph_break"]  # fullgraph=True would raise; counted for the message


def test_compile_is_refused_where_the_graph_would_depend_on_the_data():
    def args(**flags):
        cfg = MoEConfig(**{"moe_compile": True, "moe_capacity_factor": 0.0, **flags})
        return Namespace(**vars(cfg), arch="toy", encoder_layers=2, decoder_layers=2)

    validate_moe_args(args())  # dropless top-k: accepted
    for flags in ({"moe_capacity_factor": 1.25}, {"moe_eval_capacity_factor": 2.0},
                  {"moe_routing": "expert_choice", "moe_decoder_routing": "topk"}):  # fmt: skip
        with pytest.raises(ValueError, match="toy: --moe-compile needs dropless"):
            validate_moe_args(args(**flags))


@pytest.mark.slow
def test_a_built_model_layer_compiles_when_asked():
    from fairseq_moe_plugin.modules.moe_layer_builder import build_moe_layer

    cfg = MoEConfig(moe_compile=True, moe_capacity_factor=0.0, moe_expert_count=4)
    layer = build_moe_layer(cfg, 16, 32, "relu", 0.0, "encoder.layers.1")
    assert layer.compile
    layer.eval()
    with torch.no_grad():
        y, record = layer(torch.randn(3, 2, 16))
    assert y.shape == (3, 2, 16) and int(record.expert_counts.sum()) == 3 * 2 * 2
