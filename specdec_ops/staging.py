"""Host ints to a CUDA device without a sync, and without torch's pinned allocation per call.

``torch.tensor(values, pin_memory=True).to(device, non_blocking=True)`` builds a pageable tensor from the list,
allocates a pinned one and copies into it before the transfer: about 26 us of host time for 128 ints on an H200
host, most of it before the copy is even queued. :class:`HostStaging` keeps a ring of pinned slots instead: a call
packs the ints into the next slot (``struct.pack_into``), allocates the device tensor and queues the copy (about
10 us there). Where the device reads pinned memory at its host address (CUDA's unified addressing), kernels can
also read a slot in place (:meth:`HostStaging.stage`): no device tensor, no copy.
"""

from __future__ import annotations

import ctypes
import struct

import torch

from .bounded import remember

__all__ = ["HostStaging"]

# Slots in the ring, and calls between two events (half the ring).
_NUM_SLOTS = 16
_HALF = _NUM_SLOTS // 2
# Slot views kept (a few batch sizes per slot), and packing formats kept (by length).
_MAX_VIEWS = 16 * _NUM_SLOTS
# cuPointerGetAttribute's CU_POINTER_ATTRIBUTE_DEVICE_POINTER (the CUDA driver API).
_DEVICE_POINTER = 3


class HostStaging:
    """A ring of pinned int64 slots of ``capacity`` values each, through which host ints reach ``device`` (CUDA).

    A slot is written again only once the copy, or the kernel, that read it is done: when the ring enters one half,
    it records an event on the device's current stream for the other half (whose copies and kernels are all queued
    by then) and waits for the event recorded when it last left this half, ``_HALF`` calls earlier. So the host waits
    only when that many calls are still queued, and pays an event every ``_HALF`` calls. A slot given by
    :meth:`stage` must be read by a kernel queued before the ring's next call. Like the allocator that owns it, not
    for concurrent use from several threads; its calls must be ordered on the device as the allocator's are (one
    stream, or streams the caller orders).
    """

    __slots__ = (
        "device",
        "capacity",
        "_pinned",
        "_buffers",
        "_slots",
        "_next",
        "_events",
        "_formats",
        "_views",
        "_in_place",
    )

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self._pinned: torch.Tensor | None = None  # allocated on first use
        self._buffers: list = []
        self._slots: list[torch.Tensor] = []
        self._next = 0
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._formats: dict[int, struct.Struct] = {}
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # (slot, n) -> its first n values (slicing costs ~1 us)
        self._in_place = False  # whether the device reads the slots at their host addresses (found on first use)

    def to_device(self, values: list[int]) -> torch.Tensor | None:
        """``values`` as a new int64 tensor on the device, the copy queued on its current stream; None when they
        do not fit a slot (more than ``capacity``, or outside int64) or the stream is capturing a graph, for the
        caller to copy another way."""
        view = self._pack(values)
        if view is None:
            return None
        out = torch.empty(len(values), dtype=torch.int64, device=self.device)
        out.copy_(view, non_blocking=True)
        return out

    def stage(self, values: list[int]) -> torch.Tensor | None:
        """``values`` in the ring's next slot, as a pinned cpu int64 tensor that kernels on the device read in place
        (pass it only to kernels of the device, queued on its current stream before the ring's next call); None
        where :meth:`to_device` would give None, or where the device cannot read pinned memory at its host
        address."""
        if self._pinned is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            self._allocate()
        return self._pack(values) if self._in_place else None

    def _pack(self, values: list[int]) -> torch.Tensor | None:
        """``values`` packed into the next slot; that slot's view of them, or None (see :meth:`to_device`)."""
        n = len(values)
        if n > self.capacity or torch.cuda.is_current_stream_capturing():
            return None
        fmt = self._formats.get(n)
        if fmt is None:
            fmt = remember(self._formats, n, struct.Struct(f"={n}q"), _MAX_VIEWS)
        if self._pinned is None:
            self._allocate()
        k = self._next
        if k % _HALF == 0:
            self._fence(k // _HALF)
        try:
            fmt.pack_into(self._buffers[k], 0, *values)
        except struct.error:  # an int outside int64: the caller's copy raises as it always did
            return None
        self._next = (k + 1) % _NUM_SLOTS
        view = self._views.get((k, n))
        if view is None:
            view = remember(self._views, (k, n), self._slots[k][:n], _MAX_VIEWS)
        return view

    def _allocate(self) -> None:
        self._pinned = torch.empty(_NUM_SLOTS, self.capacity, dtype=torch.int64, pin_memory=True)
        self._slots = list(self._pinned.unbind(0))
        self._buffers = [slot.numpy() for slot in self._slots]
        self._in_place = _device_reads_in_place(self._pinned.data_ptr())

    def _fence(self, half: int) -> None:
        """Entering ``half``: mark the end of the other half's copies and kernels; wait for this half's last ones."""
        stream = torch.cuda.current_stream(self.device)
        other = self._events[1 - half]
        if other is None:
            other = self._events[1 - half] = torch.cuda.Event()
        other.record(stream)
        mine = self._events[half]
        if mine is not None and not mine.query():
            mine.synchronize()


def _device_reads_in_place(address: int) -> bool:
    """Whether CUDA maps the pinned host memory at ``address`` into the device's address space at that same address
    (unified addressing, as on every 64-bit platform CUDA supports today), so that a kernel given the host pointer
    reads it: asked of the driver (``cuPointerGetAttribute``). False where the driver cannot be asked."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    device_address = ctypes.c_uint64(0)
    result = driver.cuPointerGetAttribute(
        ctypes.byref(device_address), ctypes.c_int(_DEVICE_POINTER), ctypes.c_uint64(address)
    )
    return result == 0 and device_address.value == address
