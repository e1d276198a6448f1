"""int8 inference models (``--moe-int8``, written by ``fairseq-moe-quantize``).

``quantize_model_`` turns a built ``moe_transformer`` or ``moe_roberta`` into its int8 form, in
place:

- every MoE layer's stacked experts become ``Int8StackedExperts`` (int8 per expert and output
  channel, ``modules/int8_experts.py``);
- every other ``nn.Linear`` (attention projections, dense FFNs, the shared experts' fc1/fc2 and
  the CMR dense FFN, an untied output projection, the LM head's dense layer) becomes torch's
  dynamic-quantised linear (``torch.ao.quantization.quantize_dynamic`` with per-channel int8
  weights);
- the routers (``gate.wg``) stay fp32: the routing decision is what an MoE is most sensitive to,
  and a router is d_model x E, a negligible share of the weights; so do the other per-token
  gates (the shared experts' ``moe.shared.gate`` and the CMR gate ``cmr_gate``, d_model x 1,
  which the layers compute in fp32); so do the classification heads
  (fairseq's RoBERTa re-creates them from their fp32 weight names when it loads a checkpoint),
  the embeddings, and an output projection tied to them (its int8 copy would add bytes, not save
  them).

The same function serves both sides: ``fairseq-moe-quantize`` calls it on a loaded fp32 model
(the int8 weights are computed from the trained ones) and saves the state dict with
``moe_int8`` set in the config; loading that checkpoint (``fairseq-generate``, the hub, the
plugin's tools) builds the fp32 structure, calls it (``prepare_moe_model``) and loads the int8
state dict into the result.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from ..modules.expert_kinds import ExpertKindUnsupported, is_experts
from ..modules.moe_layer import MoELayer

logger = logging.getLogger(__name__)


def _kept_fp32(name: str, module: nn.Linear, tied: set[int]) -> bool:
    """Linear layers that stay fp32 (see the module doc)."""
    return (
        name.endswith(".gate.wg")
        or name == "gate.wg"
        or name.endswith(("shared.gate", "cmr_gate"))
        or "classification_heads" in name
        or id(module.weight) in tied
    )


def int8_linear_names(model: nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` modules ``quantize_model_`` quantises dynamically."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _kept_fp32(name, module, embeddings)
    ]


@torch.no_grad()
def quantize_model_(model: nn.Module, compute: str = "dynamic") -> nn.Module:
    """Make ``model`` its int8 inference form (in place; see the module doc) and return it.

    Args:
        compute: how the experts run (``Int8StackedExperts``): ``dynamic`` or ``weight_only``.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        try:  # the kind's int8 form (``Int8StackedExperts`` for FFN experts)
            layer.experts = layer.experts.quantized_int8(compute)
        except ExpertKindUnsupported as err:
            raise ValueError(f"{layer.name}: {err}") from err
    names = int8_linear_names(model)
    with warnings.catch_warnings():  # torch's deprecation notice for quantised tensors
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        quantize_dynamic(
            model,
            {name: per_channel_dynamic_qconfig for name in names},
            dtype=torch.qint8,
            inplace=True,
        )
    for module in model.modules():
        # fairseq's attention hands q/k/v_proj.weight to torch's fused attention, which a
        # quantised linear does not have; this flag makes it call the projections instead.
        if hasattr(module, "skip_embed_dim_check"):
            module.skip_embed_dim_check = True
    model.eval()
    logger.info(
        "int8 model (%s experts): %d linear layers dynamically quantised; routers, heads and "
        "embeddings kept fp32",
        compute,
        len(names),
    )
    return model


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` holds quantised experts (the int8 kind)."""
    return any(is_experts(m) and m.quantized for m in model.modules())
