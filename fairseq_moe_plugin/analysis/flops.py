"""Parameters (total and active per token) and forward FLOPs per token of a (MoE) transformer
(``fairseq-moe-flops`` is its command line).

FLOPs are those of a teacher-forced forward on real batches (encoder, decoder and output
projection; eval mode, so dropout is off and MoE routing is dropless by default), counted two
ways:

- **fvcore**: ``fvcore.nn.FlopCountAnalysis`` traces the model with ``torch.jit`` and counts
  matrix products (``aten::linear``, ``matmul``, ``mm``, ``addmm``, ``bmm``, ``einsum``, plus
  handles added here for ``scaled_dot_product_attention`` and ``baddbmm``). Its norm handles are
  switched off, so layer norms, softmax, activations, residual adds, gate combine and index ops
  are not counted. Tracing records the concrete shapes of this batch, so in MoE layers only the
  experts that received tokens, on exactly their tokens, are counted (the active experts).
- **analytic**: the same matrix products from the layer sizes: per layer q/k/v/out projections
  (4·d² per position, cross-attention keys/values on source positions), attention scores and
  weighted sum (2·d per query-key pair), dense FFN 2·d·d_ff per position, MoE FFN
  k·2·d·d_ff_expert + d·E (router) per non-padding token (expert choice: E·C assignments in a
  layer of N tokens, C = ceil(c·N/E) capped at N, instead of k·N), shared experts
  2·d·(N_s·d_ff_expert) (+ d for their gate) per non-padding token, the CMR dense FFN 2·d·d_ff and
  gate d per position, output projection d·V per target position. ``analytic`` follows what
  the model computes on the padded batch (fairseq computes attention and dense layers on padding
  positions; MoE layers drop padding before routing) and should equal fvcore;
  ``analytic_padding_free`` counts each sentence at its own length (the cost without padding).

Convention: 1 MAC = one multiply-add (fvcore's "flop"); FLOPs = 2 x MACs. Per-token figures
divide by the batch's non-padding target tokens (EOS included), also given per non-padding
source token and per sentence.

Active parameters per token: total - sum over MoE layers of (E - k) x params_per_expert (router
counted fully; embeddings counted fully; k = E under dense routing, k = the expert capacity
factor c (at most E) under expert choice, the mean number of experts per token; LoRA experts'
shared FFN is active for every token, their per-expert parameters are the deltas; shared
experts, their gate, the CMR dense FFN and gate are active for every token).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
import torch.nn as nn

from ..modules.moe_layer import MoELayer
from ..modules.routing.expert_choice import expert_choice_capacity

CONVENTION = "1 MAC = one multiply-add (fvcore counts a MAC as one flop); FLOPs = 2 x MACs"
DENOMINATORS = {
    "per_target_token": "non-padding target tokens (EOS included): sample['ntokens']",
    "per_source_token": "non-padding source tokens (EOS included)",
    "per_sentence": "sentences in the batch(es)",
}


def parameter_counts(model: nn.Module) -> dict:
    """Total parameters and parameters active per token (k of E experts in each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    layers, inactive = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        num_experts, k = module.num_experts, _active_experts(module)
        per_expert = sum(p[0].numel() for p in module.experts.stacked_parameters())  # along E
        inactive += (num_experts - k) * per_expert
        shared = module.shared
        layers.append(
            {
                "layer": name,
                "num_experts": num_experts,
                "top_k": k,
                "params_per_expert": per_expert,
                "router_params": sum(p.numel() for p in module.gate.parameters()),
                "shared_params": 0
                if shared is None
                else sum(p.numel() for p in shared.parameters()),
            }
        )
    return {"total": total, "active_per_token": total - inactive, "moe_layers": layers}


def _active_experts(layer: MoELayer) -> float:
    """Experts a token goes through (``TopKGate.experts_per_token``): k, all E under dense
    routing, or on average the expert capacity factor c (at most E) under expert choice; a
    whole number (an int in the report) but under expert choice."""
    k = layer.gate.experts_per_token()
    return k if layer.gate.expert_choice_factor is not None else int(k)


@dataclass
class LayerSpec:
    """The matrix-product sizes of one transformer layer."""

    d_model: int
    self_attn: tuple[int, int, int]  # (embed_dim, kdim, vdim)
    cross_attn: tuple[int, int, int] | None  # decoder only
    ffn_dim: int | None = None  # dense FFN
    num_experts: int | None = None  # MoE FFN
    top_k: float | None = None  # experts per token (E under dense routing, c under expert choice)
    expert_macs: Callable[[int, float], float] | None = None  # the experts' hook: (N, M) -> MACs
    parallel_ffn_dim: int | None = None  # placement parallel or --moe-cmr: the dense FFN too
    expert_choice_factor: float | None = None  # expert choice: E x ceil(c N / E) assignments
    shared_ffn_dim: int | None = None  # shared experts: one FFN of width N_s x d_ff_expert
    shared_gate: bool = False  # the shared experts' sigmoid gate, d -> 1
    cmr_gate: bool = False  # --moe-cmr: the CMR gate d -> 1 on every position


@dataclass
class ModelSpec:
    """Layer sizes of an encoder-decoder transformer, read from a built model."""

    encoder: list[LayerSpec]
    decoder: list[LayerSpec]
    decoder_projections: list[tuple[int, int]]  # (in, out) linears on every target position
    output_dim: int
    vocab_size: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        def attn(mha) -> tuple[int, int, int]:
            return (mha.embed_dim, mha.kdim, mha.vdim)

        def layer(lyr, cross: bool) -> LayerSpec:
            spec = LayerSpec(
                lyr.embed_dim, attn(lyr.self_attn), attn(lyr.encoder_attn) if cross else None
            )
            if isinstance(getattr(lyr, "moe", None), MoELayer):
                spec.num_experts, spec.top_k = lyr.moe.num_experts, _active_experts(lyr.moe)
                spec.expert_macs = lyr.moe.experts.expert_macs
                spec.expert_choice_factor = lyr.moe.gate.expert_choice_factor
                if lyr.moe.shared is not None:
                    spec.shared_ffn_dim = lyr.moe.shared.fc1.out_features
                    spec.shared_gate = lyr.moe.shared.gated
                if getattr(lyr, "parallel_ffn", False) or getattr(lyr, "cmr", False):
                    spec.parallel_ffn_dim = lyr.fc1.out_features
                spec.cmr_gate = bool(getattr(lyr, "cmr", False))
            else:
                spec.ffn_dim = lyr.fc1.out_features
            return spec

        decoder = model.decoder
        if getattr(decoder, "adaptive_softmax", None) is not None:
            raise ValueError("flops: models with an adaptive softmax are not supported")
        projections = [
            (p.in_features, p.out_features)
            for p in (decoder.project_in_dim, decoder.project_out_dim)
            if p is not None
        ]
        out = decoder.output_projection
        return cls(
            [layer(lyr, False) for lyr in model.encoder.layers],
            [layer(lyr, getattr(lyr, "encoder_attn", None) is not None) for lyr in decoder.layers],
            projections,
            out.in_features,
            out.out_features,
        )


@dataclass
class BatchShape:
    """Lengths of one collated batch: per-sentence non-padding lengths and padded widths."""

    src_lens: list[int]
    tgt_lens: list[int]  # of prev_output_tokens (= target lengths)
    src_width: int
    tgt_width: int

    @classmethod
    def from_sample(cls, sample: dict, pad: int) -> BatchShape:
        src = sample["net_input"]["src_tokens"]  # B x S
        prev = sample["net_input"]["prev_output_tokens"]  # B x T
        return cls(
            src.ne(pad).sum(1).tolist(), prev.ne(pad).sum(1).tolist(), src.shape[1], prev.shape[1]
        )


def _attention_macs(dims: tuple[int, int, int], n_q: int, n_kv: int, pairs: int) -> tuple:
    """(projection MACs, score + weighted-sum MACs) of one multi-head attention."""
    embed, kdim, vdim = dims
    projections = n_q * embed * embed * 2 + n_kv * (kdim + vdim) * embed  # q, out; k, v
    return projections, 2 * pairs * embed


def _ffn_macs(spec: LayerSpec, positions: int, tokens: int) -> dict[str, int]:
    """Dense FFN on every position; MoE router and k experts on every non-padding token (the
    experts' ``expert_macs``; LoRA experts: the shared FFN once per token, ``2 r (d + d_ff)`` per
    assignment for the deltas; expert choice: ``E x ceil(c N / E)`` assignments, at most N per expert); shared experts (and
    their gate) on every non-padding token; with the parallel placement or CMR, the dense FFN on
    every position too, and the CMR gate."""
    d = spec.d_model
    if spec.num_experts is None:
        return {"ffn": 2 * positions * d * spec.ffn_dim}
    macs = {"moe_router": tokens * d * spec.num_experts}
    assignments = tokens * spec.top_k
    if spec.expert_choice_factor is not None:
        capacity = expert_choice_capacity(tokens, spec.num_experts, spec.expert_choice_factor)
        assignments = spec.num_experts * capacity
    macs["moe_experts"] = spec.expert_macs(tokens, assignments)
    if spec.shared_ffn_dim is not None:
        macs["moe_shared"] = tokens * (2 * d * spec.shared_ffn_dim + (d if spec.shared_gate else 0))
    if spec.parallel_ffn_dim is not None:
        macs["ffn"] = 2 * positions * d * spec.parallel_ffn_dim
    if spec.cmr_gate:
        macs["cmr_gate"] = positions * d
    return macs


def analytic_macs(spec: ModelSpec, shape: BatchShape, padded: bool = True) -> dict[str, int]:
    """MACs of the model's matrix products on a batch, by component.

    ``padded=True`` counts what the model computes (attention and dense layers on the padded
    B x S / B x T tensors); ``padded=False`` counts every sentence at its own length. MoE layers
    route only non-padding tokens in both; dropless routing (k assignments per token) is
    assumed, which is what evaluation does unless --moe-eval-capacity-factor > 0.
    """
    b = len(shape.src_lens)
    n_src, n_tgt = sum(shape.src_lens), sum(shape.tgt_lens)
    if padded:
        src_pos, tgt_pos = b * shape.src_width, b * shape.tgt_width
        src_pairs, tgt_pairs = b * shape.src_width**2, b * shape.tgt_width**2
        cross_pairs = b * shape.tgt_width * shape.src_width
    else:
        src_pos, tgt_pos = n_src, n_tgt
        src_pairs = sum(s * s for s in shape.src_lens)
        tgt_pairs = sum(t * t for t in shape.tgt_lens)
        cross_pairs = sum(s * t for s, t in zip(shape.src_lens, shape.tgt_lens, strict=True))
    macs: dict[str, int] = {}

    def add(key: str, value: int) -> None:
        macs[key] = macs.get(key, 0) + value

    for layer in spec.encoder:
        proj, scores = _attention_macs(layer.self_attn, src_pos, src_pos, src_pairs)
        add("encoder.self_attention_projections", proj)
        add("encoder.self_attention_scores", scores)
        for key, value in _ffn_macs(layer, src_pos, n_src).items():
            add(f"encoder.{key}", value)
    for layer in spec.decoder:
        proj, scores = _attention_macs(layer.self_attn, tgt_pos, tgt_pos, tgt_pairs)
        add("decoder.self_attention_projections", proj)
        add("decoder.self_attention_scores", scores)  # full T x T: the causal mask saves nothing
        if layer.cross_attn is not None:
            proj, scores = _attention_macs(layer.cross_attn, tgt_pos, src_pos, cross_pairs)
            add("decoder.cross_attention_projections", proj)
            add("decoder.cross_attention_scores", scores)
        for key, value in _ffn_macs(layer, tgt_pos, n_tgt).items():
            add(f"decoder.{key}", value)
    for d_in, d_out in spec.decoder_projections:
        add("decoder.dim_projections", tgt_pos * d_in * d_out)
    add("output_projection", tgt_pos * spec.output_dim * spec.vocab_size)
    return macs


def _sdpa_macs(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: Q K^T and P V (query ... x L x E, key ... x S x E)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _baddbmm_macs(inputs, outputs) -> int:
    """aten::baddbmm(bias, a, b): the bmm of a (n x c x t) and b (n x t x d)."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    return a[0] * a[1] * a[2] * b[2]


_NORM_OPS = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm")


def _not_counted(inputs, outputs) -> int:
    """A handle for ops deliberately left out of the count."""
    return 0


# Norms are not counted: a None handle does not override fvcore 0.1.5's default norm handles,
# so they get a zero handle.
_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::baddbmm": _baddbmm_macs,
    **dict.fromkeys(_NORM_OPS, _not_counted),
}
# Ops fvcore saw but did not count that look like matrix products: reported, should be none.
_MATMUL_LIKE = ("mm", "matmul", "einsum", "attention", "conv", "mv", "dot")


class _LogitsOnly(nn.Module):
    """The model's forward returning only the logits (jit tracing needs tensor outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src_tokens, src_lengths, prev_output_tokens):
        return self.model(src_tokens, src_lengths, prev_output_tokens)[0]  # B x T x V


def fvcore_macs(model: nn.Module, sample: dict):
    """Run fvcore on the model's teacher-forced forward (eval mode, no grad) for ``sample``.

    Returns the ``FlopCountAnalysis`` (``.total()`` is in MACs); the model's train/eval mode
    is restored afterwards.
    """
    from fvcore.nn import FlopCountAnalysis

    net_input = sample["net_input"]
    inputs = (net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(_LogitsOnly(model), inputs)
        analysis.set_op_handle(**_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis.total()  # runs the trace
    finally:
        model.train(was_training)
    return analysis


def _normalise(macs: float, counts: dict) -> dict:
    """MACs and FLOPs in total, per target token, per source token and per sentence."""
    out = {"macs": macs, "flops": 2 * macs}
    for key, denominator in (
        ("per_target_token", counts["target_tokens"]),
        ("per_source_token", counts["source_tokens"]),
        ("per_sentence", counts["sentences"]),
    ):
        out[key] = {"macs": macs / denominator, "flops": 2 * macs / denominator}
    return out


def flops_report(model: nn.Module, samples: list[dict]) -> dict:
    """The JSON-ready report (parameters, fvcore and analytic counts) over ``samples``."""
    if not samples:
        raise ValueError("flops: no batches to count (is the subset empty?)")
    spec = ModelSpec.from_model(model)
    pad = model.encoder.padding_idx
    counts = dict.fromkeys(
        ("sentences", "source_tokens", "target_tokens", "source_positions", "target_positions"), 0
    )
    fv_total, fv_ops, padded, free, uncounted = 0, {}, {}, {}, set()
    for sample in samples:
        shape = BatchShape.from_sample(sample, pad)
        b = len(shape.src_lens)
        counts["sentences"] += b
        counts["source_tokens"] += sum(shape.src_lens)
        counts["target_tokens"] += sum(shape.tgt_lens)
        counts["source_positions"] += b * shape.src_width
        counts["target_positions"] += b * shape.tgt_width
        analysis = fvcore_macs(model, sample)
        fv_total += analysis.total()
        uncounted.update(
            op for op in analysis.unsupported_ops() if any(m in op for m in _MATMUL_LIKE)
        )
        for op, value in analysis.by_operator().items():
            if value:
                fv_ops[op] = fv_ops.get(op, 0) + value
        for acc, is_padded in ((padded, True), (free, False)):
            for key, value in analytic_macs(spec, shape, padded=is_padded).items():
                acc[key] = acc.get(key, 0) + value
    analytic_total = sum(padded.values())
    gates = [m.gate for m in model.modules() if isinstance(m, MoELayer)]
    return {
        "convention": CONVENTION,
        "denominators": DENOMINATORS,
        "counts": counts,
        "parameters": parameter_counts(model),
        "fvcore": {
            **_normalise(fv_total, counts),
            "by_operator_macs": fv_ops,
            "uncounted_matmul_like_ops": sorted(uncounted),  # expected empty
        },
        "analytic": {**_normalise(analytic_total, counts), "breakdown_macs": padded},
        "analytic_padding_free": {**_normalise(sum(free.values()), counts), "breakdown_macs": free},
        "fvcore_vs_analytic_rel_diff": (fv_total - analytic_total) / analytic_total,
        # The analytic count assumes k assignments per token; fvcore counts what was computed.
        "eval_routing_is_dropless": all(g.eval_capacity_factor <= 0 for g in gates),
        "counted": "matrix products only (linear, matmul, bmm, attention); layer norms, softmax,"
        " activations, residuals, MoE combine/index ops and embedding lookups are not counted",
    }
