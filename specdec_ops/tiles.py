"""Tile-size rules shared by the ops and the allocator (launch configuration both of them pick)."""

from __future__ import annotations

__all__ = ["MAX_BLOCK_N", "block_n"]

# The widest window column block of a gather tile.
MAX_BLOCK_N = 64


def block_n(window_len: int) -> int:
    """Window columns per gather step: ``window_len`` rounded up to a power of two, in [2, MAX_BLOCK_N]."""
    return min(max(1 << (window_len - 1).bit_length(), 2), MAX_BLOCK_N)
