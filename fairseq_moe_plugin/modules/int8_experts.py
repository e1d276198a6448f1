"""Stacked experts with int8 weights, for CPU inference (``fairseq-moe-quantize``).

Each expert's fc1 and fc2 weights are int8, symmetric, with one fp32 scale per expert and output
channel (``w[e, o, :] ~= scale[e, o] * q[e, o, :]``, ``q`` in [-127, 127]); biases stay fp32.
Tensors, stacked expert-major like ``StackedExperts``' (nn.Linear layout, out x in):

- ``fc1_qweight``: E x d_ff x d_model int8, ``fc1_scale``: E x d_ff, ``fc1_bias``: E x d_ff
- ``fc2_qweight``: E x d_model x d_ff int8, ``fc2_scale``: E x d_model, ``fc2_bias``: E x d_model

Two ways to compute with them (``INT8_COMPUTE``):

- ``dynamic``: each expert's rows go through fbgemm's int8 GEMM (``quantized::linear_dynamic``,
  the kernel of torch's dynamic quantisation): the activations are quantised per call (per
  tensor, 7-bit range as torch's default dynamic qconfig), the weights are packed once per
  expert from ``q`` and ``scale``. Fastest on CPU.
- ``weight_only``: the activations stay fp32; each expert's weights are dequantised when the
  expert runs (``F.linear(x, q.float()) * scale``: the per-channel scale factors out of the
  product). Only the weights' rounding differs from fp32, at the cost of a dequantisation per
  expert and call.

What this adds to torch's dynamic quantisation (which quantises ``nn.Linear`` modules): experts
stored as one stacked tensor per layer, quantised per expert, run on the expert-sorted rows of a
``DispatchPlan`` (only the experts that received rows run). Inference only: no autograd.

The ``int8`` kind of ``expert_kinds.INT8_KINDS`` (one entry per ``--moe-int8`` mode); the hooks an
inference-only, quantised form cannot offer (ONNX export, upcycling, growth) raise
``ExpertKindUnsupported``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import get_activation_fn
from .dispatch import DispatchPlan, check_plan, combine, expert_slices
from .expert_protocol import ExpertKindUnsupported, Experts, NoExportNoInt8, UpcycleRule

INT8_COMPUTE = ("dynamic", "weight_only")
QMAX = 127


@torch.no_grad()
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of a stacked weight.

    Args:
        weight: E x O x I (nn.Linear layout per expert).
    Returns:
        (q, scale): E x O x I int8 in [-127, 127], and E x O fp32 with ``weight ~= scale * q``
        (an all-zero channel gets scale 1 and q 0).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1)  # E x O
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * q`` in fp32 (q: ... x O x I int8, scale: ... x O)."""
    return q.float() * scale.unsqueeze(-1)


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """fbgemm's packed weight of one expert's linear (q: O x I int8, scale: O, bias: O)."""
    with warnings.catch_warnings():  # torch's deprecation notice for quantised tensors
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qweight, bias.float())


class Int8StackedExperts(NoExportNoInt8, nn.Module):
    """E FFN experts ``fc2(act(fc1(x)))`` with int8 weights (see the module doc).

    Built empty (zeros) from the sizes, then filled by ``load_state_dict`` (a checkpoint written
    by ``fairseq-moe-quantize``) or by ``from_float``. Same forward contract as
    ``StackedExperts.forward``; eval only (no dropout, no autograd), CPU only.
    """

    # The ``Experts`` protocol (``expert_protocol.py``): inference on one process only.
    kind = "int8"
    shares_dense_ffn = reads_lora_options = supports_expert_parallel = False
    supports_parallel_placement = supports_shared_experts = supports_cmr = True
    supports_int8 = quantized = True
    STACKED = ("fc1_qweight", "fc1_scale", "fc1_bias", "fc2_qweight", "fc2_scale", "fc2_bias")
    SHARED_STATE: tuple[str, ...] = ()
    GROW_ZERO: tuple[str, ...] = ()
    UPCYCLE = UpcycleRule({}, into_every_expert=True)  # quantised from trained experts only

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation_fn: str = "relu",
        compute: str = "dynamic",
    ):
        super().__init__()
        if compute not in INT8_COMPUTE:
            raise ValueError(f"int8 compute must be one of {INT8_COMPUTE}, got {compute!r}")
        self.num_experts = self.num_local_experts = num_experts
        self.first_expert = 0
        self.expert_parallel = None  # one process holds every expert (MoELayer reads this)
        self.d_model, self.d_ff = d_model, d_ff
        self.activation_name = activation_fn
        self.activation_fn = get_activation_fn(activation_fn)
        self.compute = compute
        E = num_experts  # noqa: N806
        self.register_buffer("fc1_qweight", torch.zeros(E, d_ff, d_model, dtype=torch.int8))
        self.register_buffer("fc1_scale", torch.ones(E, d_ff))
        self.register_buffer("fc1_bias", torch.zeros(E, d_ff))
        self.register_buffer("fc2_qweight", torch.zeros(E, d_model, d_ff, dtype=torch.int8))
        self.register_buffer("fc2_scale", torch.ones(E, d_model))
        self.register_buffer("fc2_bias", torch.zeros(E, d_model))
        self._packed: list | None = None  # fbgemm weights, derived from the buffers

    @classmethod
    @torch.no_grad()
    def from_float(cls, experts: Experts, compute: str = "dynamic") -> Int8StackedExperts:
        """Quantise fp32 stacked experts (``StackedExperts``, all E on this process)."""
        if experts.expert_parallel is not None:
            raise ValueError("int8 experts hold every expert: gather expert-parallel shards first")
        new = cls(
            experts.num_experts, experts.d_model, experts.d_ff, experts.activation_name, compute
        )
        for fc in ("fc1", "fc2"):
            q, scale = quantize_per_channel(getattr(experts, f"{fc}_weight"))
            getattr(new, f"{fc}_qweight").copy_(q)
            getattr(new, f"{fc}_scale").copy_(scale)
            getattr(new, f"{fc}_bias").copy_(getattr(experts, f"{fc}_bias").float())
        return new.eval()

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: repack on the next call
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): the packed copies are stale
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def packed(self) -> list:
        """Per expert, fbgemm's packed (fc1, fc2) weights, built on first use."""
        if self._packed is None:
            self._packed = [
                (
                    _pack(self.fc1_qweight[e], self.fc1_scale[e], self.fc1_bias[e]),
                    _pack(self.fc2_qweight[e], self.fc2_scale[e], self.fc2_bias[e]),
                )
                for e in range(self.num_experts)
            ]
        return self._packed

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x: M x d_model -> M x d_model (fp32)."""
        if self.compute == "dynamic":
            fc1, fc2 = self.packed()[e]
            h = torch.ops.quantized.linear_dynamic(x, fc1, True)  # M x d_ff
            return torch.ops.quantized.linear_dynamic(self.activation_fn(h), fc2, True)
        h = F.linear(x, self.fc1_qweight[e].float()) * self.fc1_scale[e] + self.fc1_bias[e]
        h = self.activation_fn(h)  # M x d_ff
        return F.linear(h, self.fc2_qweight[e].float()) * self.fc2_scale[e] + self.fc2_bias[e]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: N x d_model; plan, weight (N x k) as for ``StackedExperts.forward``; N x d_model."""
        if x.device.type != "cpu":
            raise RuntimeError(
                f"int8 experts run on CPU only (fbgemm kernels); the input is on {x.device}"
            )
        if self.training:
            raise RuntimeError("int8 experts are for inference: call model.eval() first")
        check_plan(plan, x, weight, self.num_experts)
        x = x.float()
        rows = x.index_select(0, plan.token_index)  # M x C, sorted by expert
        out = x.new_empty(plan.num_rows + 1, x.shape[1])  # (M+1) x C, row M zero (dropped)
        out[plan.num_rows].zero_()
        for e, start, end in expert_slices(plan):
            out[start:end] = self.expert_forward(e, rows[start:end])
        return combine(out, plan.combine_index, None if weight is None else weight.float())

    def stacked_parameters(self) -> list[torch.Tensor]:
        """None: the int8 stacks are buffers (no trainable parameter per expert)."""
        return list(self.parameters())

    def expert_macs(self, tokens: int, assignments: float) -> float:
        """Two matmuls per assignment, as ``StackedExperts``: ``2 C F`` each."""
        return assignments * 2 * self.d_model * self.d_ff

    def upcycle_noise_(self, name: str, std: float) -> None:
        """int8 experts are quantised from trained ones, never upcycled."""
        raise ExpertKindUnsupported("int8 experts are not upcycled: upcycle the fp32 model")

    def init_like_bert(self) -> None:
        """Nothing: the int8 weights come from a checkpoint or ``from_float``."""

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation_name}, int8_compute={self.compute}"
        )
