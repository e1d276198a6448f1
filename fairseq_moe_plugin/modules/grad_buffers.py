"""Reusable buffers for the experts' stacked weight gradients on CPU.

fairseq clears gradients with ``p.grad = None`` after every update, so every backward allocates
fresh ``E x d_ff x d_model`` weight gradients. On GPU the framework's caching allocator hands the
same memory back. On CPU, glibc serves any block above its mmap threshold (32 MiB at most) with
fresh pages, and the kernel faults them in on first write. On the 2-core benchmark machine that
costs 50-60 ms per 256 MiB, about 20% of the layer's forward+backward at E=64 (measured with
``scripts/benchmark_moe_layer.py``, which runs with and without reuse).

``GradientBuffers`` keeps the last buffer per weight and hands it out again only when nothing
else references its storage: a gradient still in use (``p.grad`` during gradient accumulation, a
reference kept by the caller, a view of it) is never overwritten; a fresh buffer is allocated
instead. The cost is memory: the buffers stay allocated between updates, as gradients do with
``zero_grad(set_to_none=False)``. ``clear()`` frees them; switching the experts to eval does too.
"""

from __future__ import annotations

import torch

# The storage's reference count; without it (another torch), buffers are never reused.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _unreferenced(buffer: torch.Tensor) -> bool:
    """True when only ``buffer`` itself holds its storage."""
    storage = buffer.untyped_storage()  # holds one reference while it lives
    return _storage_use_count(storage._cdata) <= 2


class GradientBuffers:
    """A named buffer per weight, reused across backward passes on CPU (see the module doc)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and _storage_use_count is not None
        self._buffers: dict[str, torch.Tensor] = {}

    def empty_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like``, the kept buffer for ``name`` when free.

        The result is a new tensor object over the buffer's storage, so that autograd may keep it
        as ``.grad`` without copying it.
        """
        if not self.enabled or like.device.type != "cpu":
            return torch.empty_like(like)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[name] = torch.empty_like(like)
        elif not _unreferenced(buffer):
            return torch.empty_like(like)  # still in use: leave it alone
        return buffer.detach()

    def clear(self) -> None:
        """Free the kept buffers."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    # A copied or pickled module (fairseq's EMA deep-copies the model) starts with no buffers.
    def __deepcopy__(self, memo) -> GradientBuffers:
        return GradientBuffers(self.enabled)

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled, "_buffers": {}}
