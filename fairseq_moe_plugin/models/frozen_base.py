"""``--moe-freeze-base``: train only the routers and the experts of a model built on a
pretrained dense one (with ``--moe-init-from-dense``), as parameter-efficient MoE designs do
(expert MLPs beside a frozen model, GLBL; LoRA experts on a frozen model, DyLoRA-MoE).

Frozen parameters get ``requires_grad = False``: autograd gives them no gradient, and fairseq's
trainer builds its optimizer from the parameters that require a gradient only, so they have no
optimizer state either. What stays trainable:

- every router (``*.moe.gate.*``), shared expert (``*.moe.shared.*``) and CMR gate
  (``*.cmr_gate.*``);
- every expert parameter that is trainable by construction: the stacked FFN experts, or the
  LoRA deltas (LoRA experts' shared FFN is frozen by ``LoRAExperts`` itself);
- with ``--moe-train-heads``: ``moe_roberta``'s classification heads (also those registered
  after the model is built, see ``MoERobertaModel.register_classification_head``) and
  ``moe_transformer``'s output projection when it is not tied to the embeddings.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..modules.moe_layer import MoELayer

logger = logging.getLogger(__name__)


def moe_trainable_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that train under a frozen base: routers, experts, shared experts
    (and their gate) and the CMR gates (``--moe-cmr``: the dense branch it mixes in is the
    frozen FFN)."""
    keep = set()
    for module in model.modules():
        if isinstance(module, MoELayer):
            keep.update(id(p) for p in module.gate.parameters())
            keep.update(id(p) for p in module.experts.parameters() if p.requires_grad)
            if module.shared is not None:
                keep.update(id(p) for p in module.shared.parameters())
        cmr_gate = getattr(module, "cmr_gate", None)
        if isinstance(cmr_gate, nn.Module):
            keep.update(id(p) for p in cmr_gate.parameters())
    return keep


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The heads ``--moe-train-heads`` trains: classification heads, or the decoder's output
    projection (refused when it is the embedding matrix: training it would unfreeze those)."""
    heads = getattr(model, "classification_heads", None)
    if heads is not None:
        return [heads]
    decoder = getattr(model, "decoder", None)
    projection = getattr(decoder, "output_projection", None)
    if projection is None:
        return []
    embed = getattr(decoder, "embed_tokens", None)
    if embed is not None and projection.weight is embed.weight:
        raise ValueError(
            "--moe-train-heads: the decoder's output projection is its embedding matrix "
            "(--share-decoder-input-output-embed or --share-all-embeddings), so training it "
            "would unfreeze the embeddings; drop --moe-train-heads or untie them"
        )
    return [projection]


def freeze_base(model: nn.Module, train_heads: bool = False) -> dict[str, int]:
    """Freeze every parameter but the routers, the experts and (``train_heads``) the heads;
    log and return the counts ``{"trainable": ..., "total": ...}``."""
    keep = moe_trainable_parameters(model)
    if not keep:
        raise ValueError("--moe-freeze-base: the model has no MoE layer, so nothing would train")
    if train_heads:
        for head in head_modules(model):
            keep.update(id(p) for p in head.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return log_trainable(model)


def log_trainable(model: nn.Module, what: str = "frozen base") -> dict[str, int]:
    """Log how many parameters train and their share (shared tensors counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    share = 100.0 * trainable / max(total, 1)
    logger.info(f"{what}: {trainable:,} of {total:,} parameters train ({share:.2f}%)")
    return {"trainable": trainable, "total": total}
