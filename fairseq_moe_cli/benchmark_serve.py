"""Load test of ``fairseq-moe-serve``: throughput and latency percentiles per checkpoint,
batching on/off and client concurrency.

    fairseq-moe-benchmark-serve --checkpoint fp32=ckpt.pt --checkpoint int8=ckpt.int8.pt \\
        --route classify --texts test.text --spm-model spm.model --out-dir results/serve \\
        [--concurrency 1 8 32] [--requests 200] [--warmup 20] [--batching-wait-ms 5] \\
        [--target-lang de] [--texts-per-request 1] [--threads N] [--server-arg=--beam=4]

(or ``python scripts/benchmark_serve.py ...``; a benchmark, not a timed test). For every
checkpoint and for batching on (``--max-wait-ms`` = ``--batching-wait-ms``) and off (0), it
starts the server in a subprocess on a free port, waits for ``/healthz``, and for every
concurrency C sends ``--warmup`` requests, then ``--requests`` timed requests from C concurrent
clients (httpx.AsyncClient), each with ``--texts-per-request`` lines of ``--texts`` in turn.
Reported per setting: requests/s and sentences/s (timed requests over their wall time), client
latency p50/p95/p99, failed requests, and the mean model batch (texts per batch, from the
server's ``/metrics``); per server: its peak RSS (``VmHWM`` of ``/proc/PID/status``) and the
checkpoint's size. Writes ``OUT/benchmark_serve.json`` and ``OUT/benchmark_serve.md`` (a
markdown table).

The client runs on the same machine as the server and takes CPU from it: give the server
``--threads`` and read the figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROG = "fairseq-moe-benchmark-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint to serve (repeat: e.g. fp32=... int8=...)")  # fmt: skip
    p.add_argument("--route", choices=("translate", "classify"), required=True)
    p.add_argument("--texts", type=Path, required=True, help="test sentences, one per line")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--target-lang", help="translate: the target language of every request")
    p.add_argument("--beam", type=int, help="translate: beam of every request")
    p.add_argument("--data", help="the server's --data")
    p.add_argument("--spm-model", help="the server's --spm-model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=200, help="timed requests per setting")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each setting")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--batching-wait-ms", type=float, default=5.0,
                   help="the server's --max-wait-ms when batching is on")  # fmt: skip
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, help="the server's torch threads")
    p.add_argument("--server-arg", action="append", default=[],
                   help="another flag for every server, e.g. --server-arg=--max-len-b=50")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=600.0)
    return p


def check_args(a) -> list[tuple[str, Path]]:
    """The (name, path) checkpoints; ValueError naming the first bad input."""
    checkpoints = []
    for spec in a.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoint {spec!r}: expected NAME=PATH")
        if not Path(path).is_file():
            raise ValueError(f"--checkpoint {name}: no such file {path}")
        checkpoints.append((name, Path(path)))
    if len({n for n, _ in checkpoints}) != len(checkpoints):
        raise ValueError("--checkpoint names must differ")
    if not a.texts.is_file():
        raise ValueError(f"--texts {a.texts}: no such file")
    for flag in ("requests", "texts_per_request"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.warmup < 0 or any(c < 1 for c in a.concurrency) or a.batching_wait_ms <= 0:
        raise ValueError("--warmup must be >= 0, --concurrency >= 1, --batching-wait-ms > 0")
    return checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mib(pid: int, field: str) -> float | None:
    """``field`` (e.g. VmHWM, the peak resident set) of /proc/PID/status, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


class ServerProcess:
    """``fairseq-moe-serve`` (the command ``cmd``) in a subprocess, logging to ``log``; returns
    once its /healthz answers (RuntimeError with the log's end if it exits or times out). The
    tests' server fixture uses it too."""

    def __init__(self, cmd: list[str], port: int, log: Path, timeout: float, env=None):
        import httpx

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log)
        self.log = open(log, "w")
        start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode} ({log}):\n{self.output(4000)}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > timeout:
                self.stop()
                raise RuntimeError(
                    f"the server did not answer /healthz in {timeout} s ({log}):\n{self.output(4000)}"
                )
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - start

    def output(self, tail: int | None = None) -> str:
        """The server's log so far (its last ``tail`` characters, if given)."""
        if not self.log.closed:
            self.log.flush()
        text = self.log_path.read_text()
        return text if tail is None else text[-tail:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown), kill after ``timeout`` s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def batch_totals(url: str) -> tuple[float, float]:
    """(texts, batches) the server has run so far, from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    texts = batches = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "fairseq_moe_batch_size_texts_sum":
                texts += s.value
            elif s.name == "fairseq_moe_batch_size_texts_count":
                batches += s.value
    return texts, batches


async def drive(url: str, route: str, bodies: list[dict], concurrency: int) -> dict:
    """Send ``bodies`` from ``concurrency`` clients; latencies and failures."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    next_body = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:

        async def worker():
            for body in next_body:  # shared iterator: each body is sent once
                start = time.perf_counter()
                try:
                    response = await client.post(f"/v1/{route}", json=body)
                    ok, why = response.status_code == 200, response.text[:300]
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                latencies.append(time.perf_counter() - start)
                if not ok:
                    failures.append(why)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"latencies": latencies, "failures": failures, "seconds": seconds}


def percentiles_ms(latencies: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(latencies) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}  # fmt: skip


def request_bodies(a, texts: list[str], n: int, offset: int) -> list[dict]:
    k = a.texts_per_request
    bodies = []
    for i in range(offset, offset + n):
        body = {"texts": [texts[(i * k + j) % len(texts)] for j in range(k)]}
        if a.route == "translate":
            body.update({"target_lang": a.target_lang} if a.target_lang else {})
            body.update({"beam": a.beam} if a.beam else {})
        bodies.append(body)
    return bodies


def server_command(a, checkpoint: Path, port: int, wait_ms: float) -> list[str]:
    cmd = [sys.executable, "-m", "fairseq_moe_cli.serve", str(checkpoint), "--port", str(port),
           "--max-wait-ms", f"{wait_ms:g}", "--max-batch-tokens", str(a.max_batch_tokens),
           "--max-texts", str(max(64, a.texts_per_request))]  # fmt: skip
    for flag in ("data", "spm_model", "threads"):
        if getattr(a, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    return cmd + list(a.server_arg)


def run_server(a, name: str, checkpoint: Path, wait_ms: float, texts: list[str]) -> list[dict]:
    """Every concurrency against one server; one result row per concurrency."""
    port = free_port()
    batching = "on" if wait_ms > 0 else "off"
    log = a.out_dir / f"server_{name}_batching_{batching}.log"
    print(f"{PROG}: {name}, batching {batching}: starting the server (log {log})", flush=True)
    server = ServerProcess(server_command(a, checkpoint, port, wait_ms), port, log,
                           a.startup_timeout)  # fmt: skip
    rows, sent = [], 0
    try:
        for concurrency in a.concurrency:
            if a.warmup:
                asyncio.run(drive(server.url, a.route,
                                  request_bodies(a, texts, a.warmup, sent), concurrency))  # fmt: skip
                sent += a.warmup
            texts_before, batches_before = batch_totals(server.url)
            result = asyncio.run(drive(server.url, a.route,
                                       request_bodies(a, texts, a.requests, sent), concurrency))  # fmt: skip
            sent += a.requests
            texts_after, batches_after = batch_totals(server.url)
            batches = batches_after - batches_before
            row = {
                "checkpoint": name, "batching": batching, "max_wait_ms": wait_ms,
                "concurrency": concurrency, "requests": a.requests,
                "sentences": a.requests * a.texts_per_request,
                "failed": len(result["failures"]), "first_failure": (result["failures"] or [None])[0],
                "seconds": result["seconds"],
                "requests_per_s": a.requests / result["seconds"],
                "sentences_per_s": a.requests * a.texts_per_request / result["seconds"],
                "latency_ms": percentiles_ms(result["latencies"]),
                "mean_batch_texts": (texts_after - texts_before) / batches if batches else None,
            }  # fmt: skip
            rows.append(row)
            lat = row["latency_ms"]
            print(f"{PROG}: {name}, batching {batching}, concurrency {concurrency}: "
                  f"{row['requests_per_s']:.1f} req/s, p50 {lat['p50']:.1f} ms, "
                  f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, failed {row['failed']}",
                  flush=True)  # fmt: skip
        peak, rss = (
            proc_status_mib(server.proc.pid, "VmHWM"),
            proc_status_mib(server.proc.pid, "VmRSS"),
        )
    finally:
        returncode = server.stop()
    for row in rows:
        row.update(peak_rss_mib=peak, rss_mib=rss, server_startup_s=server.startup_seconds,
                   server_exit_status=returncode)  # fmt: skip
    return rows


def markdown_table(rows: list[dict], sizes: dict[str, float]) -> str:
    head = ("| checkpoint | size MiB | batching | concurrency | requests/s | sentences/s | "
            "p50 ms | p95 ms | p99 ms | mean batch | failed | peak RSS MiB |")  # fmt: skip
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lat, batch, peak = r["latency_ms"], r["mean_batch_texts"], r["peak_rss_mib"]
        lines.append(
            f"| {r['checkpoint']} | {sizes[r['checkpoint']]:.1f} | {r['batching']} | "
            f"{r['concurrency']} | {r['requests_per_s']:.1f} | {r['sentences_per_s']:.1f} | "
            f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | "
            f"{'-' if batch is None else f'{batch:.1f}'} | {r['failed']} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        checkpoints = check_args(a)
        import httpx  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as err:
        print(f"{PROG}: error: {err.name} is missing: pip install 'fairseq-moe-plugin[serve]'",
              file=sys.stderr)  # fmt: skip
        return 2
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    texts = [t for t in a.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        print(f"{PROG}: error: --texts {a.texts} has no non-blank line", file=sys.stderr)
        return 2
    a.out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {name: path.stat().st_size / 2**20 for name, path in checkpoints}
    rows = []
    try:
        for name, path in checkpoints:
            for wait_ms in (a.batching_wait_ms, 0.0):
                rows += run_server(a, name, path, wait_ms, texts)
    except RuntimeError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    report = {
        "command": [PROG, *(argv if argv is not None else sys.argv[1:])],
        "route": a.route, "texts": str(a.texts), "texts_per_request": a.texts_per_request,
        "requests_per_setting": a.requests, "warmup_per_setting": a.warmup,
        "checkpoints": {name: {"path": str(path), "size_mib": sizes[name]}
                        for name, path in checkpoints},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "server_threads": a.threads},
        "settings": rows,
    }  # fmt: skip
    (a.out_dir / "benchmark_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(rows, sizes)
    (a.out_dir / "benchmark_serve.md").write_text(table)
    print(table, end="")
    print(f"{PROG}: wrote {a.out_dir / 'benchmark_serve.json'} and benchmark_serve.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
