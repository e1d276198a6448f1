"""Where the routed experts sit in a transformer layer (``--moe-expert-placement``), as
registered objects: tools read a placement's properties, never its name.

- ``replace`` (default): the MoE layer takes the place of the layer's dense FFN;
- ``parallel``: the dense FFN stays (fairseq's ``fc1``/``fc2``) and the MoE output is added to
  its output; the experts' output projection starts at zero, so the layer first computes what
  the dense one did.

A new placement is one more ``Placement`` in ``PLACEMENTS`` (and its name in
``models/moe_config.PLACEMENT_CHOICES``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """A ``--moe-expert-placement`` value and what it implies."""

    name: str
    keeps_dense_ffn: bool  # the layer's dense FFN stays and runs for every token
    experts_start_at_zero: bool  # the experts' output projection starts at zero
    allows_shared_experts: bool  # --moe-shared-experts (a dense FFN beside would be one)
    allows_cmr: bool  # --moe-cmr (mixes the dense FFN with the MoE output by a gate)


PLACEMENTS: dict[str, Placement] = {
    "replace": Placement("replace", False, False, True, True),
    "parallel": Placement("parallel", True, True, False, False),
}


def placement(cfg) -> Placement:
    """The placement of a model config (``cfg.moe_expert_placement``); ValueError naming the
    known ones for anything else."""
    name = str(cfg.moe_expert_placement)
    if name not in PLACEMENTS:
        raise ValueError(
            f"unknown --moe-expert-placement {name!r}; expected one of {list(PLACEMENTS)}"
        )
    return PLACEMENTS[name]
