"""The MoE feed-forward block as a static ONNX graph: three formulations of one ``MoELayer``.

Routing is the gate's, in fp32: router linear -> (``/ temperature``) -> (fallback of non-finite
rows) -> softmax -> top-k -> (renormalise when ``normalize_top_k``), or all experts weighted by
their probability under dense routing. Eval routing is dropless (``check_exportable_moe`` refuses
a gate whose eval capacity could drop), so every token gets its k experts whatever the batch.

``plain`` (standard ONNX ops, default): every expert runs on every token and the combine weights
are folded into the second matmul::

    W  = scatter(zeros(N, E), top_index, top_weight)              # N x E, k non-zeros per row
    h  = act(x @ W1cat + b1cat)                                   # N x (E*F), one GEMM
    y  = (h * W per expert block) @ W2cat + W @ b2                # N x C, one GEMM

with ``W1cat`` the experts' fc1 stacked to C x (E*F) and ``W2cat`` their fc2 to (E*F) x C. It
costs E/k times the expert FLOPs of sparse dispatch and N x E x F floats per activation tensor
(134 MB at batch 32 x 128 tokens, E = 8, F = 1024), but every shape is static and the unselected
experts add exact zeros. The alternatives are worse as plain ops: gathering each token's k expert
weights materialises N x k x F x C floats (8.6 GB for that batch); a sort-based dispatch needs
data-dependent shapes, or a capacity of N rows per expert, which is the dense cost again; and
computing the E x N x C expert outputs and gathering the k chosen ones (batched matmuls, then
GatherElements) took 267 ms against 101 ms for the fold, for one such layer on 4096 tokens (2
threads, same peak memory).

``fused``: onnxruntime's contrib op ``com.microsoft.MoE`` (checked against onnxruntime 1.32). It
takes the router *logits* (it applies the softmax itself), stacked ``fc1`` E x F x C and ``fc2``
E x C x F in nn.Linear layout (ours), biases, ``k`` and ``normalize_routing_weights``, and runs
each expert on its own tokens only (sparse). Its ``gelu`` is the tanh approximation
(``0.5x(1+tanh(0.79788(x+0.044715x^3)))``), so fairseq's exact (erf) ``gelu`` experts are
approximated; ``relu``, ``gelu_fast``/``gelu_accurate`` and ``linear`` are exact; ``tanh`` has
no counterpart and is refused.

``qmoe``: ``com.microsoft.QMoE`` with int8 expert weights (per expert and output channel,
symmetric, stored as uint8 with onnxruntime's default zero point 128) and fp32 activations; it
runs on CPU in onnxruntime 1.32. Its results differ from fp32 by the quantisation error.

Which ships: ``plain`` is the default. On the 8-expert, top-2, erf-gelu classifier of issue 15
(4 layers, d 256, ffn 1024; its 801 test sentences; 2 threads, each engine timed on its own on
a quiet 2-core machine; README, "Deploying a model") it is exact (max |logit diff| 1.4e-5,
against 2.3e-3 for ``fused``, whose gelu approximation fails the 1e-4 check although every
prediction agreed), it runs on any ONNX runtime, and it is the fastest at batch 1 (p50 1.6 ms,
against 2.1 ms for ``fused`` and 4.4 ms for PyTorch eager). At batch 32 its E/k extra expert
FLOPs show: p50 44 ms against 43 ms for ``fused``, 41 ms for ``qmoe`` and 30 ms for PyTorch
eager's sparse dispatch; and at 32 x 128 tokens it peaked at 1.1 GB of process memory against
0.37 GB for ``fused``. So for large batches of long inputs, ``fused`` (relu/gelu_fast experts,
where it is exact) or PyTorch itself is the better choice.

Neither contrib op has an ONNX schema of its own, so ``register_ort_schemas`` registers minimal
ones in the onnx package (only when absent) for the exporter to build the nodes; the two ops are
torch custom ops (``fairseq_moe_onnx::ort_moe``, ``::ort_qmoe``) whose PyTorch implementation is
the same computation, the op's own activation included, so the export wrapper runs in PyTorch too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.activations import get_activation_fn
from ..modules.expert_kinds import ExpertKindUnsupported
from ..modules.moe_layer import MoELayer
from ..modules.routing.router import FALLBACK_OTHER_LOGIT

MOE_OPS = ("plain", "fused", "qmoe")
# Our expert activations -> the contrib ops' activation_type; exact ones map to the same function.
ORT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_fast": "gelu",
                   "gelu_accurate": "gelu", "linear": "identity"}  # fmt: skip
INEXACT_ORT_ACTIVATIONS = {"gelu": "onnxruntime's MoE gelu is the tanh approximation of erf gelu"}
_ORT_TORCH_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_fast", "identity": "linear"}


class ExportError(ValueError):
    """A model, option or input the ONNX export cannot handle, with the reason."""


def check_exportable_moe(moe: nn.Module, name: str, moe_op: str = "plain") -> None:
    """ExportError naming the layer and the option unless ``moe`` can be exported as ``moe_op``."""
    if moe_op not in MOE_OPS:
        raise ExportError(f"unknown --moe-op {moe_op!r}; expected one of {', '.join(MOE_OPS)}")
    if not isinstance(moe, MoELayer):
        raise ExportError(f"{name}: not an MoE layer ({type(moe).__name__})")
    experts, gate = moe.experts, moe.gate
    try:  # the kind says whether it exports (FFN experts do; LoRA and int8 do not)
        experts.check_onnx_export()
    except ExpertKindUnsupported as err:
        raise ExportError(f"{name}: {err}") from err
    if experts.expert_parallel is not None or experts.num_local_experts != experts.num_experts:
        raise ExportError(
            f"{name}: expert parallelism (--moe-expert-parallel-size > 1) is not supported; "
            "load the consolidated checkpoint on one process"
        )
    if not gate.method.onnx_static:
        raise ExportError(
            f"{name}: {gate.method.title} is not supported by the ONNX export: "
            f"{gate.method.reason('onnx_static')}"
        )
    if getattr(gate, "bias_balancing_rate", 0.0) > 0 and moe_op != "plain":
        raise ExportError(
            f"{name}: --moe-bias-balancing-rate selects the experts by biased logits, which "
            f"onnxruntime's MoE op (--moe-op {moe_op}) cannot take; use --moe-op plain"
        )
    factor = gate.eval_capacity_factor
    if not gate.routes_densely and factor > 0 and factor * gate.k < gate.num_experts:
        raise ExportError(
            f"{name}: --moe-eval-capacity-factor {factor} can drop tokens (capacity "
            f"ceil({factor} * k={gate.k} * N / E={gate.num_experts}) < N), and the static graph "
            "is dropless; export with --model-overrides \"{'moe_eval_capacity_factor': 0}\""
        )
    if moe_op != "plain" and experts.activation_name not in ORT_ACTIVATIONS:
        raise ExportError(
            f"{name}: expert activation {experts.activation_name!r} has no counterpart in "
            f"onnxruntime's MoE op (it knows {', '.join(sorted(ORT_ACTIVATIONS))}); "
            "use --moe-op plain"
        )


def register_ort_schemas() -> None:
    """Register minimal schemas of ``com.microsoft`` MoE and QMoE (inputs, attributes, types as
    onnxruntime 1.32 defines them) in the onnx package, unless it has them, so the exporter
    and ``onnx.checker`` can build and read the nodes; onnxruntime has its own."""
    import onnx
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, kind = OpSchema.Attribute, OpSchema.AttrType
    attrs = [attr("k", kind.INT, "experts per token"),
             attr("activation_type", kind.STRING, "relu, gelu (tanh), silu, identity"),
             attr("normalize_routing_weights", kind.INT, "renormalise the top-k weights"),
             attr("use_sparse_mixer", kind.INT, "sparse mixer routing")]  # fmt: skip
    ops = {
        "MoE": ([("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "T"),
                 ("fc1_experts_bias", "T?"), ("fc2_experts_weights", "T"),
                 ("fc2_experts_bias", "T?")], [("T", ["tensor(float)"])], []),
        "QMoE": ([("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "T1"),
                  ("fc1_scales", "T2?"), ("fc1_experts_bias", "T?"), ("fc2_experts_weights", "T1"),
                  ("fc2_scales", "T2?"), ("fc2_experts_bias", "T?")],
                 [("T", ["tensor(float)"]), ("T1", ["tensor(uint8)"]), ("T2", ["tensor(float)"])],
                 [attr("expert_weight_bits", kind.INT, "4 or 8"),
                  attr("weights_prepacked", kind.INT, "0: raw [E, N, K] weights")]),
    }  # fmt: skip
    for op_name, (inputs, types, extra) in ops.items():
        try:
            onnx.defs.get_schema(op_name, 1, "com.microsoft")
            continue
        except onnx.defs.SchemaError:
            pass
        formal = [param(n, t.rstrip("?"), param_option=optional) if t.endswith("?")
                  else param(n, t) for n, t in inputs]  # fmt: skip
        schema = OpSchema(op_name, "com.microsoft", 1, inputs=formal,
                          outputs=[param("output", "T")],
                          type_constraints=[(t, allowed, "") for t, allowed in types],
                          attributes=attrs + extra)  # fmt: skip
        onnx.defs.register_schema(schema)


def combine_weights(
    logits: torch.Tensor,
    k: int,
    normalize: bool,
    dense: bool,
    select_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gate's combine weights as a dense N x E matrix (k non-zeros per row, or all E under
    dense routing); logits: N x E fp32, already divided by the temperature; ``select_bias``: E,
    the bias-balancing bias, which picks the k experts (top-k of ``logits + select_bias``) but
    does not weigh them."""
    probs = torch.softmax(logits, dim=-1)  # N x E
    if dense:
        return probs
    if select_bias is not None:
        top_index = torch.topk(logits + select_bias, k, dim=-1).indices  # N x k
        top_prob = probs.gather(1, top_index)  # N x k, unbiased
    else:
        top_prob, top_index = torch.topk(probs, k, dim=-1)  # N x k, best first
    if normalize:
        top_prob = top_prob / top_prob.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return torch.zeros_like(probs).scatter(1, top_index, top_prob)  # N x E


def dense_experts_ffn(x, weight, w1cat, b1cat, w2cat, b2, activation: str) -> torch.Tensor:
    """``sum_e weight[:, e] * expert_e(x)`` with every expert computed (module doc, ``plain``).

    Args:
        x: N x C; weight: N x E; w1cat: C x (E*F); b1cat: E*F; w2cat: (E*F) x C; b2: E x C.
    Returns:
        N x C.
    """
    num_experts = weight.shape[1]
    h = get_activation_fn(activation)(torch.matmul(x, w1cat) + b1cat)  # N x (E*F)
    h = h.unflatten(1, (num_experts, -1)) * weight.unsqueeze(-1)  # N x E x F
    return torch.matmul(h.flatten(1), w2cat) + torch.matmul(weight, b2)  # N x C


def _torch_ort_moe(x, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, k, normalize,
                   activation) -> torch.Tensor:  # fmt: skip
    """What ``com.microsoft.MoE`` computes (softmax of the logits, top-k, optional renormalising,
    the op's own activation), in PyTorch; weights in nn.Linear layout E x F x C, E x C x F."""
    num_experts, d_ff, d_model = fc1_weight.shape
    weight = combine_weights(logits, k, normalize, dense=False)  # N x E (k = E: dense routing)
    w1cat = fc1_weight.reshape(num_experts * d_ff, d_model).t()  # C x (E*F)
    w2cat = fc2_weight.transpose(1, 2).reshape(num_experts * d_ff, d_model)  # (E*F) x C
    act = _ORT_TORCH_ACTIVATIONS[activation]
    return dense_experts_ffn(x, weight, w1cat, fc1_bias.reshape(-1), w2cat, fc2_bias, act)


@torch.library.custom_op("fairseq_moe_onnx::ort_moe", mutates_args=())
def ort_moe(x: torch.Tensor, logits: torch.Tensor, fc1_weight: torch.Tensor,
            fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, k: int,
            normalize: bool, activation: str) -> torch.Tensor:  # fmt: skip
    """x: N x C, logits: N x E -> N x C; exported as ``com.microsoft.MoE``."""
    return _torch_ort_moe(x, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, k, normalize,
                          activation)  # fmt: skip


@ort_moe.register_fake
def _(x, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, k, normalize, activation):
    return torch.empty_like(x)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 E x N x K with zero point 128 and E x N scales -> fp32 E x N x K."""
    return (q.float() - 128.0) * scale.unsqueeze(-1)


@torch.library.custom_op("fairseq_moe_onnx::ort_qmoe", mutates_args=())
def ort_qmoe(x: torch.Tensor, logits: torch.Tensor, fc1_q: torch.Tensor, fc1_scale: torch.Tensor,
             fc1_bias: torch.Tensor, fc2_q: torch.Tensor, fc2_scale: torch.Tensor,
             fc2_bias: torch.Tensor, k: int, normalize: bool,
             activation: str) -> torch.Tensor:  # fmt: skip
    """``com.microsoft.QMoE`` with 8-bit column-wise weights (uint8, zero point 128)."""
    return _torch_ort_moe(x, logits, dequantize_int8(fc1_q, fc1_scale), fc1_bias,
                          dequantize_int8(fc2_q, fc2_scale), fc2_bias, k, normalize,
                          activation)  # fmt: skip


@ort_qmoe.register_fake
def _(x, logits, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_bias, k, normalize, activation):
    return torch.empty_like(x)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per expert and output channel: E x N x K fp32 -> (uint8 E x N x K with
    zero point 128, fp32 E x N scales)."""
    scale = weight.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # E x N
    q = torch.round(weight / scale.unsqueeze(-1)).clamp(-127, 127) + 128.0
    return q.to(torch.uint8), scale.float()


def ort_translation_table() -> dict:
    """The torch exporter's ``custom_translation_table``: our custom ops -> contrib op nodes."""
    import onnxscript

    register_ort_schemas()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def moe(x, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, k, normalize, activation):
        return msft.MoE(x, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, k=k,
                        normalize_routing_weights=int(normalize), activation_type=activation)  # fmt: skip

    def qmoe(x, logits, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_bias, k, normalize,
             activation):  # fmt: skip
        return msft.QMoE(x, logits, fc1_q, fc1_scale, fc1_bias, fc2_q, fc2_scale, fc2_bias, k=k,
                         normalize_routing_weights=int(normalize), activation_type=activation,
                         expert_weight_bits=8, weights_prepacked=0)  # fmt: skip

    return {torch.ops.fairseq_moe_onnx.ort_moe.default: moe,
            torch.ops.fairseq_moe_onnx.ort_qmoe.default: qmoe}  # fmt: skip


class ExportMoE(nn.Module):
    """One ``MoELayer`` in eval, export-friendly: x N x C (every token, padding included) ->
    N x C, zero at padding as the layer's output is. The router is the gate's own ``wg``; the
    expert weights are re-laid (``plain``), used as they are (``fused``) or quantised
    (``qmoe``) once here, never per call. Shared experts (``moe.shared``, their own linear
    layers) are added to the routed output; the bias-balancing bias picks the experts
    (``plain``)."""

    def __init__(self, moe: MoELayer, name: str, moe_op: str = "plain"):
        super().__init__()
        check_exportable_moe(moe, name, moe_op)
        gate, experts = moe.gate, moe.experts
        self.moe_op, self.name = moe_op, name
        self.wg = gate.wg
        self.temperature = float(gate.temperature)
        self.dense = bool(gate.routes_densely)
        self.k = gate.num_experts if self.dense else int(gate.k)
        self.normalize = bool(gate.normalize_top_k) and not self.dense
        self.activation = experts.activation_name
        self.shared = moe.shared  # or None
        self.select_bias = getattr(gate, "balance_bias", None)  # E, or None
        self.fallback_expert = int(getattr(gate, "fallback_expert", -1))
        if self.fallback_expert >= 0:  # the gate's fallback_nonfinite: a one-hot row of logits
            row = torch.full((1, gate.num_experts), FALLBACK_OTHER_LOGIT)
            row[0, self.fallback_expert] = 0.0
            self.register_buffer("fallback_logits", row, persistent=False)
        with torch.no_grad():
            w1, b1, w2, b2 = experts.onnx_weights()  # fp32 E x F x C, E x F, E x C x F, E x C
            num_experts, d_ff, d_model = w1.shape
            if moe_op == "plain":
                buffers = {"w1cat": w1.reshape(num_experts * d_ff, d_model).t().contiguous(),
                           "b1cat": b1.reshape(-1).clone(),
                           "w2cat": w2.transpose(1, 2).reshape(num_experts * d_ff, d_model)
                           .contiguous(), "b2": b2.clone()}  # fmt: skip
            elif moe_op == "fused":
                buffers = {"fc1_weight": w1, "fc1_bias": b1, "fc2_weight": w2, "fc2_bias": b2}
            else:
                (q1, s1), (q2, s2) = quantize_int8(w1), quantize_int8(w2)
                buffers = {"fc1_q": q1, "fc1_scale": s1, "fc1_bias": b1,
                           "fc2_q": q2, "fc2_scale": s2, "fc2_bias": b2}  # fmt: skip
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C -> N x E fp32 logits as the gate computes them (temperature, fallback)."""
        bias = None if self.wg.bias is None else self.wg.bias.float()
        logits = F.linear(x.float(), self.wg.weight.float(), bias)  # N x E
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.fallback_expert >= 0:
            finite = torch.isfinite(logits).all(dim=-1, keepdim=True)  # N x 1
            logits = torch.where(finite, logits, self.fallback_logits)
        return logits

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x: N x C; real: N x 1 bool, False at padding. Returns N x C."""
        logits = self.router_logits(x)  # N x E
        x = x.float()
        if self.moe_op == "plain":
            select_bias = None if self.select_bias is None else self.select_bias.float()
            weight = combine_weights(logits, self.k, self.normalize, self.dense, select_bias)
            y = dense_experts_ffn(x, weight, self.w1cat, self.b1cat, self.w2cat, self.b2,
                                  self.activation)  # fmt: skip
        elif self.moe_op == "fused":
            y = torch.ops.fairseq_moe_onnx.ort_moe(
                x, logits, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
                self.k, self.normalize, ORT_ACTIVATIONS[self.activation])  # fmt: skip
        else:
            y = torch.ops.fairseq_moe_onnx.ort_qmoe(
                x, logits, self.fc1_q, self.fc1_scale, self.fc1_bias, self.fc2_q,
                self.fc2_scale, self.fc2_bias, self.k, self.normalize,
                ORT_ACTIVATIONS[self.activation])  # fmt: skip
        if self.shared is not None:
            y = y + self.shared_experts(x)
        return torch.where(real, y, torch.zeros_like(y))  # N x C

    def shared_experts(self, x: torch.Tensor) -> torch.Tensor:
        """``SharedExperts.forward`` in eval with plain ops: x N x C fp32 -> N x C."""
        shared = self.shared
        activation = get_activation_fn(shared.activation_name)
        h = activation(F.linear(x, shared.fc1.weight.float(), shared.fc1.bias.float()))
        y = F.linear(h, shared.fc2.weight.float(), shared.fc2.bias.float())  # N x C
        if shared.gate is not None:
            y = torch.sigmoid(F.linear(x, shared.gate.weight.float())) * y  # N x 1 gate
        return y
