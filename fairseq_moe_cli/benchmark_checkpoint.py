"""What a checkpoint save costs: rank 0's extra memory and the save time, consolidated against
sharded (``--moe-checkpoint-format``).

    fairseq-moe-benchmark-checkpoint [--worlds 2 4] [--experts 32] [--expert-ffn-dim 2048]

(or ``python scripts/benchmark_checkpoint.py ...``; a benchmark that prints figures, not a
test.)

For each W in ``--worlds`` and each format it starts W processes (gloo, CPU), builds fairseq's
``Trainer`` with a ``moe_transformer`` whose experts dominate its size (sharded over the W
processes, ``--moe-expert-parallel-size W``), runs one Adam update (so that the optimizer holds
its two moments for every parameter), and then saves as fairseq's ``checkpoint_utils.
save_checkpoint`` does: rank 0 calls ``Trainer.save_checkpoint``, every other rank
``Trainer.state_dict`` (the collective part). Each process measures its resident memory just
before the save and its peak during it (Linux: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``) and the save's wall time. Printed per W and format: the model and
optimizer bytes of the whole model and of one process's share, rank 0's extra peak memory during
the save, the slowest process's save time, and the bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_moe_cli.benchmark_serve import free_port, proc_status_mib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="process counts W")
    p.add_argument("--experts", type=int, default=32, help="E (every W must divide it)")
    p.add_argument("--expert-ffn-dim", type=int, default=2048)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers, all MoE")
    p.add_argument("--formats", nargs="+", default=["consolidated", "sharded"])
    p.add_argument("--json", type=Path, default=Path("results/benchmark_checkpoint.json"))
    return p.parse_args(argv)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _dictionary_dir(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    words = "".join(f"w{i} 1\n" for i in range(60))
    for lang in ("src", "tgt"):
        (data / f"dict.{lang}.txt").write_text(words)
    return data


def _trainer(args, data: Path, save_dir: Path, world: int, rank: int, fmt: str):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    import fairseq_moe_plugin

    d, layers = args.embed_dim, args.layers
    argv = [str(data), "--user-dir", os.path.dirname(fairseq_moe_plugin.__file__),
            "--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
            "--arch", "moe_transformer_tiny", "--encoder-layers", layers,
            "--decoder-layers", layers, "--encoder-embed-dim", d, "--decoder-embed-dim", d,
            "--encoder-moe-freq", 1, "--decoder-moe-freq", 1,
            "--moe-expert-count", args.experts, "--moe-expert-ffn-dim", args.expert_ffn_dim,
            "--moe-expert-parallel-size", world, "--moe-checkpoint-format", fmt,
            "--criterion", "label_smoothed_cross_entropy_moe", "--optimizer", "adam",
            "--lr", 1e-4, "--max-tokens", 1000, "--cpu", "--distributed-backend", "gloo",
            "--ddp-backend", "legacy_ddp", "--save-dir", str(save_dir),
            "--distributed-world-size", world]  # fmt: skip
    parsed = options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
    cfg = convert_namespace_to_omegaconf(parsed)
    cfg.distributed_training.distributed_rank = rank
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task


def _sample(task, rank: int):
    pad, eos = task.source_dictionary.pad(), task.source_dictionary.eos()
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(pad + 2, len(task.source_dictionary), (4, 7), generator=generator)
    tokens[:, -1] = eos
    prev = torch.cat([torch.full((4, 1), eos), tokens[:, :-1]], dim=1)
    return {"id": torch.arange(4), "nsentences": 4, "ntokens": tokens.numel(),
            "net_input": {"src_tokens": tokens, "src_lengths": torch.full((4,), 7),
                          "prev_output_tokens": prev},
            "target": tokens}  # fmt: skip


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _worker(rank, world, port, args, root, fmt, out):
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(root)
    (root / f"ckpt_{fmt}").mkdir(exist_ok=True)  # fairseq's save_checkpoint makes it first
    trainer, task = _trainer(args, root / "data", root / f"ckpt_{fmt}", world, rank, fmt)
    trainer.train_step([_sample(task, rank)])  # Adam's moments now exist
    state = trainer.optimizer.optimizer.state
    sizes = {"expert": 0, "dense": 0}  # a parameter and its Adam moments
    for p in trainer.get_model().parameters():
        kind = "expert" if getattr(p, "expert", False) else "dense"
        sizes[kind] += _bytes([p]) + _bytes(state.get(p, {}).values())
    dist.barrier()
    before, resettable = proc_status_mib(os.getpid(), "VmRSS"), _reset_peak()
    start = time.perf_counter()
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does first
    if trainer.should_save_checkpoint_on_current_rank:  # what checkpoint_utils.save_checkpoint
        trainer.save_checkpoint(
            str(root / f"ckpt_{fmt}" / "checkpoint_last.pt"),  # does
            {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        )
    elif trainer.always_call_state_dict_during_save_checkpoint:
        trainer.state_dict()
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = proc_status_mib(os.getpid(), "VmHWM")
    result = {"rank": rank, "rss_before_mib": before,
              "save_peak_extra_mib": peak - before if resettable else None,
              "seconds": seconds, "expert_mib": sizes["expert"] / 2**20,
              "dense_mib": sizes["dense"] / 2**20}  # fmt: skip
    torch.save(result, Path(out) / f"{fmt}-{rank}.pt")
    dist.barrier()  # no process tears gloo down while a peer still uses it
    dist.destroy_process_group()


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(args) -> list[dict]:
    rows = []
    for world in args.worlds:
        if args.experts % world:
            raise SystemExit(f"--experts {args.experts} must be divisible by every W ({world})")
        for fmt in args.formats:
            with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as out:
                _dictionary_dir(Path(root))
                mp.spawn(_worker, args=(world, free_port(), args, root, fmt, out), nprocs=world)
                ranks = [torch.load(Path(out) / f"{fmt}-{r}.pt") for r in range(world)]
                disk = _disk(Path(root) / f"ckpt_{fmt}")
            whole = sum(r["expert_mib"] for r in ranks) + ranks[0]["dense_mib"]
            rows.append({"world": world, "format": fmt,
                         "model_and_adam_mib": whole,
                         "rank0_share_mib": ranks[0]["expert_mib"] + ranks[0]["dense_mib"],
                         "expert_share_of_model": sum(r["expert_mib"] for r in ranks) / whole,
                         "rank0_rss_before_mib": ranks[0]["rss_before_mib"],
                         "rank0_save_peak_extra_mib": ranks[0]["save_peak_extra_mib"],
                         "other_ranks_save_peak_extra_mib": [r["save_peak_extra_mib"]
                                                             for r in ranks[1:]],
                         "save_seconds": max(r["seconds"] for r in ranks),
                         "disk_mib": disk / 2**20})  # fmt: skip
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    peak = r["rank0_save_peak_extra_mib"]
    return (f"| {r['world']} | {r['format']} | {r['model_and_adam_mib']:.0f} | "
            f"{r['rank0_share_mib']:.0f} | "
            f"{'n/a' if peak is None else f'{peak:.0f}'} | {r['save_seconds']:.2f} | "
            f"{r['disk_mib']:.0f} |")  # fmt: skip


HEADER = ("| W | format | model + Adam state, MiB | rank 0's share, MiB | rank 0's extra peak "
          "RSS while saving, MiB | save s | on disk, MiB |\n|---|---|---|---|---|---|---|")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    print(HEADER, flush=True)
    rows = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
