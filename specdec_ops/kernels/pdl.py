"""Programmatic dependent launches (CUDA, compute capability 9.0 and up; see ``backend.supports_pdl``).

The two calls exist in Triton's CUDA extras only. triton-ascend has none, and Triton resolves every name a kernel
mentions, even under a false constexpr: so kernels call these two, which are no-ops where the extras are missing
(where PDL is never asked for). Kernels call ``start``, which makes the two calls a level asks for.

A kernel that waits (``wait``) before its first access to memory is ordered as an ordinary launch after the kernel
before it, whatever that one is. The constexpr ``PDL`` is a level (``backend.pdl_level``): 0 off, 1 wait only, 2
wait and then call ``launch_dependents``, so that the next kernel of the stream may start (and wait in turn) while
this one runs; when it starts, every kernel before this one has ended. The first launch of two always calls it after
its wait, so the second launch may load what the kernels before the first wrote before its own wait. The host picks
the level: the allocator's launches that give branches (tree drafts, ``alloc_branches``) and the ops' past 4096
requests only wait (docs/design.md, "Every launch a programmatic dependent one").

The kernels that callers predating ``PDL`` launch (such as the reference Ascend checker in ``../shared/tools``)
default it to false (0), as their last parameter; the kernels of ragged windows in two launches, newer than it,
take it without a default. The library itself always passes it (``tests/test_pdl.py`` checks every launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


if gdc_wait is None:

    @triton.jit
    def wait():
        pass

    @triton.jit
    def launch_dependents():
        pass

else:

    @triton.jit
    def wait():
        """Wait for the previous kernel of the stream to end (its writes visible)."""
        gdc_wait()

    @triton.jit
    def launch_dependents():
        """Let the next kernel of the stream, a programmatic dependent launch, start."""
        gdc_launch_dependents()


@triton.jit
def start(LEVEL: tl.constexpr):
    """The start of a kernel launched at PDL ``LEVEL`` (>= 1): wait for the kernel before it to end, then, at level 2,
    let the next kernel of the stream start. A first launch of two passes 2 at any level."""
    wait()
    if LEVEL > 1:
        launch_dependents()
