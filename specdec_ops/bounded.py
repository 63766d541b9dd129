"""Caches keyed by values without end (batch sizes, lengths): each starts over once it holds its limit of entries."""

from __future__ import annotations

__all__ = ["remember"]


def remember(cache: dict, key: object, value: object, limit: int) -> object:
    """``cache[key] = value``, the cache emptied first once it holds ``limit`` entries, so that keys without end
    cannot grow it without end; returns ``value``."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
