"""How a fairseq checkpoint's tensors become entries of a DCP folder, and back.

A fairseq checkpoint state (``Trainer.state_dict()``) holds tensors in ``model`` (the model's
state dict), ``criterion`` and ``last_optimizer_state`` (the optimizer's: ``state`` keyed by
parameter index, then ``param_groups``). ``split_state`` replaces every tensor by a marker
``{"moe_dcp": key, "experts": E}`` and returns the tensors by key, so that what is left (the
*skeleton*: config, optimizer history, ``extra_state``, markers) is a small file that
weights-only ``torch.load`` reads. Keys:

- ``model/<name>`` and ``criterion/<name>``; ``optimizer/<parameter name>/<state key>`` (the
  parameter's name, not its index, so that the entry does not depend on how the optimizer
  numbers them);
- a stacked expert tensor (``StackedExperts``' ``fc1_weight`` ..., and an optimizer state of the
  same first dimension, Adam's moments) is split into one entry per expert,
  ``<key>/e<global expert id>``, and its marker says E. A process writes the experts it holds;
  a process loading takes the rows its layout needs, whatever the layout that saved them. P
  always divides E, so the rows of a process are whole experts: the per-expert entries are the
  smallest unit any layout reads.

``assemble_state`` walks a skeleton and allocates, for every marker, a dense tensor or this
process's rows of an expert stack, and returns them with the DCP entries to fill them from.

Plain torch; no fairseq.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modules.expert_kinds import is_experts
from .dcp_storage import ShardedCheckpointError, tensor_spec

MARKER = "moe_dcp"


@dataclass(frozen=True)
class ExpertRows:
    """The rows of an expert stack a process holds: experts ``first .. first + count - 1`` of
    ``total``."""

    first: int
    count: int
    total: int


def expert_rows(model: torch.nn.Module) -> dict[str, ExpertRows]:
    """``{state dict key: ExpertRows}`` of every stacked expert tensor of ``model``: the
    ``STACKED`` tensors of the expert kinds that can be sharded (``supports_expert_parallel``);
    the others are whole on every process."""
    rows = {}
    for name, module in model.named_modules():
        if is_experts(module) and module.supports_expert_parallel:
            layout = ExpertRows(module.first_expert, module.num_local_experts, module.num_experts)
            for tensor in module.STACKED:
                rows[f"{name}.{tensor}" if name else tensor] = layout
    return rows


def expert_key(key: str, expert: int) -> str:
    return f"{key}/e{expert}"


def is_marker(value) -> bool:
    return isinstance(value, dict) and MARKER in value


def split_state(
    state: dict, rows: dict[str, ExpertRows], param_names: list[str]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(skeleton, DCP entries) of a fairseq checkpoint state (see the module doc).

    ``rows``: ``expert_rows(model)``; ``param_names``: the name of each optimizer parameter, in
    the optimizer's order."""
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, value, name: str | None):
        if not torch.is_tensor(value):
            return value
        value = value.detach()
        layout = rows.get(name) if name is not None else None
        if layout is not None and value.dim() and value.shape[0] == layout.count:
            for i in range(layout.count):
                tensors[expert_key(key, layout.first + i)] = value[i]
            return {MARKER: key, "experts": layout.total}
        tensors[key] = value
        return {MARKER: key, "experts": 0}

    skeleton = dict(state)
    for part in ("model", "criterion"):
        if isinstance(state.get(part), dict):
            skeleton[part] = {n: put(f"{part}/{n}", v, n) for n, v in state[part].items()}
    optimizer = state.get("last_optimizer_state")
    if optimizer is not None:
        if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
            raise ShardedCheckpointError(
                "--moe-checkpoint-format sharded supports optimizers whose state dict is one "
                "torch optimizer's (adam, adafactor, sgd, ...), not this one's; use "
                "--moe-checkpoint-format consolidated"
            )
        counted = sum(len(group["params"]) for group in optimizer.get("param_groups", []))
        if counted != len(param_names):
            raise ShardedCheckpointError(
                f"the optimizer holds {counted} parameters but the model and criterion have "
                f"{len(param_names)} trained ones: cannot name its state for a sharded "
                "checkpoint; use --moe-checkpoint-format consolidated"
            )
        state_of = {}
        for index, entry in optimizer["state"].items():
            name = param_names[int(index)]
            state_of[index] = {k: put(f"optimizer/{name}/{k}", v, name) for k, v in entry.items()}
        skeleton["last_optimizer_state"] = {**optimizer, "state": state_of}
    return skeleton, tensors


def assemble_state(
    skeleton, metadata, rows_for: Callable[[int], tuple[int, int]], folder
) -> tuple[object, dict[str, torch.Tensor]]:
    """(state, DCP entries to fill): ``skeleton`` with every marker replaced by a tensor
    allocated here, empty, and the views into them DCP fills. ``rows_for(E)``: the (first,
    count) rows of a stack of E experts this process takes."""
    requests: dict[str, torch.Tensor] = {}

    def spec(key):
        try:
            return tensor_spec(metadata, key)
        except KeyError:
            raise ShardedCheckpointError(
                f"shard folder {folder} holds no tensor {key!r}, which the checkpoint lists"
            ) from None

    def build(marker):
        key, total = marker[MARKER], int(marker["experts"])
        if total == 0:
            size, dtype = spec(key)
            tensor = torch.empty(size, dtype=dtype)
            requests[key] = tensor
            return tensor
        first, count = rows_for(total)
        size, dtype = spec(expert_key(key, 0))
        stack = torch.empty(count, *size, dtype=dtype)
        for i in range(count):
            requests[expert_key(key, first + i)] = stack[i]
        return stack

    def walk(value):
        if is_marker(value):
            return build(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(skeleton), requests
