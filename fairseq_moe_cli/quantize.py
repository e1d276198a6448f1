"""``fairseq-moe-quantize``: an inference checkpoint with int8 weights, optionally encrypted.

    fairseq-moe-quantize CHECKPOINT OUT.pt [--int8 dynamic|weight_only|off] [--data DIR]
        [--decrypt-key-file KEY] [--encrypt-key-file KEY]

loads a trained ``moe_transformer`` or ``moe_roberta`` checkpoint (the plugin's weights-only
loader, ``checkpoint_io``), converts the model (``models/quantize.py``: int8 stacked experts per
expert and output channel, torch dynamic quantisation for the other linear layers; routers,
heads and embeddings stay fp32) and writes OUT.pt with ``moe_int8`` set in its config and
without the optimizer state. OUT.pt loads like any checkpoint of the plugin: ``fairseq-generate
--user-dir fairseq_moe_plugin``, the hub interface, ``fairseq-moe-serve``. ``--int8 off`` writes
the fp32 inference checkpoint (optimizer state dropped), the fair baseline for sizes.

``--encrypt-key-file KEY`` writes OUT.pt encrypted with AES-256-GCM (``deploy/encryption.py``);
the plain bytes never touch the disk. Make a key with ``openssl rand -hex 32 > KEY``.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

from fairseq_moe_plugin.models.moe_config import INT8_MODES

logger = logging.getLogger("fairseq_moe_cli.quantize")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fairseq-moe-quantize", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    p.add_argument("checkpoint", type=Path, help="trained checkpoint (moe_transformer/roberta)")
    p.add_argument("out", type=Path, help="where to write the inference checkpoint")
    p.add_argument(
        "--int8",
        choices=INT8_MODES,
        default="dynamic",
        help="dynamic (default): int8 matmuls with activations quantised on the fly; "
        "weight_only: int8 weights, fp32 activations for the experts; off: fp32",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="the task's data folder (its dictionaries), when it moved since training",
    )
    p.add_argument("--decrypt-key-file", type=Path, help="key of an encrypted CHECKPOINT")
    p.add_argument("--encrypt-key-file", type=Path, help="write OUT encrypted with this key")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    return p.parse_args(argv)


def _set_model_option(state: dict, name: str, value) -> None:
    """Set a model option in the saved config (a dataclass config, or legacy args)."""
    from omegaconf import open_dict

    if state.get("cfg") is not None:
        model_cfg = state["cfg"]["model"]
        if isinstance(model_cfg, argparse.Namespace):
            setattr(model_cfg, name, value)
        else:
            with open_dict(model_cfg):
                model_cfg[name] = value
    if state.get("args") is not None:
        setattr(state["args"], name, value)


def quantize_checkpoint(
    checkpoint: Path,
    out: Path,
    int8: str = "dynamic",
    data: Path | None = None,
    decrypt_key_file: Path | None = None,
    encrypt_key_file: Path | None = None,
) -> dict:
    """Write the inference checkpoint; returns sizes and counts for the report."""
    import torch
    from omegaconf import OmegaConf

    from fairseq_moe_plugin import checkpoint_io
    from fairseq_moe_plugin.deploy import encryption
    from fairseq_moe_plugin.models.quantize import int8_linear_names, quantize_model_

    overrides = {"data": str(data)} if data else None
    state = checkpoint_io.read_checkpoint_state(checkpoint, decrypt_key_file, overrides)
    models, _, _ = checkpoint_io.load_model_ensemble_and_task(
        checkpoint, key_file=decrypt_key_file, arg_overrides=overrides
    )
    model = models[0].eval()
    saved_mode = str(getattr(state["cfg"]["model"], "moe_int8", "off") if state.get("cfg")
                     else getattr(state["args"], "moe_int8", "off"))  # fmt: skip
    if saved_mode not in ("off", "None"):
        raise ValueError(f"{checkpoint} is already an int8 checkpoint (moe_int8={saved_mode})")
    linear = len(int8_linear_names(model))
    if int8 != "off":
        quantize_model_(model, compute=int8)
    _set_model_option(state, "moe_int8", int8)
    state["model"] = model.state_dict()
    state["last_optimizer_state"] = None  # inference only: no optimizer state
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getvalue()
    if encrypt_key_file is not None:
        blob = encryption.encrypt_bytes(blob, encryption.read_key_file(encrypt_key_file))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    # The written file must load the way users will load it (fairseq's path, strict).
    checkpoint_io.load_model_ensemble_and_task(
        out, key_file=encrypt_key_file, arg_overrides=overrides
    )
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "int8": int8,
        "encrypted": encrypt_key_file is not None,
        "input_bytes": checkpoint.stat().st_size,
        "output_bytes": out.stat().st_size,
        "linear_layers_quantised": linear if int8 != "off" else 0,
    }


def output_refused(checkpoint: Path, out: Path, force: bool) -> bool:
    """Print why OUT may not be written (it exists without --force, or is CHECKPOINT itself)."""
    if out.exists() and not force:
        print(f"error: {out} exists (use --force to overwrite)", file=sys.stderr)
        return True
    if out.resolve() == checkpoint.resolve():
        print("error: OUT must differ from CHECKPOINT", file=sys.stderr)
        return True
    return False


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if output_refused(args.checkpoint, args.out, args.force):
        return 2
    try:
        report = quantize_checkpoint(
            args.checkpoint,
            args.out,
            args.int8,
            args.data,
            args.decrypt_key_file,
            args.encrypt_key_file,
        )
    except (ValueError, ImportError) as e:  # CheckpointError, DecryptionError, bad options
        print(f"error: {e}", file=sys.stderr)
        return 2
    mib = 1024 * 1024
    print(
        f"wrote {report['out']} (int8={report['int8']}, "
        f"{'encrypted' if report['encrypted'] else 'plain'}): "
        f"{report['output_bytes'] / mib:.2f} MiB, from {report['input_bytes'] / mib:.2f} MiB "
        f"(training checkpoint, optimizer state included); "
        f"{report['linear_layers_quantised']} linear layers dynamically quantised"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
