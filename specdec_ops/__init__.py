"""specdec_ops: the KV-cache bookkeeping of speculative decoding in fused Triton kernels.

One kernel source runs on Ascend NPUs (triton-ascend), NVIDIA GPUs (Triton) and the CPU (Triton's
interpreter, chosen automatically for CPU tensors).
"""

from __future__ import annotations

from . import reference, sglang
from .allocator import (
    AllocationError,
    ContextLengthError,
    DraftCacheAllocator,
    DraftStepWrapper,
    OutOfRowsError,
    OutOfSlotsError,
)
from .ops import CacheLocsWrapper, assign_extend_cache_locs, get_last_loc, get_last_loc_and_assign_extend_cache_locs

__all__ = [
    "AllocationError",
    "CacheLocsWrapper",
    "ContextLengthError",
    "DraftCacheAllocator",
    "DraftStepWrapper",
    "OutOfRowsError",
    "OutOfSlotsError",
    "assign_extend_cache_locs",
    "get_last_loc",
    "get_last_loc_and_assign_extend_cache_locs",
    "reference",
    "sglang",
]
__version__ = "0.1.0"
