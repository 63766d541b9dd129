"""Buffers a plan makes for itself, moved into one allocation: a run then re-checks one address for all of them."""

from __future__ import annotations

import torch

__all__ = ["share_one_allocation"]

# The alignment Triton specialises pointers on, as a buffer of its own has.
_ALIGN = 16


def share_one_allocation(buffers: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Move ``buffers`` (dense tensors made by a plan and not yet viewed; any dtypes, one device) into one new
    allocation, each at a 16-byte aligned offset, in place (``set_``); returns that allocation (bytes), or None for
    fewer than two buffers (nothing to share). ``None`` entries are skipped."""
    buffers = [t for t in buffers if t is not None]
    if len(buffers) < 2:
        return None
    offsets, total = [], 0
    for t in buffers:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    arena = torch.empty(total, dtype=torch.uint8, device=buffers[0].device)
    storage = arena.untyped_storage()
    for t, offset in zip(buffers, offsets):
        t.set_(storage, offset // t.element_size(), t.size(), t.stride())
    return arena
