"""What every routed expert kind implements (``Experts``), so that the MoE layer and the tools
(FLOP counts, ONNX export, int8 quantisation, upcycling, growth, sharded checkpoints, BERT init)
call the kind instead of testing its class or the ``--moe-expert-type`` string.

A hook a kind cannot offer is still present and raises ``ExpertKindUnsupported``, whose message
names the kind and the reason (the caller prefixes the layer's name). Class attributes describe
the kind without an instance: its capabilities (read by the config validation and the layer
builder) and its state-dict layout (read by growth and upcycling, which work on state dicts).
The kinds are registered in ``expert_kinds.py``.

Shapes: ``N`` tokens, ``k`` choices per token, ``E`` experts, ``C`` = d_model, ``F`` = d_ff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from .dispatch import DispatchPlan
from .expert_parallel import ExpertParallelGroups


class ExpertKindUnsupported(ValueError):
    """A hook an expert kind declares absent; the message names the kind and why."""


@dataclass(frozen=True)
class UpcycleRule:
    """How a kind's tensors (state-dict names under ``P.experts.``) come from a dense FFN
    (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) in sparse upcycling."""

    sources: dict[str, str]  # tensor -> the dense FFN tensor it is copied from
    into_every_expert: bool  # stacked: one copy per expert (E x ...); else copied once
    new: tuple[str, ...] = ()  # tensor name prefixes a dense checkpoint does not have


@runtime_checkable
class Experts(Protocol):
    """A routed expert kind: ``forward(x, plan, weight)`` and the hooks the tools call."""

    kind: ClassVar[str]  # its name: a --moe-expert-type value, or "int8"
    # Capabilities (read by the config validation and ``expert_kinds.build_experts``).
    shares_dense_ffn: ClassVar[bool]  # the experts hold the layer's dense FFN (size, activation)
    reads_lora_options: ClassVar[bool]  # --moe-lora-rank/-alpha/-dropout apply
    supports_expert_parallel: ClassVar[bool]
    supports_parallel_placement: ClassVar[bool]
    supports_shared_experts: ClassVar[bool]
    supports_cmr: ClassVar[bool]
    supports_int8: ClassVar[bool]
    quantized: ClassVar[bool]  # an int8 inference form (fairseq-moe-quantize wrote it)
    # State-dict layout under ``P.experts.``.
    STACKED: ClassVar[tuple[str, ...]]  # per-expert tensors, stacked along E (dim 0)
    SHARED_STATE: ClassVar[tuple[str, ...]]  # tensors not per expert (growth keeps them)
    GROW_ZERO: ClassVar[tuple[str, ...]]  # stacks whose new experts start at zero
    UPCYCLE: ClassVar[UpcycleRule]

    num_experts: int  # E, over all ranks
    num_local_experts: int  # the experts held here
    first_expert: int  # the global id of the first expert held here
    d_model: int
    d_ff: int
    activation_name: str
    expert_parallel: ExpertParallelGroups | None  # None: every expert on this process

    def forward(
        self, x: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: N x C tokens, plan: their kept assignments, weight: N x k combine weights (None:
        1). Returns N x C."""

    def stacked_parameters(self) -> list[torch.Tensor]:
        """The per-expert parameters (stacked along E), what a token's k experts activate."""

    def expert_macs(self, tokens: int, assignments: float) -> float:
        """Multiply-adds of ``forward`` on ``tokens`` tokens with ``assignments`` kept
        (token, expert) assignments (analytic FLOP count)."""

    def check_onnx_export(self) -> None:
        """``ExpertKindUnsupported`` unless the ONNX export handles this kind."""

    def onnx_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``fc1_weight`` E x F x C, ``fc1_bias`` E x F, ``fc2_weight`` E x C x F,
        ``fc2_bias`` E x C for the ONNX export."""

    def quantized_int8(self, compute: str) -> Experts:
        """The int8 inference form of these experts (``--moe-int8 compute``)."""

    def upcycle_noise_(self, name: str, std: float) -> None:
        """Add N(0, std) noise to every expert's copy of the stacked tensor ``name``."""

    def init_like_bert(self) -> None:
        """What ``init_bert_params`` does to a dense FFN, for these experts."""


def no_onnx_export(experts: object) -> str:
    """Why the ONNX export refuses ``experts`` (a kind other than FFN experts)."""
    return (
        f"{type(experts).__name__} experts are not supported by the ONNX export (only FFN "
        "experts: not --moe-expert-type lora, nor int8 experts; export the fp32 model, and use "
        "--moe-op qmoe for int8 experts)"
    )


def no_int8(experts: object) -> str:
    """Why ``--moe-int8`` refuses ``experts`` (a kind other than fp32 FFN experts)."""
    return f"--moe-int8 supports FFN experts (StackedExperts), not {type(experts).__name__}"


class NoExportNoInt8:
    """The ONNX and int8 hooks of a kind that has neither (LoRA, and int8 experts themselves):
    each raises ``ExpertKindUnsupported`` with the reason."""

    def check_onnx_export(self) -> None:
        raise ExpertKindUnsupported(no_onnx_export(self))

    def onnx_weights(self):
        raise ExpertKindUnsupported(no_onnx_export(self))

    def quantized_int8(self, compute: str):
        raise ExpertKindUnsupported(no_int8(self))


def is_experts(module: object) -> bool:
    """Whether ``module`` is a routed expert kind (implements ``Experts``)."""
    return isinstance(module, Experts)
