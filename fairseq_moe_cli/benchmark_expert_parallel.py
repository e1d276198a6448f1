"""Expert parallelism, measured and modelled.

    fairseq-moe-benchmark-ep                      # measure at W = 1, 2, 4 here, then the model
    fairseq-moe-benchmark-ep --model-only         # the analytic model for 8-512 GPUs alone

(or ``python scripts/benchmark_expert_parallel.py ...``; a benchmark that prints figures, not a
test.)

**Measured.** For each W in ``--worlds`` it starts W processes (torch.distributed: gloo on CPU,
NCCL with ``--device cuda``), each holding E/W experts of one ``MoELayer`` and routing
``--tokens`` tokens of its own (weak scaling: the tokens per process stay fixed). It times a
forward+backward step (median of ``--repeats`` after ``--warmup``) and, inside it, the
exchanges (the counts and the two variable-size ``all_to_all_single`` calls, timed by wrapping
``torch.distributed.all_to_all_single`` in the benchmark's processes). It reports tokens/s per
process (of the slowest process), the exchanges' share of the step, and the scaling efficiency
(tokens/s per process against W = 1, where nothing is exchanged). With fewer cores than
processes the processes share cores, so CPU figures show the protocol's cost, not how real
hardware scales.

**Modelled.** ``ep_cost_model.py``: per-token communication and compute for 8-512 GPUs, where
communication starts to dominate, and the model next to published figures (fairseq's README.moe
throughput at 32-512 A100s, DeepEP's measured dispatch/combine bandwidth, Tutel's hierarchical
all-to-all speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_moe_cli import ep_cost_model as cost
from fairseq_moe_plugin.modules import MoELayer, StackedExperts, TopKGate
from fairseq_moe_plugin.modules.expert_parallel import expert_parallel_groups


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts W")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per process")
    p.add_argument("--experts", type=int, default=8, help="E (every W must divide it)")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-only", action="store_true", help="skip the measurement")
    model = p.add_argument_group("the analytic model's hardware (per GPU)")
    model.add_argument("--nvlink-gb-s", type=float, default=cost.A100_HDR.nvlink_gb_s)
    model.add_argument("--ib-gb-s", type=float, default=cost.A100_HDR.ib_gb_s)
    model.add_argument("--gpus-per-node", type=int, default=cost.A100_HDR.gpus_per_node)
    model.add_argument("--alpha-us", type=float, default=cost.A100_HDR.alpha_us,
                       help="latency per peer message of an all-to-all (assumed)")  # fmt: skip
    p.add_argument("--json", type=Path, default=Path("results/benchmark_expert_parallel.json"))
    a = p.parse_args(argv)
    bad = [w for w in a.worlds if w < 1 or a.experts % w]
    if bad:
        p.error(f"--worlds {bad}: every W must be >= 1 and divide --experts {a.experts}")
    if not 1 <= a.topk <= a.experts:
        p.error(f"--topk must be between 1 and --experts ({a.experts}), got {a.topk}")
    if a.device == "cuda" and torch.cuda.device_count() < max(a.worlds):
        p.error(f"--device cuda needs {max(a.worlds)} GPUs, found {torch.cuda.device_count()}")
    return a


# -- measured --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_exchanges(seconds: list[float], device: str):
    """``all_to_all_single`` that adds its duration to ``seconds[0]``."""
    exchange = dist.all_to_all_single

    def timed(*args, **kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = exchange(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[0] += time.perf_counter() - start
        return result

    return timed


def _measure_worker(rank: int, world: int, port: int, a: dict, out_dir: str) -> None:
    device = torch.device("cuda", rank) if a["device"] == "cuda" else torch.device("cpu")
    backend = "nccl" if a["device"] == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)  # the same router whatever W; experts are P-independent by design
    gate = TopKGate(a["d_model"], a["experts"], k=a["topk"], capacity_factor=0.0)
    experts = StackedExperts(a["experts"], a["d_model"], a["d_ff"],
                             expert_parallel=expert_parallel_groups(world))  # fmt: skip
    layer = MoELayer(gate, experts).to(device).train()
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(a["tokens"], a["d_model"], generator=generator).to(device).requires_grad_()
    cotangent = torch.randn(a["tokens"], a["d_model"], generator=generator).to(device)
    seconds = [0.0]
    dist.all_to_all_single = _timed_exchanges(seconds, a["device"])

    def step():
        y, _ = layer(x)  # T x C
        y.backward(cotangent)
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    for _ in range(a["warmup"]):
        step()
    steps, exchanges = [], []
    for _ in range(a["repeats"]):
        dist.barrier()
        seconds[0] = 0.0
        start = time.perf_counter()
        step()
        if a["device"] == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
        exchanges.append(seconds[0])
    result = {"step_s": statistics.median(steps), "exchange_s": statistics.median(exchanges)}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no process tears gloo down while a peer still uses it
    dist.destroy_process_group()


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per W: the slowest process's step, tokens/s per process, exchange share."""
    rows = []
    for world in a.worlds:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(_measure_worker, args=(world, _free_port(), vars(a), out_dir), nprocs=world)
            ranks = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world)]
        step = max(r["step_s"] for r in ranks)
        rows.append({
            "world": world, "experts_per_process": a.experts // world, "step_ms": 1e3 * step,
            "tokens_per_s_per_process": a.tokens / step,
            "exchange_share": statistics.fmean(r["exchange_s"] / r["step_s"] for r in ranks),
        })  # fmt: skip
    base = next((r for r in rows if r["world"] == 1), None)
    for r in rows:
        if base is not None:
            r["scaling_efficiency"] = (
                r["tokens_per_s_per_process"] / base["tokens_per_s_per_process"]
            )
    return rows


# -- modelled ----------------------------------------------------------------------------------------


def model_report(a: argparse.Namespace) -> dict:
    """The model's tables: calibrated on fairseq's 32-GPU figure, its other figures, scaling
    from 8 to 512 GPUs, the expert width where communication dominates, DeepEP and Tutel."""
    hw = cost.Hardware("given", a.nvlink_gb_s, a.ib_gb_s, a.gpus_per_node, 100.0, a.alpha_us)
    lm = cost.FAIRSEQ_README_MOE
    hw = cost.calibrate_tflops(lm, hw, 32, cost.FAIRSEQ_README_MOE_WPS[32])

    def at(gpus):  # 512 GPUs ran 12 samples x 1 instead of 6 x 2
        return replace(lm, micro_batches=1) if gpus == 512 else lm

    fairseq = [{"gpus": g, "published_wps": wps, "model_wps": cost.words_per_second(at(g), hw, g)}
               for g, wps in cost.FAIRSEQ_README_MOE_WPS.items()]  # fmt: skip
    scaling = []
    for gpus in (8, 16, 32, 64, 128, 256, 512):
        t = cost.step_time_per_token(at(gpus), hw, gpus)
        scaling.append({"gpus": gpus, "comm_share": t["comm"] / t["total"],
                        "wps_per_gpu": 1 / t["total"]})  # fmt: skip
    deepep = {name: {"dispatch_fraction": d / peak, "combine_fraction": c / peak}
              for name, (d, c, peak) in cost.DEEPEP_MEASURED_GB_S.items()}  # fmt: skip
    tutel = {f"{mib} MiB per GPU": cost.hierarchical_speedup(mib * 2**20, hw, 2048)
             for mib in (0.25, 1, 16, 256)}  # fmt: skip
    return {
        "hardware": vars(hw), "calibrated_tflops": hw.achieved_tflops, "fairseq_readme_moe": fairseq,
        "scaling": scaling,
        "crossover_d_ff": {"InfiniBand": cost.crossover_ffn_dim(hw, 2),
                           "NVLink": cost.crossover_ffn_dim(hw, 2, over_ib=False)},
        "deepep_effective_fraction": deepep, "tutel_2dh_speedup_2048_gpus": tutel,
        "tutel_published_2dh_speedup": cost.TUTEL_2DH_SPEEDUP_2048,
    }  # fmt: skip


def print_report(measured: list[dict], model: dict) -> None:
    if measured:
        print("\n| W | experts / process | step ms | tokens/s per process | exchange share | "
              "scaling efficiency |\n|---|---|---|---|---|---|")  # fmt: skip
        for r in measured:
            eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
            print(f"| {r['world']} | {r['experts_per_process']} | {r['step_ms']:.1f} | "
                  f"{r['tokens_per_s_per_process']:,.0f} | {100 * r['exchange_share']:.1f}% | {eff} |")  # fmt: skip
    print(f"\nModel calibrated on fairseq README.moe at 32 GPUs: {model['calibrated_tflops']:.0f} "
          "achieved TFLOP/s per GPU\n\n| GPUs | published wps | model wps | model / published |\n"
          "|---|---|---|---|")  # fmt: skip
    for r in model["fairseq_readme_moe"]:
        print(f"| {r['gpus']} | {r['published_wps']:,} | {r['model_wps']:,.0f} | "
              f"{r['model_wps'] / r['published_wps']:.2f} |")  # fmt: skip
    print("\n| GPUs | communication share | tokens/s per GPU |\n|---|---|---|")
    for r in model["scaling"]:
        print(f"| {r['gpus']} | {100 * r['comm_share']:.1f}% | {r['wps_per_gpu']:,.0f} |")
    cross = model["crossover_d_ff"]
    print(f"\nCommunication outlasts an expert's compute when d_ff < {cross['InfiniBand']:,.0f} "
          f"over InfiniBand, < {cross['NVLink']:,.0f} over NVLink (bf16 tokens).")  # fmt: skip
    print("\nDeepEP measured bandwidth / link maximum (the model's links run at this share):")
    for name, f in model["deepep_effective_fraction"].items():
        print(
            f"  {name}: dispatch {f['dispatch_fraction']:.2f}, combine {f['combine_fraction']:.2f}"
        )
    print(f"\nTwo-level all-to-all speed-up over flat at 2,048 GPUs (Tutel measured up to "
          f"{model['tutel_published_2dh_speedup']}x):")  # fmt: skip
    for size, speedup in model["tutel_2dh_speedup_2048_gpus"].items():
        print(f"  {size}: {speedup:.1f}x")


def main(argv=None) -> int:
    a = parse_args(argv)
    measured = [] if a.model_only else measure(a)
    model = model_report(a)
    print_report(measured, model)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "cores": os.cpu_count(), "torch": torch.__version__, "measured": measured,
              "model": model}  # fmt: skip
    a.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
