"""An analytic cost model of expert-parallel MoE training on 8-512+ GPUs, and its calibration
against published figures (``fairseq-moe-benchmark-ep --model``).

Per token and MoE layer, expert parallelism moves the token's k copies to their experts and
back (dispatch, combine) in the forward pass and again in the backward pass:
``4 * k * d * bytes_per_element`` bytes (``6 *`` with activation checkpointing, which repeats the
forward), of which ``(P-1)/P`` leave the rank: ``(G-1)/(P-1)`` of those over NVLink inside a node
of G GPUs, the rest over InfiniBand. A flat all-to-all runs both links at once, so it takes the
longer of the two, plus ``alpha`` per peer message. The compute is ``6 * active parameters``
FLOPs per token (``8 *`` with checkpointing) at an achieved rate. Nothing overlaps (an upper
bound on time; overlap only helps).

Expert FLOPs against communication, per token and MoE layer: ``12 * k * d * d_ff`` FLOPs at F
FLOP/s against ``4 * k * d * b`` bytes at BW: the communication takes longer once
``d_ff < b * F / (3 * BW)``, independent of k and d (``crossover_ffn_dim``).

Hand-written: no library models MoE all-to-all cost; it is a few lines of arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hardware:
    name: str
    nvlink_gb_s: float  # per GPU and direction, effective
    ib_gb_s: float  # per GPU, effective
    gpus_per_node: int
    achieved_tflops: float  # model FLOPs per second per GPU actually achieved
    alpha_us: float = 10.0  # latency per peer message of one all-to-all (assumed)


@dataclass(frozen=True)
class MoEModel:
    name: str
    d_model: int
    d_ff: int
    layers: int
    moe_every: int  # every n-th layer is MoE
    k: int
    vocab: int
    tokens_per_gpu: int  # tokens per GPU and update (all micro-batches)
    micro_batches: int = 1
    bytes_per_element: int = 2
    checkpoint_activations: bool = False

    @property
    def moe_layers(self) -> int:
        return self.layers // self.moe_every

    def active_params(self) -> float:
        """Parameters one token goes through: attention 4d^2 per layer, dense FFN 2*d*d_ff,
        k experts in MoE layers, and the (tied) embedding."""
        attention = 4 * self.d_model**2 * self.layers
        ffn = 2 * self.d_model * self.d_ff
        dense_layers = self.layers - self.moe_layers
        return (
            attention + ffn * (dense_layers + self.k * self.moe_layers) + self.vocab * self.d_model
        )


def bytes_per_token(model: MoEModel) -> float:
    """All-to-all bytes one token sends per MoE layer (fwd+bwd, both exchanges)."""
    passes = 6 if model.checkpoint_activations else 4
    return passes * model.k * model.d_model * model.bytes_per_element


def step_time_per_token(model: MoEModel, hw: Hardware, gpus: int) -> dict[str, float]:
    """Seconds per token on one GPU, split into compute and communication (experts sharded
    over all ``gpus``, one expert-parallel group)."""
    flops = (8 if model.checkpoint_activations else 6) * model.active_params()
    compute = flops / (hw.achieved_tflops * 1e12)
    leaving = bytes_per_token(model) * (gpus - 1) / gpus
    peers = gpus - 1
    intra = min(hw.gpus_per_node - 1, peers)
    nvlink = leaving * (intra / peers if peers else 0.0)
    ib = leaving - nvlink
    transfer = max(nvlink / (hw.nvlink_gb_s * 1e9), ib / (hw.ib_gb_s * 1e9) if ib else 0.0)
    exchanges = (6 if model.checkpoint_activations else 4) * model.micro_batches
    latency = exchanges * peers * hw.alpha_us * 1e-6 / model.tokens_per_gpu
    comm = model.moe_layers * (transfer + latency)
    return {"compute": compute, "comm": comm, "total": compute + comm}


def words_per_second(model: MoEModel, hw: Hardware, gpus: int) -> float:
    """Tokens per second of the whole job."""
    return gpus / step_time_per_token(model, hw, gpus)["total"]


def crossover_ffn_dim(hw: Hardware, bytes_per_element: int, over_ib: bool = True) -> float:
    """The expert width below which an expert's fwd+bwd FLOPs take less time than moving its
    tokens (the module doc)."""
    bandwidth = (hw.ib_gb_s if over_ib else hw.nvlink_gb_s) * 1e9
    return bytes_per_element * hw.achieved_tflops * 1e12 / (3 * bandwidth)


def calibrate_tflops(model: MoEModel, hw: Hardware, gpus: int, published_wps: float) -> Hardware:
    """The achieved TFLOP/s that makes the model reproduce one published throughput."""
    low, high = 1.0, 2000.0
    for _ in range(100):  # words_per_second grows with the rate: bisect
        mid = (low + high) / 2
        if words_per_second(model, replace(hw, achieved_tflops=mid), gpus) < published_wps:
            low = mid
        else:
            high = mid
    return replace(hw, achieved_tflops=(low + high) / 2)


def hierarchical_speedup(bytes_per_gpu: float, hw: Hardware, gpus: int) -> float:
    """Flat all-to-all time over a two-level one (Tutel's 2DH: gather inside the node over
    NVLink, one message per node over InfiniBand, scatter inside the node): for small
    messages the flat one pays ``alpha`` for each of ``gpus - 1`` peers."""
    nodes = max(1, gpus // hw.gpus_per_node)
    alpha = hw.alpha_us * 1e-6
    ib_bytes = bytes_per_gpu * (gpus - hw.gpus_per_node) / gpus
    flat = (gpus - 1) * alpha + ib_bytes / (hw.ib_gb_s * 1e9)
    local = 2 * ((hw.gpus_per_node - 1) * alpha + bytes_per_gpu / (hw.nvlink_gb_s * 1e9))
    two_level = local + (nodes - 1) * alpha + ib_bytes / (hw.ib_gb_s * 1e9)
    return flat / two_level


# -- published figures the model is set against -------------------------------------------------

# fairseq's README.moe ("Expected performance on IB interconnect", A100): transformer_lm_gpt,
# 32 layers, d 4096, FFN 16384, MoE every 2nd layer, top-2 (--moe-second-expert-policy all),
# one expert per GPU, 1024 tokens per sample, 6 samples x 2 accumulation (12 x 1 at 512 GPUs),
# --checkpoint-activations, fp16.
# Its task, dummy_lm, has 49,996 symbols plus 4 special ones.
FAIRSEQ_README_MOE = MoEModel("fairseq README.moe", 4096, 16384, 32, 2, 2, 50000, 12 * 1024,
                              micro_batches=2, checkpoint_activations=True)  # fmt: skip
FAIRSEQ_README_MOE_WPS = {32: 33_000, 64: 82_000, 128: 191_000, 512: 638_000}
# A100 nodes of 8 GPUs: NVLink 3 (300 GB/s per direction), one 200 Gb/s HDR InfiniBand NIC per GPU.
A100_HDR = Hardware("A100 + HDR IB", nvlink_gb_s=300.0, ib_gb_s=25.0, gpus_per_node=8,
                    achieved_tflops=100.0)  # fmt: skip

# DeepEP (deepseek-ai/DeepEP, docs/legacy.md, V1 normal kernels, H800, CX7 400 Gb/s): measured
# bottleneck bandwidth of dispatch/combine, against the links' maxima (~160 GB/s NVLink,
# ~50 GB/s RDMA).
DEEPEP_MEASURED_GB_S = {"NVLink, EP 8": (153, 158, 160), "RDMA, EP 16": (43, 43, 50),
                        "RDMA, EP 32": (58, 57, 50), "RDMA, EP 64": (51, 50, 50)}  # fmt: skip

# Tutel (Hwang et al., MLSys 2023): 2DH all-to-all up to 20.7x the flat one at 2,048 A100 GPUs.
TUTEL_2DH_SPEEDUP_2048 = 20.7
