"""The allocator set-ups of ``benchmark_moe_layer``'s setting processes (``--malloc``): the
``tuned`` glibc malloc settings, the environment a setting's process gets under each set-up, and
``os.environ`` replaced for the time a process is spawned.
"""

from __future__ import annotations

import contextlib
import os

from .moe_layer_report import MALLOC_MODES

# ``--malloc tuned``: glibc serves every block below 16 GiB from its heap instead of a fresh mmap
# (the default threshold is dynamic, 128 KiB up to 32 MiB), and keeps up to 16 GiB of freed heap
# top instead of returning it to the kernel (default 128 KiB, dynamic). glibc reads both at
# process start; set this way (as tunables) the threshold is not capped at the 32 MiB that
# ``mallopt(M_MMAP_THRESHOLD)`` allows, on glibc 2.36 at least (each process checks:
# ``heap_serves_large_blocks``). ``MALLOC_TOP_PAD_`` is left alone: it only sizes each heap
# extension, which changes nothing that is faulted in.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def malloc_modes(args) -> tuple[str, ...]:
    return MALLOC_MODES if args.malloc == "both" else (args.malloc,)


def malloc_environment(mode: str, environ) -> dict[str, str]:
    """The environment of a setting's process under allocator set-up ``mode``: ``environ``
    without its malloc settings (``MALLOC_*`` variables, ``glibc.malloc.*`` entries of
    ``GLIBC_TUNABLES``), plus ``TUNED_MALLOC`` if ``mode`` is ``tuned``."""
    env = {k: v for k, v in environ.items() if not k.startswith("MALLOC_")}
    if "GLIBC_TUNABLES" in env:
        kept = [
            t
            for t in env.pop("GLIBC_TUNABLES").split(":")
            if t and not t.startswith("glibc.malloc.")
        ]
        if kept:
            env["GLIBC_TUNABLES"] = ":".join(kept)
    if mode == "tuned":
        env.update(TUNED_MALLOC)
    return env


@contextlib.contextmanager
def replaced_environ(env: dict[str, str]):
    """``os.environ`` is ``env`` inside (what a spawned process inherits), as before after."""
    saved = dict(os.environ)
    try:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)
