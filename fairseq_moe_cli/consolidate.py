"""``fairseq-moe-consolidate``: a sharded checkpoint as one file, and one file as a sharded
checkpoint.

    fairseq-moe-consolidate CHECKPOINT OUT.pt [--to consolidated|sharded] [--data DIR]

- From a sharded checkpoint (``--moe-checkpoint-format sharded``: a small file and its shard
  folder), ``--to consolidated`` (the default for such input) writes the single file a
  consolidated save would have written: every expert and its optimizer state in full ``E x ...``
  stacks, the config, the iterator position and the meters. ``torch.load``, fairseq-generate
  on one process, the hub and every plugin tool read it; it is what to share.
- From a single file, ``--to sharded`` (the default for such input) writes OUT.pt and its shard
  folder ``checkpoint_shards/<id>/`` beside it, the layout a sharded save writes (each expert's
  tensors and optimizer moments on their own, loadable at any W and P). It builds the model to
  know which tensors are experts and how the optimizer names its parameters, so it needs the
  task's dictionaries: ``--data`` when the data folder moved since training.

Both run on one process and hold the whole model in memory (that is what a single file is);
training and generation never need this tool, since both formats load at any layout. OUT is
written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fairseq_moe_cli.quantize import output_refused

logger = logging.getLogger("fairseq_moe_cli.consolidate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fairseq-moe-consolidate", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    p.add_argument("checkpoint", type=Path, help="a sharded or a consolidated checkpoint")
    p.add_argument("out", type=Path, help="the checkpoint to write")
    p.add_argument("--to", choices=("consolidated", "sharded"),
                   help="the format to write (default: the other one)")  # fmt: skip
    p.add_argument("--data", type=Path, help="the task's data folder, when it moved (--to sharded)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    return p.parse_args(argv)


def _set_format(state: dict, value: str) -> None:
    """Record the checkpoint format in the saved model config (as a later save would)."""
    model_cfg = (
        (state.get("cfg") or {}).get("model") if isinstance(state.get("cfg"), dict) else None
    )
    for cfg in (model_cfg, state.get("args")):
        if isinstance(cfg, argparse.Namespace):
            cfg.moe_checkpoint_format = value
        elif isinstance(cfg, dict):
            cfg["moe_checkpoint_format"] = value


def _save(state: dict, out: Path) -> None:
    from fairseq import checkpoint_utils

    checkpoint_utils.torch_persistent_save(state, str(out))  # fairseq's atomic save


def consolidate(checkpoint: Path, out: Path) -> dict:
    """Write the sharded ``checkpoint`` as one file ``out``; returns a report."""
    from fairseq_moe_plugin.distributed.sharded_checkpoint import (
        read_shards,
        read_skeleton,
        shard_folder,
    )

    skeleton = read_skeleton(checkpoint)
    folder = shard_folder(checkpoint, skeleton)
    state = read_shards(checkpoint, skeleton, layout=(0, 1))  # every expert, here
    _set_format(state, "consolidated")
    _save(state, out)
    return {"from": "sharded", "shards": str(folder),
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}  # fmt: skip


def shard(checkpoint: Path, out: Path, data: Path | None = None) -> dict:
    """Write the single-file ``checkpoint`` as a sharded checkpoint ``out``; returns a report."""
    from fairseq_moe_plugin import checkpoint_io
    from fairseq_moe_plugin.deploy.encryption import is_encrypted
    from fairseq_moe_plugin.distributed.checkpoint_layout import expert_rows
    from fairseq_moe_plugin.distributed.sharded_checkpoint import (
        read_skeleton,
        shard_folder,
        write_shards,
    )

    if is_encrypted(checkpoint):
        raise ValueError(f"{checkpoint} is encrypted: sharded checkpoints are written in plain")
    overrides = {"data": str(data)} if data else None
    raw = read_skeleton(checkpoint)  # the state as saved (memory-mapped), config as containers
    models, _, _ = checkpoint_io.load_model_ensemble_and_task(checkpoint, arg_overrides=overrides)
    model = models[0]  # which tensors are experts, and the optimizer's parameter names
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    history = raw.get("optimizer_history") or [{}]
    skeleton = write_shards(raw, expert_rows(model), names, out.resolve().parent,
                            int(history[-1].get("num_updates", 0)))  # fmt: skip
    _set_format(skeleton, "sharded")
    _save(skeleton, out)
    folder = shard_folder(out, skeleton)
    return {"from": "consolidated", "shards": str(folder),
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}  # fmt: skip


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import fairseq_moe_plugin  # noqa: F401  (registers the models; allow-lists the globals)
    from fairseq_moe_plugin.checkpoint_io import CheckpointError
    from fairseq_moe_plugin.distributed.sharded_checkpoint import is_sharded, read_skeleton

    if not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2
    if output_refused(args.checkpoint, args.out, args.force):
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        sharded = is_sharded(read_skeleton(args.checkpoint))
    except Exception as err:
        print(f"error: cannot read {args.checkpoint} as a checkpoint: {err}", file=sys.stderr)
        return 2
    to = args.to or ("consolidated" if sharded else "sharded")
    if (to == "consolidated") != sharded:
        print(f"error: {args.checkpoint} is already {to}", file=sys.stderr)
        return 2
    try:
        report = consolidate(args.checkpoint, args.out) if sharded else shard(
            args.checkpoint, args.out, args.data)  # fmt: skip
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mib = 1024 * 1024
    size = args.out.stat().st_size / mib
    print(f"wrote {args.out} ({to}, {size:.2f} MiB) from {args.checkpoint} "
          f"(shard folder {report['shards']}, {report['bytes'] / mib:.2f} MiB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
