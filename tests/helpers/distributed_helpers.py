"""Run a function in W processes joined by torch.distributed (gloo, CPU), and collect what each
returns. The function must be importable (a module-level function of a test module)."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_in_processes(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` in ``world_size`` processes; their results, by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size)
        # Results are plain containers of tensors: torch's weights-only loading reads them.
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world_size)]
