"""What the routing metrics cost per update: the per-layer, per-expert counts every ``*_moe``
criterion logs.

    fairseq-moe-benchmark-logging                      # the translation recipe's MoE layers
    fairseq-moe-benchmark-logging --layers 6 --experts 64 --topk 2 --tokens 8192

(or ``python scripts/benchmark_logging.py ...``). It runs ``--layers`` real ``MoELayer`` forwards
(width ``--d-model``, ``--experts`` experts of ``--d-ff``, top ``--topk``) on ``--tokens``
tokens each, in training mode, and times, on their records (median of ``--repeats``):

- **per batch**, what a criterion does beyond the loss: the NaN/inf check of the router logits
  (one host sync), the routing monitor's ``observe``, and ``moe_logging_output`` (the flat
  counts: totals, per-layer stats, one entry per layer and expert), i.e. ``add_moe`` minus the
  aux-loss sum, which training needs anyway;
- **per update**, ``reduce_moe_metrics`` of that logging output inside
  ``fairseq.logging.metrics.aggregate`` (what fairseq's trainer runs after every update);
- **the reference**: forward and backward of the same MoE layers alone (no attention, no
  embeddings), a strict lower bound of an update's time, so the printed share of the metrics is
  an upper bound of their share of a real update.

The records come from ``MoELayer`` itself, so they have the fields and sizes a model's do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from types import SimpleNamespace

import torch

from fairseq_moe_plugin.modules import MoELayer, StackedExperts, TopKGate

from .measure import machine_info, time_runs

DEFAULTS = {"layers": 3, "experts": 8, "topk": 2, "tokens": 4096, "d_model": 256, "d_ff": 1024}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="MoE layers")
    p.add_argument("--experts", type=int, default=DEFAULTS["experts"], help="E per layer")
    p.add_argument("--topk", type=int, default=DEFAULTS["topk"], help="k")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="tokens per layer")
    p.add_argument("--d-model", type=int, default=DEFAULTS["d_model"])
    p.add_argument("--d-ff", type=int, default=DEFAULTS["d_ff"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=50, help="timed runs (median reported)")
    args = p.parse_args(argv)
    for name in ("layers", "experts", "topk", "tokens", "d_model", "d_ff", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    return args


def _median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` timed runs after one warm-up (``measure.time_runs``), in ms."""
    return 1e3 * statistics.median(time_runs(fn, "cpu", 1, repeats, max_seconds=float("inf")))


def measure(args) -> dict:
    """The three times, in ms (see the module doc)."""
    from fairseq.logging import metrics

    from fairseq_moe_plugin.criterions.moe_criterion import MoECriterionConfig, MoECriterionMixin
    from fairseq_moe_plugin.criterions.moe_metrics import moe_logging_output, reduce_moe_metrics

    torch.manual_seed(0)
    layers = [
        MoELayer(
            TopKGate(args.d_model, args.experts, k=args.topk),
            StackedExperts(args.experts, args.d_model, args.d_ff),
            name=f"encoder.layers.{2 * i + 1}",
        ).train()
        for i in range(args.layers)
    ]
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)  # N x C, flattened tokens

    def step():
        outputs = [layer(x) for layer in layers]  # each layer on the same tokens
        sum(y.sum() for y, _ in outputs).backward()
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        return [record for _, record in outputs]

    records = step()
    criterion = MoECriterionMixin()
    criterion.init_moe(MoECriterionConfig())
    model = SimpleNamespace(training=True, num_updates=0)
    aux = sum(r.aux_loss(0.01, 0.001) for r in records).detach()

    def per_batch():
        for r in records:  # what a fresh record would compute on first read
            for name in ("logits_finite", "expert_counts_routed", "dropped", "dropped_tokens",
                         "routed_tokens", "token_entropy", "entropy"):  # fmt: skip
                r.__dict__.pop(name, None)
        criterion._stop_on_nonfinite_logits(records, 0, training=True)
        criterion.moe_monitor.observe(records, training=True, num_updates=model.num_updates)
        return moe_logging_output(records, aux, 4096)

    logs = per_batch()

    def per_update():
        with metrics.aggregate(new_root=True):
            reduce_moe_metrics([logs])

    return {
        "per_batch_ms": _median_ms(per_batch, args.repeats),
        "per_update_ms": _median_ms(per_update, args.repeats),
        "layers_fwd_bwd_ms": _median_ms(step, max(3, args.repeats // 10)),
        "logged_values": len(logs),
    }


def main(argv=None) -> int:
    """CLI entry point; returns 0 (argument errors exit 2, as argparse does)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    result = measure(args)
    metrics_ms = result["per_batch_ms"] + result["per_update_ms"]
    print(
        f"benchmark_logging: {info['cpu']}, torch {info['torch']}, {args.threads} threads; "
        f"{args.layers} MoE layers, E={args.experts}, k={args.topk}, {args.tokens} tokens, "
        f"d={args.d_model}, d_ff={args.d_ff}"
    )
    print(f"  values logged per batch:               {result['logged_values']}")
    print(f"  per batch (NaN check, monitor, counts): {result['per_batch_ms']:8.3f} ms")
    print(f"  per update (reduce_metrics):            {result['per_update_ms']:8.3f} ms")
    print(f"  the MoE layers' fwd+bwd alone:          {result['layers_fwd_bwd_ms']:8.1f} ms")
    print(
        f"  metrics / (layers' fwd+bwd):            {metrics_ms / result['layers_fwd_bwd_ms']:8.2%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
