"""GPU checks, skipped without CUDA (CI has none; run them where a GPU is lent): the grouped_mm
path in bf16 equals the fp32 per-expert loop, and a dropless training step of the MoE layer
makes no host sync (``torch.cuda.set_sync_debug_mode("error")`` raises on one)."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_factories import make_layer

from fairseq_moe_plugin.modules import MoELayer, TopKGate
from fairseq_moe_plugin.modules.grouped_gemm import grouped_mm_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and grouped_mm_available()),
        reason="needs a CUDA device and torch's grouped_mm",
    ),
]


# make_layer(8, k, **LAYER): dropless (capacity factor 0: no nonzero() sync), GELU, fp32.
LAYER = dict(
    d_model=256,
    d_ff=512,
    normalize_top_k=False,
    activation_fn="gelu",
    name="moe",
    dtype=None,
    mode=None,
)


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_mm_bf16_matches_the_fp32_loop(k):
    # Both start from the same bf16-representable weights and input, so that the router (fp32
    # in both) makes the same choices and only the experts' arithmetic differs.
    reference = make_layer(8, k, **LAYER).cuda().to(torch.bfloat16).float()
    reference.experts.impl = "loop"
    fast = copy.deepcopy(reference).to(torch.bfloat16)
    fast.experts.impl = "auto"  # bf16 on CUDA: grouped_mm
    x = torch.randn(1024, 256, device="cuda").bfloat16().float()
    y_ref, _ = reference(x)
    y, _ = fast(x.bfloat16())
    y_ref.square().sum().backward()
    y.float().square().sum().backward()
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters(), strict=True):
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert (q.grad.float() - p.grad).abs().max() / scale < 5e-2, name


def test_a_dropless_training_step_makes_no_host_sync():
    layer = make_layer(8, 2, **LAYER).cuda().to(torch.bfloat16).train()
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, record = layer(x)
        (y.float().square().mean() + record.balance_loss + record.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None and layer.gate.wg.weight.grad is not None


@pytest.mark.parametrize("routing", ["topk", "dense"])
def test_lora_experts_under_bf16_autocast_match_fp32_on_cpu(routing):
    """Issue 14's LoRA experts (B non-zero), with the schedule and EMA buffers, on CUDA under
    bf16 autocast: the same output and gradients as the fp32 CPU layer, to bf16 rounding."""
    from fairseq_moe_plugin.modules.lora_experts import LoRAExperts

    torch.manual_seed(0)
    gate = TopKGate(256, 8, k=2, routing=routing, dense_until=5, usage_ema=0.9, router_bias=True,
                    balance_loss="mse", temperature=2.0)  # fmt: skip
    experts = LoRAExperts(8, 256, 512, rank=8, activation_fn="gelu")
    with torch.no_grad():
        experts.lora_b1.normal_(0, 0.05)
        experts.lora_b2.normal_(0, 0.05)
    cpu = MoELayer(gate, experts)
    cpu.gate.set_num_updates(7)  # past the schedule: top-k unless routing is dense
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(512, 256)
    y_cpu, rec_cpu = cpu(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_gpu, rec_gpu = gpu(x.cuda())
    assert rec_gpu.dense == (routing == "dense") and rec_gpu.k == (8 if routing == "dense" else 2)
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, rtol=5e-2, atol=5e-2)
    (y_cpu.square().sum() + rec_cpu.balance_loss).backward()
    (y_gpu.float().square().sum() + rec_gpu.balance_loss).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name  # the frozen FFN
            continue
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert (q.grad.float().cpu() - p.grad).abs().max() / scale < 5e-2, name
    gpu.gate.update_usage_ema(rec_gpu.expert_load)
    assert gpu.gate.usage_ema.device.type == "cuda"
