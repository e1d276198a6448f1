"""The one place where a training batch's routing records move the routers' buffers.

Two gate options keep state that training batches update: the usage EMA (``--moe-usage-ema``,
buffer ``usage_ema``, ``TopKGate.update_usage_ema``) and aux-loss-free bias balancing
(``--moe-bias-balancing-rate``, buffer ``balance_load``, ``TopKGate.accumulate_balance_load``, turned
into a bias step when the next update starts). The MoE criteria call ``update_routing_buffers``
once per training batch, after the forward, with the records that forward returned: a forward
that runs twice (activation checkpointing's recompute) must not count a batch twice, so the gate
never updates them during its own forward. Each MoE layer takes its own records
(``MoERecord.layer`` is the layer's name) and updates its own gate's buffers; nothing else
writes them.
"""

from __future__ import annotations

import torch

from .moe_layer import MoELayer
from .record import MoERecord

# option on the gate (above 0: on) -> (the gate's method, the buffer it updates)
BUFFER_UPDATES = {
    "usage_ema_decay": ("update_usage_ema", "usage_ema"),
    "bias_balancing_rate": ("accumulate_balance_load", "balance_load"),
}


def gates_with(model: torch.nn.Module, option: str) -> dict:
    """``{layer name: gate}`` of the MoE layers of ``model`` whose gate has ``option`` (a gate
    attribute: ``usage_ema_decay``, ``bias_balancing_rate``) above 0."""
    return {
        m.name: m.gate
        for m in model.modules()
        if isinstance(m, MoELayer) and getattr(m.gate, option, 0) > 0
    }


def fold_layer_records(layer: MoELayer, records: list[MoERecord], options=BUFFER_UPDATES) -> None:
    """Fold ``layer``'s own records (the others are ignored) into its gate's buffers: for each
    of ``options`` that the gate has on, ``gate.<method>(record.expert_load)``, record by record
    in the order given."""
    gate = layer.gate
    for option in options:
        if getattr(gate, option, 0) <= 0:
            continue
        method = getattr(gate, BUFFER_UPDATES[option][0])
        for record in records:
            if record.layer == layer.name:
                method(record.expert_load.detach())


def update_routing_buffers(
    model: torch.nn.Module, records: list[MoERecord], options=BUFFER_UPDATES
) -> None:
    """Fold one training batch's records into the buffers of every MoE layer of ``model`` (the
    module doc); ``options``: which of ``BUFFER_UPDATES`` (default: all)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            fold_layer_records(module, records, options)
