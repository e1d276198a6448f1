"""The experts' activations: by name as a function (``get_activation_fn``, what the modules call),
and as the in-place forward/backward pair the hand-written expert backward uses (``activate``,
``activation_backward``), with inverted dropout's scale.

Plain torch; no fairseq needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear")
GELU_APPROXIMATION = {"gelu": "none", "gelu_fast": "tanh", "gelu_accurate": "tanh"}


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activations fairseq's ``utils.get_activation_fn`` knows, without importing fairseq."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_fast", "gelu_accurate"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda x: x
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def activate(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation output, what backward needs). May overwrite ``z`` (it is a fresh buffer)."""
    if name == "relu":
        a = z.relu_()
        return a, a
    if name == "tanh":
        a = z.tanh_()
        return a, a
    if name == "linear":
        return z, z
    if name in GELU_APPROXIMATION:
        return F.gelu(z, approximate=GELU_APPROXIMATION[name]), z
    raise ValueError(f"unknown activation {name!r}")


def activation_backward(
    name: str, saved: torch.Tensor, grad_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation output, dL/dz) from what ``activate`` saved; dL/dz overwrites ``grad_a``."""
    aten = torch.ops.aten
    if name == "relu":
        return saved, aten.threshold_backward.grad_input(grad_a, saved, 0, grad_input=grad_a)
    if name == "tanh":
        return saved, aten.tanh_backward.grad_input(grad_a, saved, grad_input=grad_a)
    if name == "linear":
        return saved, grad_a
    approximate = GELU_APPROXIMATION[name]
    a = F.gelu(saved, approximate=approximate)
    dz = aten.gelu_backward.grad_input(grad_a, saved, approximate=approximate, grad_input=grad_a)
    return a, dz


def dropout_scale(p: float) -> float:
    """Inverted dropout's scale for kept units, 1 / (1 - p) (0 when everything is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0
