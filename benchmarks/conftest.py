"""Benchmark plumbing: device markers that skip themselves, and the device and versions on top of every report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec_ops import backend

from . import harness

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py does the same for tests/; conftest hooks see every item, so only touch ours.
    has_gpu = torch.cuda.is_available()
    npu = getattr(torch, "npu", None)
    has_npu = npu is not None and npu.is_available()
    for item in items:
        if _HERE not in Path(item.path).resolve().parents:
            continue
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "npu" in item.keywords and not has_npu:
            item.add_marker(pytest.mark.skip(reason="needs an Ascend NPU"))


def pytest_report_header(config):
    return ["specdec_ops benchmarks", *harness.format_environment(harness.environment(backend.default_device()))]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs (``--benchmark-save``, ``--benchmark-json``) carry the device, driver and versions."""
    machine_info["specdec_ops"] = harness.environment(backend.default_device())


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """After pytest-benchmark's tables (the host clock once the device is done), the graph groups' device time by
    events around further replays (``harness.record_device_time``): a round's share of one launch and one
    synchronize is not in these."""
    if not harness.DEVICE_TIMES:
        return
    terminalreporter.write_sep("-", "graph replays: device time per call by device events (µs)")
    width = max(len(f"{group} :: {name}") for group, name, _ in harness.DEVICE_TIMES)
    terminalreporter.write_line(f"{'group :: name'.ljust(width)}  median     p20     p80")
    for group, name, s in sorted(harness.DEVICE_TIMES, key=lambda entry: (entry[0], entry[1])):
        label = f"{group} :: {name}".ljust(width)
        terminalreporter.write_line(f"{label}  {s.median_us:6.2f}  {s.p20_us:6.2f}  {s.p80_us:6.2f}")
