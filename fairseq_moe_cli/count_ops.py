"""``fairseq-moe-count-ops``: the ATen ops one MoE layer launches, beside the references.

A hardware-independent measure of per-op overhead: on a GPU each op is at least one kernel
launch, on a CPU one dispatch through torch's operator machinery. For one forward (training and
eval mode) and one forward+backward of the layer, dropless top-k, it counts the ops of

- ``ours/<impl>``: the product ``MoELayer`` (router, dispatch plan, record) with each expert
  path of ``--moe-expert-impl`` (``auto`` picks by device and shape; ``grouped_mm`` is what a
  GPU runs in bf16, counted here on CPU);
- ``grouped_mm``: the sort-based reference with ``torch.nn.functional.grouped_mm``
  (``moe_layer_references.GroupedMMMoE``: same router and weights);
- ``dense``: the FLOP-matched dense FFN (``k * d_ff`` wide).

Counting. torch's profiler records every ATen call; a call made from inside another ATen call
(``aten::linear`` calling ``aten::addmm``) is part of that one, so only the outermost ones count,
found by walking each event's parents. Autograd's backward ops run under the engine's own
events and count the same way. What the profiler adds over counting by hand: it sees the ops
that Python code launches indirectly (autograd functions, ``index_add_`` inside the reference).

    fairseq-moe-count-ops --experts 8 64 --top-k 2 --json ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from fairseq_moe_cli.moe_layer_references import DenseFFN, GroupedMMMoE, grouped_mm_skip_reason
from fairseq_moe_plugin.modules import MoELayer, StackedExperts, TopKGate
from fairseq_moe_plugin.modules.grouped_gemm import IMPLS


def outermost_aten_ops(fn: Callable[[], object]) -> Counter:
    """``{op name: count}`` of the outermost ATen calls ``fn()`` makes (see the module doc)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            ops[event.name] += 1
    return ops


def _counts(
    forward: Callable[[], torch.Tensor], module: torch.nn.Module, trains: bool = True
) -> dict[str, int | None]:
    """Ops of one training forward, one training forward+backward and one eval forward (the
    first two None for an inference-only path, ``trains=False``)."""
    counts: dict[str, int | None] = {"forward": None, "forward_backward": None}
    if trains:
        module.train()
        forward().sum().backward()  # warm-up: lazy allocations and first-call paths
        counts["forward"] = sum(outermost_aten_ops(forward).values())
        step = outermost_aten_ops(lambda: forward().sum().backward())
        counts["forward_backward"] = sum(step.values())
    module.eval()
    with torch.no_grad():
        forward()
        counts["eval_forward"] = sum(outermost_aten_ops(forward).values())
    module.train()
    return counts


def count_layer_ops(
    num_experts: int, k: int, tokens: int, d_model: int, d_ff: int, seed: int = 0
) -> dict[str, dict[str, int] | str]:
    """The three implementations' counts for one setting (``grouped_mm``: the reason instead
    when this torch cannot run it)."""
    result: dict[str, dict[str, int] | str] = {}
    x = torch.randn(tokens, d_model, requires_grad=True)  # N x C
    skip = grouped_mm_skip_reason(d_model, d_ff, x.dtype)
    for impl in IMPLS:
        torch.manual_seed(seed)
        gate = TopKGate(d_model, num_experts, k=k, capacity_factor=0.0)  # dropless
        layer = MoELayer(gate, StackedExperts(num_experts, d_model, d_ff, impl=impl))
        if impl == "grouped_mm" and skip is not None:
            result[f"ours/{impl}"] = skip
        else:
            trains = impl != "padded"  # the padded path is for inference only
            result[f"ours/{impl}"] = _counts(lambda layer=layer: layer(x)[0], layer, trains)
    dense = DenseFFN(d_model, k * d_ff)
    result["dense"] = _counts(lambda: dense(x), dense)
    if skip is None:
        reference = GroupedMMMoE(layer)
        result["grouped_mm"] = _counts(lambda: reference(x), layer)
    else:
        result["grouped_mm"] = skip
    return result


COLUMNS = ("forward", "forward_backward", "eval_forward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="E values")
    p.add_argument("--top-k", type=int, default=2, help="k (dropless)")
    p.add_argument("--tokens", type=int, default=512, help="N tokens per forward")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024, help="each expert's hidden size")
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args(argv)
    for name in ("top_k", "tokens", "d_model", "d_ff"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [e for e in args.experts if not 1 <= args.top_k <= e]
    if bad:
        p.error(f"--top-k {args.top_k} must be between 1 and every --experts value, not {bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    print("| E | implementation | forward | forward+backward | eval forward |")
    print("| --- | --- | --- | --- | --- |")
    for num_experts in args.experts:
        counts = count_layer_ops(num_experts, args.top_k, args.tokens, args.d_model, args.d_ff)
        for impl, c in counts.items():
            rows.append(
                {
                    "experts": num_experts,
                    "impl": impl,
                    **({"skipped": c} if isinstance(c, str) else c),
                }
            )
            if isinstance(c, str):
                print(f"| {num_experts} | {impl} | skipped: {c} | | |")
            else:
                cells = ["-" if c[key] is None else str(c[key]) for key in COLUMNS]
                print(f"| {num_experts} | {impl} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
