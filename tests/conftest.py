"""Shared fixtures: device markers that skip themselves (and say so at the end), and sentinel-filled outputs."""

from __future__ import annotations

from collections import Counter

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


def pytest_terminal_summary(terminalreporter):
    """One line per reason for the skipped tests, so a run that skips says why without -rs."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", "skipped tests, by reason (on a GPU machine: python -m pytest -m gpu)")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:5d} skipped: {reason}")


def sentinel_like(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An output buffer poisoned with SENTINEL, so an element the kernel never wrote shows up."""
    return torch.full((n,), SENTINEL, dtype=dtype, device=device)
