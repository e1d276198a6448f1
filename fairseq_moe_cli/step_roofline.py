"""A roofline lower bound on the time of one beam-search decoder step of an encoder-decoder
(MoE) transformer, and the two machine figures it needs (``benchmark_generate --bench-baseline``
prints it beside the measured ratio of two models).

For one step decoding ``rows`` hypotheses (b sentences x beam w while none has finished), the
step cannot take less than ``t = max(bytes / bandwidth, flops / peak)``, where:

- **bytes** = what the step must read at least once:
  - every decoder parameter, the output projection included; of the (input) embedding table only
    the ``rows`` rows looked up (a table tied to the output projection is read whole, by it); of
    a learned positional table one row (every hypothesis is at the same position); of each MoE
    layer's stacked experts (``experts.STACKED``, E along dim 0) only the experts that received
    tokens: the mean number of distinct experts hit per forward of that layer, measured
    (``StepShape.experts_hit``; all E when not given); the rest of the layer (router, shared
    experts, an expert kind's non-stacked tensors) whole;
  - the attention caches: per hypothesis and decoder layer, keys and values of the self-attention
    over the mean cache length and of the cross-attention over the source length
    (2 x length x embed_dim elements each; the copies fairseq makes when it appends to or
    reorders the cache are not counted);
  - once per batch, amortised over the batch's decoder steps: the encoder's parameters (it runs
    once per batch, its weights read once for all b sentences; embedding rows: the batch's
    source tokens; MoE layers as above) and the cross-attention key/value projections of the
    decoder (fairseq applies them to the encoder output at the first step only, then caches).
- **flops** = 2 x multiply-adds (1 MAC = one multiply-add, as ``fairseq-moe-flops`` counts):
  per hypothesis row, one MAC per element of every weight matrix (dim >= 2) of the decoder but
  the embedding tables (lookups), the output projection included; MoE layers: the router and
  ``experts.expert_macs(1, k)`` (k = ``gate.experts_per_token()``); attention: ``2 x length x
  embed_dim`` MACs per layer for scores and weighted sum, self-attention over the mean cache
  length, cross-attention over the source length. Once per batch, amortised: the encoder on its
  ``b x src_len`` tokens (same rules, self-attention over ``src_len``) and the cross-attention
  key/value projections on ``b x w x src_len`` positions. Biases, norms, softmax and
  activations are not counted.

Only parameters are counted, not buffers (int8 experts are the exception: their stacked tensors
are counted as listed in ``experts.STACKED``). Element sizes are the tensors' own (fp16/bf16
models read half the bytes). The bound is per step: a model whose hypotheses are longer takes
more steps, which the tokens/s ratio shows and the per-step bound does not.

Machine figures (``measure_bandwidth``, ``measure_peak``): the bandwidth is the bytes read plus
written by a large tensor copy (``dst.copy_(src)``, 256 MiB, best of 5: 2 x 256 MiB / time);
the peak is a large matrix product (2048 x 2048 @ 2048 x 2048, best of 5, 2 n^3 flops / time),
in the dtype the models run in (fp32 by default) and on the current torch threads. Both are
what this process attains, not the vendor's figures.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import chain

import torch
import torch.nn as nn

from fairseq_moe_plugin.modules import MoELayer


@dataclass
class StepShape:
    """What one decoder step (and the batch around it) processes; lengths in tokens (EOS
    included), means over the benchmark's batches."""

    rows: float  # hypotheses decoded per step (b x w while none has finished)
    cache_len: float  # self-attention keys per hypothesis (mean output length / 2)
    src_len: float  # source tokens per sentence
    sentences: float = 1.0  # b: sentences per batch (the encoder runs on b x src_len tokens)
    beam: int = 1  # w: cross-attention keys/values are projected for b x w hypotheses
    steps: float = 1.0  # decoder steps per batch: the once-per-batch costs are divided by it
    # MoELayer name (as in model.named_modules()) -> mean distinct experts hit per forward
    experts_hit: dict[str, float] = field(default_factory=dict)

    @property
    def cross_positions(self) -> float:
        """Encoder positions the cross-attention keys/values are projected on at the first
        step: every source position of each of the b x w hypotheses."""
        return self.sentences * self.beam * self.src_len


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def stack_reads(
    stack: nn.Module,
    prefix: str,
    lookups: float,
    positions: float,
    experts_hit: dict[str, float],
    skip: tuple[torch.Tensor, ...] = (),
) -> tuple[float, float]:
    """(bytes read, MACs per row) of one forward of ``stack``'s parameters on rows that look up
    ``lookups`` embedding rows and ``positions`` positional rows (module docstring), without the
    tensors of ``skip``. ``prefix`` is the stack's name in the model (``experts_hit`` keys)."""
    seen = {id(t) for t in skip}
    nbytes, macs = 0.0, 0.0
    for name, module in stack.named_modules(prefix=prefix):
        if not isinstance(module, MoELayer):
            continue
        experts = module.experts
        local = experts.num_local_experts
        hit = min(float(experts_hit.get(name, local)), local)
        macs += experts.expert_macs(1, module.gate.experts_per_token())
        for tensor_name in experts.STACKED:
            t = getattr(experts, tensor_name, None)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                nbytes += _nbytes(t) * hit / t.shape[0]
        for t in chain(experts.parameters(), experts.buffers()):  # the non-stacked part
            if id(t) not in seen:
                seen.add(id(t))
                nbytes += _nbytes(t)
    embeddings = []
    for name, module in stack.named_modules(prefix=prefix):
        if isinstance(module, nn.Embedding):
            embeddings.append((name, module))
            continue
        for t in module.parameters(recurse=False):
            if id(t) not in seen:
                seen.add(id(t))
                nbytes += _nbytes(t)
                macs += t.numel() if t.dim() >= 2 else 0
    for name, module in embeddings:
        t = module.weight
        if id(t) in seen:  # tied to a projection, read whole there
            continue
        seen.add(id(t))
        rows = positions if name.endswith("embed_positions") else lookups
        nbytes += min(rows, module.num_embeddings) * module.embedding_dim * t.element_size()
    return nbytes, macs


def _cross_kv(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's cross-attention key and value projections (run once per batch)."""
    found = []
    for layer in decoder.layers:
        attn = getattr(layer, "encoder_attn", None)
        if attn is not None:
            found += [attn.k_proj, attn.v_proj]
    return found


def step_cost(model: nn.Module, shape: StepShape) -> dict:
    """Bytes and flops of one decoder step of ``model`` (``.encoder``, ``.decoder``), with
    their parts (module docstring); the ``*_per_batch`` parts are included in the totals
    divided by ``shape.steps``."""
    decoder, encoder = model.decoder, model.encoder
    itemsize = next(decoder.parameters()).element_size()
    cross = _cross_kv(decoder)
    cross_tensors = tuple(t for m in cross for t in m.parameters())
    dec_bytes, dec_macs = stack_reads(
        decoder, "decoder", shape.rows, 1, shape.experts_hit, skip=cross_tensors
    )
    attn_macs, cache_elems = 0.0, 0.0
    for layer in decoder.layers:
        d = layer.self_attn.embed_dim
        lengths = shape.cache_len + (shape.src_len if layer.encoder_attn is not None else 0)
        attn_macs += 2 * lengths * d
        cache_elems += 2 * lengths * d
    src_tokens = shape.sentences * shape.src_len
    enc_bytes, enc_macs = stack_reads(
        encoder, "encoder", src_tokens, shape.src_len, shape.experts_hit
    )
    enc_attn = sum(2 * shape.src_len * lyr.self_attn.embed_dim for lyr in encoder.layers)
    cross_macs = sum(m.weight.numel() for m in cross) * shape.cross_positions
    batch_bytes = enc_bytes + sum(_nbytes(t) for t in cross_tensors)
    batch_flops = 2 * ((enc_macs + enc_attn) * src_tokens + cross_macs)
    parts_bytes = {
        "decoder_params": dec_bytes,
        "attention_cache": cache_elems * shape.rows * itemsize,
        "per_batch": batch_bytes,
    }
    parts_flops = {
        "decoder": 2 * dec_macs * shape.rows,
        "attention": 2 * attn_macs * shape.rows,
        "per_batch": batch_flops,
    }
    per_step = 1.0 / max(shape.steps, 1.0)
    return {
        "bytes": parts_bytes,
        "flops": parts_flops,
        "bytes_per_step": parts_bytes["decoder_params"]
        + parts_bytes["attention_cache"]
        + batch_bytes * per_step,
        "flops_per_step": parts_flops["decoder"]
        + parts_flops["attention"]
        + batch_flops * per_step,
        "decoder_macs_per_row": dec_macs,
        "shape": asdict(shape),
    }


def limit(cost: dict, bandwidth_gbs: float, peak_gflops: float) -> dict:
    """The roofline step time (ms) of a ``step_cost``: max(memory time, compute time)."""
    memory_ms = 1e3 * cost["bytes_per_step"] / (bandwidth_gbs * 1e9)
    compute_ms = 1e3 * cost["flops_per_step"] / (peak_gflops * 1e9)
    return {
        "memory_ms": memory_ms,
        "compute_ms": compute_ms,
        "limit_ms": max(memory_ms, compute_ms),
        "bound": "memory" if memory_ms >= compute_ms else "compute",
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels, threads)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device="cpu", nbytes=256 * 2**20, repeats=5, dtype=torch.float32) -> float:
    """GB/s (1e9 bytes) of ``dst.copy_(src)`` over ``nbytes``: read + write bytes / best time."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * _nbytes(src) / seconds / 1e9


def measure_peak(device="cpu", n=2048, repeats=5, dtype=torch.float32) -> float:
    """GFLOP/s of an n x n @ n x n matrix product: 2 n^3 / best time."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _best_time(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2 * n**3 / seconds / 1e9


def machine_figures(bandwidth_gbs=None, peak_gflops=None, device="cpu", dtype=torch.float32):
    """The figures given (not None), else measured here (``measure_bandwidth``,
    ``measure_peak`` in ``dtype``), with where each came from."""
    return {
        "bandwidth_gbs": bandwidth_gbs or measure_bandwidth(device),
        "peak_gflops": peak_gflops or measure_peak(device, dtype=dtype),
        "bandwidth_source": "given" if bandwidth_gbs else "measured: 256 MiB copy, best of 5",
        "peak_source": "given" if peak_gflops else f"measured: 2048^3 {dtype} mm, best of 5",
        "device": device,
    }


class StepProbe:
    """While active (``with StepProbe(generator, models) as probe:``): the distinct experts hit
    by every forward of each ``MoELayer`` of ``models`` (forward hooks; the layer returns
    ``(y, record)``, ``record.expert_counts`` is E rows per expert), and the calls of the
    generator's ``model.forward_decoder`` (fairseq's ``EnsembleModel``: one per decoder step)
    with their hypothesis rows. Hooks and counter are removed on exit."""

    def __init__(self, generator, models):
        self.hits = [defaultdict(list) for _ in models]  # per model: layer -> hits per forward
        self.rows: list[int] = []  # per forward_decoder call: hypotheses decoded
        self._generator, self._models, self._handles = generator, models, []
        ensemble = getattr(generator, "model", None)
        self.counts_steps = callable(getattr(ensemble, "forward_decoder", None))

    def __enter__(self) -> StepProbe:
        for hits, model in zip(self.hits, self._models, strict=True):
            for name, module in model.named_modules():
                if isinstance(module, MoELayer):
                    self._handles.append(module.register_forward_hook(self._hook(hits[name])))
        if self.counts_steps:
            inner = self._generator.model.forward_decoder

            def forward_decoder(tokens, *args, **kwargs):
                self.rows.append(int(tokens.shape[0]))
                return inner(tokens, *args, **kwargs)

            self._generator.model.forward_decoder = forward_decoder
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.counts_steps:
            del self._generator.model.forward_decoder  # the class's method again

    @staticmethod
    def _hook(seen: list):
        def hook(module, inputs, output):
            seen.append(int((output[1].expert_counts > 0).sum()))

        return hook

    def experts_hit(self, index: int = 0) -> dict[str, float]:
        """Model ``index``'s mean distinct experts hit per forward, by MoELayer name."""
        return {name: statistics.fmean(v) for name, v in self.hits[index].items() if v}
