"""The roofline of one decoder step (fairseq_moe_cli/step_roofline.py): bytes and flops of a
hand-built encoder-decoder, against counts done by hand; the bound; the probe that measures the
distinct experts hit and the decoder steps; the machine measurements."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from moe_factories import make_layer

from fairseq_moe_cli.step_roofline import (
    StepProbe,
    StepShape,
    limit,
    machine_figures,
    measure_bandwidth,
    measure_peak,
    step_cost,
)

D, V = 4, 10


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim = D
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, nn.Linear(D, D))  # 16 + 4 parameters each


def tiny_model(tied: bool) -> nn.Module:
    """Encoder: embeddings V x D, one layer (attention, FFN 4 -> 6 -> 4). Decoder: embeddings,
    learned positions 16 x D, one layer (attention, cross-attention, MoE of 4 experts 4 -> 8 -> 4,
    top-1), output projection D -> V without bias (tied: the embedding table)."""
    enc_layer = nn.Module()
    enc_layer.self_attn, enc_layer.fc1, enc_layer.fc2 = (
        Attention(),
        nn.Linear(D, 6),
        nn.Linear(6, D),
    )
    encoder = nn.Module()
    encoder.embed_tokens, encoder.layers = nn.Embedding(V, D), nn.ModuleList([enc_layer])
    dec_layer = nn.Module()
    dec_layer.self_attn, dec_layer.encoder_attn = Attention(), Attention()
    dec_layer.moe = make_layer(4, 1, d_model=D, d_ff=8, dtype=None, mode="eval")
    decoder = nn.Module()
    decoder.embed_tokens, decoder.embed_positions = nn.Embedding(V, D), nn.Embedding(16, D)
    decoder.layers = nn.ModuleList([dec_layer])
    decoder.output_projection = nn.Linear(D, V, bias=False)
    if tied:
        decoder.output_projection.weight = decoder.embed_tokens.weight
    model = nn.Module()
    model.encoder, model.decoder = encoder, decoder
    return model


SHAPE = StepShape(rows=6, cache_len=3, src_len=5, sentences=3, beam=2, steps=4,
                  experts_hit={"decoder.layers.0.moe": 2})  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_bytes_and_flops_of_one_step_match_the_hand_count(tied):
    cost = step_cost(tiny_model(tied), SHAPE)
    # Decoder parameters (fp32, 4 bytes), elements: embeddings 6 rows x 4 (none when tied: the
    # projection reads the table whole), positions 1 row x 4, self-attention 4 x 20, cross-
    # attention q and out 2 x 20 (k and v run once per batch), router 4 x 4, experts: 2 of 4 hit
    # x (32 + 8 + 32 + 4), output projection 10 x 4.
    elements = (0 if tied else 24) + 4 + 80 + 40 + 16 + 2 * 76 + 40
    assert cost["bytes"]["decoder_params"] == 4 * elements
    # Caches: K and V x (3 cached + 5 source positions) x 4 x 6 rows x 4 bytes.
    assert cost["bytes"]["attention_cache"] == 2 * 8 * 4 * 6 * 4
    # Once per batch: encoder embeddings min(3 x 5 tokens, 10) rows x 4, its attention 4 x 20,
    # FFN 30 + 28; the decoder's cross-attention k and v 2 x 20.
    assert cost["bytes"]["per_batch"] == 4 * (40 + 80 + 58 + 40)
    assert cost["bytes_per_step"] == cost["bytes"]["decoder_params"] + 1536 + 872 / 4
    # MACs per row: attention 4 x 16, cross q and out 2 x 16, router 16, one expert 2 x 4 x 8,
    # output projection 40; attention over the cache and the source 2 x (3 + 5) x 4.
    assert cost["decoder_macs_per_row"] == 64 + 32 + 16 + 64 + 40
    assert cost["flops"]["decoder"] == 2 * 216 * 6
    assert cost["flops"]["attention"] == 2 * 64 * 6
    # Per batch: encoder (64 + 24 + 24 + attention 2 x 5 x 4) on 15 tokens, and the cross k, v
    # projections (2 x 16) on 3 sentences x beam 2 x 5 source positions.
    assert cost["flops"]["per_batch"] == 2 * (152 * 15 + 32 * 30)
    assert cost["flops_per_step"] == 2592 + 768 + 6480 / 4


def test_all_experts_count_when_no_hit_is_measured():
    model = tiny_model(False)
    full = step_cost(model, StepShape(rows=6, cache_len=3, src_len=5, sentences=3, beam=2,
                                      steps=4))  # fmt: skip
    assert full["bytes"]["decoder_params"] - step_cost(model, SHAPE)["bytes"]["decoder_params"] \
        == 2 * 76 * 4  # fmt: skip
    assert full["flops_per_step"] == step_cost(model, SHAPE)["flops_per_step"]  # k, not hits


def test_the_limit_is_the_slower_of_memory_and_compute():
    cost = {"bytes_per_step": 2e9, "flops_per_step": 1e9}
    bound = limit(cost, bandwidth_gbs=100, peak_gflops=1000)
    assert bound == {"memory_ms": 20.0, "compute_ms": 1.0, "limit_ms": 20.0, "bound": "memory"}
    assert limit(cost, bandwidth_gbs=1e4, peak_gflops=10)["bound"] == "compute"


class Ensemble(nn.Module):
    def forward_decoder(self, tokens):
        return tokens.shape[0]


def test_probe_counts_distinct_experts_and_decoder_steps_then_removes_itself():
    layer = make_layer(4, 1, d_model=D, d_ff=8, dtype=None, mode="eval")
    model = nn.Module()
    model.moe = layer
    generator = SimpleNamespace(model=Ensemble())
    inputs = [torch.randn(1, D), torch.randn(50, D)]
    with torch.no_grad():
        expected = [int((layer(x)[1].expert_counts > 0).sum()) for x in inputs]
        with StepProbe(generator, [model]) as probe:
            for x in inputs:
                layer(x)
            assert generator.model.forward_decoder(torch.zeros(6, 2)) == 6
    assert expected[0] == 1 and probe.experts_hit(0) == {"moe": sum(expected) / 2}
    assert probe.counts_steps and probe.rows == [6]
    assert not layer._forward_hooks and "forward_decoder" not in vars(generator.model)
    assert not StepProbe(SimpleNamespace(), [model]).counts_steps  # no forward_decoder to count


def test_machine_measurements_are_positive_and_given_figures_win():
    assert measure_bandwidth(nbytes=2**20, repeats=2) > 0
    assert measure_peak(n=64, repeats=2) > 0
    figures = machine_figures(12.5, 300.0)
    assert figures["bandwidth_gbs"] == 12.5 and figures["peak_gflops"] == 300.0
    assert figures["bandwidth_source"] == figures["peak_source"] == "given"
