"""Add experts to a trained MoE checkpoint (expert growth, ``fairseq_moe_plugin/models/grow.py``).

    fairseq-moe-grow-experts --checkpoint checkpoints/checkpoint_last.pt --out grown.pt \\
        --num-new 2 [--router-init offset|copy] [--offset 30] [--noise 0.01] \\
        [--source-experts 0,1] [--dense-updates 200] [--seed 0]

(or ``python scripts/grow_experts.py ...``). Every MoE layer gets ``--num-new`` experts and a
router bias: with ``offset`` (default) the new experts start far below the old ones, so the grown
model computes what the old one did; with ``copy`` each new expert copies a source expert
(``--source-experts``, default 0, 1, ...) whose routing mass it shares, with ``--noise``.

The checkpoint is loaded as fairseq loads one (weights-only, with the plugin's allow-list). The
model config saved in it gets the new ``moe_expert_count`` and ``moe_router_bias``; the optimizer
state is dropped (its shapes no longer match), so training continues with ``--reset-optimizer``.
The tool prints the flags to continue with. fairseq restarts its update count at 0 when the
optimizer is reset (``--max-update`` and the learning-rate schedule count from the restart), so
``--dense-updates U`` prints ``--moe-dense-routing-until U``: U dense updates after the restart,
then top-k (DyLoRA-MoE's maturity schedule); the grown state dict then has the schedule's
``routing_updates`` buffers that such a model has.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

import torch

PROG = "grow_experts"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a trained MoE fairseq checkpoint")
    parser.add_argument("--out", required=True, help="where to write the grown checkpoint")
    parser.add_argument("--num-new", type=int, required=True, help="experts to add per layer")
    parser.add_argument("--router-init", choices=("offset", "copy"), default="offset",
                        help="offset: new experts start unused; copy: copies of source experts")  # fmt: skip
    parser.add_argument("--offset", type=float, default=30.0,
                        help="offset: new experts' router logits start this far below the old")  # fmt: skip
    parser.add_argument("--noise", type=float, default=0.0,
                        help="copy: noise in standard deviations of the copied weights")  # fmt: skip
    parser.add_argument("--source-experts", type=_int_list, default=None,
                        help="copy: comma-separated expert ids, one per new expert")  # fmt: skip
    parser.add_argument("--dense-updates", type=int, default=0,
                        help="print flags for this many dense-routing updates, then top-k")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the new weights and noise")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def load_checkpoint(path: Path) -> dict:
    """fairseq's ``load_checkpoint_to_cpu`` (weights-only, the plugin's allow-list); ValueError
    or FileNotFoundError naming ``path`` when it is not a fairseq checkpoint with weights."""
    from fairseq import checkpoint_utils

    import fairseq_moe_plugin  # noqa: F401  (allow-lists the checkpoint globals)

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except Exception as err:  # unpickling, or fairseq's upgrade of what is not a checkpoint
        raise ValueError(
            f"{path} is not a fairseq checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} is not a fairseq checkpoint: it has no 'model' weights")
    return state


def model_config(state: dict):
    """The checkpoint's model config (``cfg.model``, else the legacy ``args``), or None."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return cfg["model"]
    return state.get("args")


def update_config(config, updates: dict) -> None:
    """Set ``updates`` in a Namespace, dict or DictConfig model config."""
    from omegaconf import DictConfig, open_dict

    if isinstance(config, DictConfig):
        with open_dict(config):
            for name, value in updates.items():
                config[name] = value
    elif isinstance(config, dict):
        config.update(updates)
    elif isinstance(config, Namespace):
        for name, value in updates.items():
            setattr(config, name, value)
    elif config is not None:
        raise ValueError(f"unknown model config type {type(config).__name__}")


def grow_checkpoint(args) -> tuple[dict, list[str], list[str]]:
    """Load, grow, update the config; returns (the state to save, continue flags, notes)."""
    from fairseq_moe_plugin.models.grow import (
        add_routing_schedule_buffers,
        config_value,
        grow_state_dict,
    )

    if args.dense_updates < 0:
        raise ValueError(f"--dense-updates must be >= 0, got {args.dense_updates}")
    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    config = model_config(state)
    try:
        model, updates = grow_state_dict(
            state["model"], config, args.num_new, router_init=args.router_init,
            offset=args.offset, noise=args.noise, source_experts=args.source_experts,
            seed=args.seed,
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    notes = []
    if args.dense_updates > 0:
        updates["moe_dense_routing_until"] = args.dense_updates
        added = add_routing_schedule_buffers(model)
        if added:
            notes.append(f"added the maturity schedule's update count to {len(added)} gates")
    else:
        until = config_value(config, "moe_dense_routing_until", 0)
        if until:
            notes.append(
                f"the checkpoint was trained with --moe-dense-routing-until {until}: its gates "
                "keep their update count, so continue with a value > 0 (updates count from 0 "
                "again after --reset-optimizer)"
            )
    state["model"] = model
    for cfg in {id(c): c for c in (config, state.get("args")) if c is not None}.values():
        update_config(cfg, updates)
    if state.pop("last_optimizer_state", None) is not None:
        notes.append("dropped the optimizer state (its shapes no longer match)")
    extra = state.get("extra_state") or {}
    for key in ("ema", "ema_fp32_params"):  # --store-ema copies of the old shapes
        if extra.pop(key, None) is not None:
            notes.append(f"dropped extra_state[{key!r}] (fairseq rebuilds it from the model)")
    flags = [f"--moe-expert-count {updates['moe_expert_count']}", "--moe-router-bias",
             f"--restore-file {args.out}", "--reset-optimizer"]  # fmt: skip
    if args.dense_updates > 0:
        flags += ["--moe-routing topk", f"--moe-dense-routing-until {args.dense_updates}"]
    return state, flags, notes


def save(state: dict, out: Path) -> None:
    """``torch.save`` with the config as plain containers, as fairseq's trainer saves it."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(state.get("cfg")):
        state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, naming it)."""
    args = build_parser().parse_args(argv)
    try:
        state, flags, notes = grow_checkpoint(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    save(state, Path(args.out))
    history = state.get("optimizer_history") or [{}]
    trained = history[-1].get("num_updates", "?")
    print(f"{PROG}: wrote {args.out}: {args.num_new} new experts per MoE layer "
          f"({args.router_init} init), grown from {args.checkpoint} after {trained} updates")  # fmt: skip
    for note in notes:
        print(f"{PROG}: {note}")
    if args.dense_updates > 0:
        print(f"{PROG}: fairseq counts updates from 0 again after --reset-optimizer: "
              f"{args.dense_updates} dense updates, then top-k")  # fmt: skip
    print(f"{PROG}: continue training with your other flags and:")
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
