"""The benchmark harness's allocator step: rows as long as asked, a pool sized for the run, exact reads."""

import torch

from benchmarks import harness


def test_allocator_step_rows_as_long_as_asked_and_the_pool_sized_for_the_run():
    device = torch.device("cpu")
    short = harness.AllocatorStep("fused", 3, 4, 16, 2, device)
    long = harness.AllocatorStep("fused", 3, 4, 16, 2, device, context_len=4096)
    assert short.alloc.max_context_len == harness.PROMPT_MAX + 4 * 3
    assert long.alloc.max_context_len == 4096
    assert long.alloc.req_to_token.shape == (4, 4096)
    assert long.alloc.num_free_slots() == short.alloc.num_free_slots()
    # Shorter than the run needs: the run's length wins.
    assert harness.AllocatorStep("fused", 3, 4, 16, 2, device, context_len=8).alloc.max_context_len == 76
    for _ in range(2):  # each call checks its slots against the reference read of the table
        assert torch.equal(long.checked_call()[0], short.checked_call()[0])
