"""Serve checkpoints over HTTP: a batched inference server with Prometheus metrics.

    fairseq-moe-serve CHECKPOINT [--data DIR] [--spm-model spm.model] [--api-key-file KEYS] \\
        [--host 127.0.0.1] [--port 8000] [--max-wait-ms 5] [--max-batch-tokens 4096] \\
        [--beam 5] [--moe-fallback-expert 0] [--decrypt-key-file KEY] [--engine torch]
    fairseq-moe-serve --registry models.yaml [the same flags]

(or ``python scripts/serve.py ...``; needs ``pip install 'fairseq-moe-plugin[serve]'``). A
translation checkpoint serves ``POST /v1/translate``, a classifier ``POST /v1/classify``; both
serve ``GET /healthz`` and ``GET /metrics``. See ``fairseq_moe_plugin/serve/app.py`` for the
request and response bodies and ``serve/metrics.py`` for the metrics.

The checkpoint is loaded with the plugin's weights-only loader (``checkpoint_io``; an encrypted
one with ``--decrypt-key-file``). Its task's dictionaries come from the data folder saved in it,
or ``--data``. Requests that arrive within ``--max-wait-ms`` share a model batch of at most
``--max-batch-tokens`` padded tokens (``--max-wait-ms 0``: no batching). With
``--api-key-file`` every route but ``/healthz`` needs a key (``Authorization: Bearer KEY`` or
``X-API-Key: KEY``); without it the server is open, and says so. SIGTERM or Ctrl-C stops it
gracefully: in-flight requests finish (up to ``--graceful-timeout`` seconds), then the batcher
runs what is queued and stops.

``--registry FILE`` (instead of CHECKPOINT) serves several models and versions, with a traffic
split, shadow versions and circuit breakers (format: ``fairseq_moe_plugin/serve/registry.py``);
SIGHUP or ``POST /admin/reload`` re-read it without a restart. CHECKPOINT alone is the registry
of one model ``default`` with one version ``v1``. The other flags are every version's defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

PROG = "fairseq-moe-serve"
SERVE_EXTRA = "pip install 'fairseq-moe-plugin[serve]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?",
                   help="a fairseq checkpoint (translation model or classifier)")  # fmt: skip
    p.add_argument("--registry", help="a model registry (.yaml/.yml/.json) instead of CHECKPOINT")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="inference engine (a registry version's 'engine' overrides it)")  # fmt: skip
    p.add_argument("--data", help="the task's data folder (its dictionaries), if not the saved one")
    p.add_argument("--spm-model", help="sentencepiece model; without it texts are taken as pieces")
    p.add_argument("--decrypt-key-file", help="key file of an encrypted checkpoint")
    p.add_argument("--moe-fallback-expert", type=int, default=None,
                   help="expert for tokens whose router logits are not finite (-1: off; "
                        "default: the checkpoint's setting)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="accepted API keys, one per line (# comments)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="wait this long for more requests to batch with (0: no batching)")  # fmt: skip
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="padded tokens (texts x longest) per model batch")  # fmt: skip
    p.add_argument("--max-texts", type=int, default=64, help="texts per request")
    p.add_argument("--max-text-tokens", type=int, default=256,
                   help="tokens per text (and per pair), with the model's special tokens")  # fmt: skip
    p.add_argument("--max-text-chars", type=int, default=4096, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size")
    p.add_argument("--max-queue-texts", type=int, default=4096,
                   help="texts waiting at most; more requests get 503")  # fmt: skip
    p.add_argument("--beam", type=int, default=5, help="translation: default beam size")
    p.add_argument("--max-beam", type=int, default=16, help="translation: largest beam taken")
    p.add_argument("--max-len-a", type=float, default=None,
                   help="translation: output length limit a*src_len+b (default: checkpoint's)")  # fmt: skip
    p.add_argument("--max-len-b", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish at shutdown")  # fmt: skip
    p.add_argument("--access-log", action="store_true", help="uvicorn's per-request log")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check_args(a: argparse.Namespace) -> None:
    """ValueError naming the first bad flag or missing file."""
    if (a.checkpoint is None) == (a.registry is None):
        raise ValueError("give exactly one of CHECKPOINT and --registry FILE")
    for flag in ("max_batch_tokens", "max_texts", "max_text_tokens", "max_text_chars",
                 "max_body_bytes", "max_queue_texts", "beam", "max_beam"):  # fmt: skip
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {a.max_wait_ms}")
    if a.beam > a.max_beam:
        raise ValueError(f"--beam {a.beam} is larger than --max-beam {a.max_beam}")
    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if a.checkpoint is not None and Path(a.checkpoint).is_dir():
        if a.engine != "onnx":
            raise ValueError(f"checkpoint {a.checkpoint} is a folder: serve an ONNX export "
                             "folder (fairseq-moe-export-onnx --part translation) with "
                             "--engine onnx, or give a checkpoint file")  # fmt: skip
    elif a.checkpoint is not None and a.engine == "onnx":
        raise ValueError(f"--engine onnx serves an ONNX export folder (fairseq-moe-export-onnx "
                         f"--part translation); {a.checkpoint} is not a folder")  # fmt: skip
    files = {"--registry": a.registry, "--spm-model": a.spm_model,
             "--decrypt-key-file": a.decrypt_key_file, "--api-key-file": a.api_key_file}  # fmt: skip
    if a.checkpoint is not None and not Path(a.checkpoint).exists():
        raise ValueError(f"checkpoint {a.checkpoint}: no such file")
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if a.data is not None and not Path(a.data).is_dir():
        raise ValueError(f"--data {a.data}: no such folder")


def main(argv=None) -> int:
    """CLI entry point: serves until SIGTERM/Ctrl-C, then returns 0; 2 on bad input."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=a.log_level.upper(), stream=sys.stderr)  # fmt: skip
    logger = logging.getLogger("fairseq_moe_plugin.serve")
    try:
        check_args(a)
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn

        from fairseq_moe_plugin.serve.app import ServeSettings, create_app
        from fairseq_moe_plugin.serve.auth import ApiKeys, read_api_keys
        from fairseq_moe_plugin.serve.deployment import Deployment
        from fairseq_moe_plugin.serve.engine import EngineOptions
        from fairseq_moe_plugin.serve.metrics import ServeMetrics
        from fairseq_moe_plugin.serve.registry import load_registry, registry_of_one

        keys = read_api_keys(a.api_key_file) if a.api_key_file else None
        if a.threads is not None:
            import torch

            torch.set_num_threads(a.threads)
        options = EngineOptions(
            data=a.data, spm_model=a.spm_model, key_file=a.decrypt_key_file,
            fallback_expert=a.moe_fallback_expert, device=a.device,
            max_text_tokens=a.max_text_tokens, max_text_chars=a.max_text_chars,
            max_batch_tokens=a.max_batch_tokens, beam=a.beam, max_beam=a.max_beam,
            max_len_a=a.max_len_a, max_len_b=a.max_len_b, engine=a.engine,
        )  # fmt: skip
        settings = ServeSettings(max_wait_ms=a.max_wait_ms, max_texts=a.max_texts,
                                 max_body_bytes=a.max_body_bytes,
                                 max_queue_texts=a.max_queue_texts, reload_on_sighup=True)  # fmt: skip
        spec = load_registry(a.registry) if a.registry else registry_of_one(a.checkpoint)
        deployment = Deployment.start(spec, options, ServeMetrics(), settings)
    except ImportError as err:
        print(f"{PROG}: error: {err.name or err} is missing: {SERVE_EXTRA}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    app = create_app(deployment, settings, ApiKeys(keys) if keys else None)
    url = f"http://{a.host}:{a.port}"
    if keys:
        logger.info("API keys on (%d keys from %s): every route but /healthz needs one",
                    len(keys), a.api_key_file)  # fmt: skip
    else:
        logger.warning("no --api-key-file: the server is OPEN, anyone who can reach %s can use "
                       "it (and read /metrics)", url)  # fmt: skip
    batching = f"batching within {a.max_wait_ms:g} ms" if a.max_wait_ms > 0 else "batching off"
    for model, route in deployment.routes().items():
        versions = ", ".join(f"{rt.spec.name} ({'shadow' if rt.spec.shadow else rt.spec.weight})"
                             for rt in deployment.model_versions(model))  # fmt: skip
        logger.info("model %s on POST %s: versions %s", model, route, versions)
    logger.info("serving on %s: %s, GET /healthz, GET /metrics, POST /admin/reload (%s, up to %d "
                "padded tokens per batch)%s", url,
                ", ".join(f"POST {r}" for r in sorted(set(deployment.routes().values()))),
                batching, a.max_batch_tokens,
                f"; SIGHUP reloads {a.registry}" if a.registry else "")  # fmt: skip
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                            access_log=a.access_log, timeout_graceful_shutdown=a.graceful_timeout,
                            log_config=None)  # fmt: skip
    # uvicorn catches SIGTERM/SIGINT, shuts down gracefully, then raises the signal again
    # under the handlers it found: these make that a clean exit (status 0), not a kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.Server(config).run()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
