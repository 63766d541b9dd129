"""Shared fixtures: device markers that skip themselves (and say so at the end), sentinel-filled outputs, and the
example budget of the property-based tests."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

SENTINEL = -7777

# The devices a test of kernels runs on: each accelerator's case carries its marker and skips itself without one.
ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("npu", marks=pytest.mark.npu)]
DEVICES = ["cpu", *ACCELERATORS]

# A factor on every property-based test's number of examples (hypothesis' max_examples), default 1. CI runs the
# README's test command with the full budget, and the same tests on its other stacks (Triton 3.6, triton-ascend's
# interpreter), which check the same kernels under another interpreter, with SPECDEC_TEST_EXAMPLES=0.25.
_EXAMPLES_ENV = "SPECDEC_TEST_EXAMPLES"
try:
    EXAMPLES_SCALE = float(os.environ.get(_EXAMPLES_ENV, "1"))
except ValueError:
    EXAMPLES_SCALE = -1.0
if not EXAMPLES_SCALE > 0:
    raise ValueError(f"{_EXAMPLES_ENV} must be a positive number, got {os.environ.get(_EXAMPLES_ENV)!r}")


def examples(n: int) -> int:
    """``n`` examples of a property-based test, scaled by SPECDEC_TEST_EXAMPLES (at least 1)."""
    return max(1, round(n * EXAMPLES_SCALE))


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
        terminalreporter.write_sep("-", "skipped tests, by reason (GPU: python -m pytest -m gpu; NPU: -m npu)")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:5d} skipped: {reason}")


def device_index_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """``dtype`` for an index tensor given to the library on ``device``: int64 on an NPU, which takes no other
    (checks.check_npu_dtypes)."""
    return torch.int64 if torch.device(device).type == "npu" else dtype


def sentinel_like(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An output buffer poisoned with SENTINEL, so an element the kernel never wrote shows up (int64 on an NPU:
    ``device_index_dtype``)."""
    return torch.full((n,), SENTINEL, dtype=device_index_dtype(dtype, device), device=device)
