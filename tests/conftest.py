"""Shared fixtures: device markers that skip themselves, and sentinel-filled outputs."""

from __future__ import annotations

import pytest
import torch

SENTINEL = -7777


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    npu = getattr(torch, "npu", None)
    has_npu = npu is not None and npu.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "npu" in item.keywords and not has_npu:
            item.add_marker(pytest.mark.skip(reason="needs an Ascend NPU"))


def sentinel_like(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An output buffer poisoned with SENTINEL, so an element the kernel never wrote shows up."""
    return torch.full((n,), SENTINEL, dtype=dtype, device=device)
