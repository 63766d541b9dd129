"""Programmatic dependent launches (PDL): on CUDA with compute capability 9.0 and up every kernel is launched as a
programmatic dependent of the kernel before it in the stream and waits for that one to end before it touches anything
that one may write (``backend.supports_pdl``; the second launch of two loads its own requests first, after a first
launch that waited). Everywhere else no launch asks for it."""

from __future__ import annotations

import random
import re

import pytest
import torch
from test_allocator import assert_same_runs, snapshot
from triton.runtime.jit import JITFunction

import specdec_ops
from specdec_ops import allocator as allocator_module
from specdec_ops import backend
from specdec_ops import ops as ops_module
from specdec_ops.kernels import allocator as allocator_kernels
from specdec_ops.kernels import cache_locs as cache_locs_kernels

# The first of two launches: they let the second start at any level of PDL.
FIRST_LAUNCHES = {"_count_pops_kernel", "_commit_tree_count_kernel", "_window_tile_sums_kernel"}
# Kernels that give branches (and the allocation kernels with BRANCH): launched to wait only (level 1).
GIVE_BRANCHES = {"_alloc_branches_kernel"}
KERNELS = {
    name
    for module in (allocator_kernels, cache_locs_kernels)
    for name, value in vars(module).items()
    if isinstance(value, JITFunction) and name.endswith("_kernel")
}


def exercise(device: str, monkeypatch) -> tuple[list[torch.Tensor], dict]:
    """Every kernel of the library at least once: the ops (and a CacheLocsWrapper), then a paged allocator through
    prefill, chain and tree steps in one and two launches, plan/run calls, branch releases, frees with a prefix kept
    and the prefix's release. Returns every output (on the CPU) and the allocator's final state."""
    rng = random.Random(0)
    outputs = []
    table = torch.randperm(40 * 64, generator=torch.Generator().manual_seed(0)).view(40, 64).to(torch.int32).to(device)
    rows = torch.tensor([rng.randrange(40) for _ in range(20)], device=device)
    starts = torch.tensor([rng.randrange(1, 30) for _ in range(20)], device=device)
    ends = starts + torch.tensor([rng.randrange(0, 9) for _ in range(20)], device=device)
    outputs.append(specdec_ops.get_last_loc(table, rows, starts))
    outputs.append(specdec_ops.assign_extend_cache_locs(table, rows, starts, ends))
    outputs.append(specdec_ops.assign_extend_cache_locs(table, rows, starts, None, window_len=3))
    outputs += specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, starts, ends)
    wrapper = specdec_ops.CacheLocsWrapper(table)
    wrapper.plan(rows, starts, window_len=4)
    outputs += wrapper.run()
    with monkeypatch.context() as m:  # ragged windows in two launches, as past 4096 requests in a graph
        m.setattr(ops_module, "_RAGGED_ONE_LAUNCH_MAX_BATCH", 8)
        m.setattr(ops_module, "_ragged_in_two_launches", lambda bs, window_len, device: window_len is None)
        outputs.append(specdec_ops.assign_extend_cache_locs(table, rows, starts, ends))
        outputs += specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, starts, ends)

    topk, steps, tree = 2, 3, 4
    alloc = specdec_ops.DraftCacheAllocator(16 * 600, 24, 256, page_size=16, device=device)
    reqs = alloc.add_requests([rng.randrange(16, 60) for _ in range(20)])
    outputs += alloc.alloc_draft(reqs, 4)
    accept = torch.tensor([rng.randrange(0, 5) for _ in range(20)], device=device)
    alloc.commit(reqs, accept)
    outputs += alloc.alloc_draft(reqs, 4)
    outputs += alloc.commit_and_draft(reqs, accept, 4)
    with monkeypatch.context() as m:  # the two launches of commit_and_draft past one program
        m.setattr(allocator_module.DraftCacheAllocator, "_in_two_launches", lambda self, *a: True)
        outputs += alloc.commit_and_draft(reqs, accept, 4)
    step = specdec_ops.DraftStepWrapper(alloc)
    step.plan(reqs, 4, accept_lens=accept)
    step.commit()
    outputs += step.alloc_draft()
    alloc.commit(reqs, accept)
    index = torch.tensor([[0, 1, -1, -1]] * 20, device=device)
    outputs += alloc.alloc_tree_draft(reqs, tree, topk, steps)
    outputs += alloc.commit_tree(reqs, index, accept, keep_branches=True)
    outputs += alloc.alloc_tree_draft(reqs, tree, topk, steps)
    with monkeypatch.context() as m:  # the tree step in one launch (one program: 4 requests)
        m.setattr(allocator_module.DraftCacheAllocator, "_tree_step_launch_choice", lambda self, *a: (True, True))
        outputs += alloc.commit_tree_and_draft(reqs[:4], index[:4], accept[:4], tree, topk, steps)
    for counts in (False, True):  # past one launch: the commit, then the draft; or the counted commit first
        with monkeypatch.context() as m:
            m.setattr(allocator_module.DraftCacheAllocator, "_tree_step_launch_choice", lambda self, *a: (False, False))
            m.setattr(allocator_module.DraftCacheAllocator, "_tree_step_counts", lambda self, *a, c=counts: c)
            outputs += alloc.commit_tree_and_draft(reqs, index, accept, tree, topk, steps)
    alloc.release_branches(reqs)
    outputs += alloc.alloc_branches(reqs, topk, steps)
    alloc.commit_tree(reqs, index, accept)
    outputs.append(alloc.free_requests(reqs[:5], keep_lens=[16] * 5))
    prefix = outputs[-1].view(5, 16)
    outputs.append(alloc.add_requests([20] * 5, prefix_slots=prefix, prefix_lens=[16] * 5))
    alloc.free_requests(alloc.rows_in_use())
    alloc.release_slots(prefix.flatten())
    return [t.cpu() for t in outputs], snapshot(alloc)


def record_launches(monkeypatch) -> list[tuple[str, dict]]:
    """(kernel name, constexprs) of every launch through ``backend.launch`` from here on."""
    made = []
    launch = backend.launch

    def record(kernel, grid, device, tensors, scalars, constexprs, num_warps):
        made.append((kernel.__name__, dict(constexprs)))
        return launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)

    monkeypatch.setattr(backend, "launch", record)
    return made


def test_every_kernel_takes_pdl_and_asks_for_it_only_where_the_device_has_it(monkeypatch):
    """On the CPU no launch asks for PDL; every kernel is launched (so every launch site names the constexpr)."""
    made = record_launches(monkeypatch)
    exercise("cpu", monkeypatch)
    assert {name for name, _ in made} == KERNELS
    assert all(constexprs["PDL"] == 0 for _, constexprs in made)


def test_calls_up_to_4096_requests_let_the_next_kernel_start(monkeypatch):
    """Where PDL is on (faked here, launches recorded, not run): the ops ask for level 2 (wait, then let the next kernel
    start) up to ops._NEXT_EARLY_MAX_BATCH requests and for level 1 (only wait) past it, every launch of a call alike;
    the allocator asks for 2, and for 1 where a launch gives branches (tree drafts, ``alloc_branches``)."""
    monkeypatch.setattr(backend, "supports_pdl", lambda device: True)
    made = []
    monkeypatch.setattr(backend, "launch", lambda kernel, grid, device, *args: made.append(dict(args[-2])["PDL"]))
    table = torch.zeros(8, 64, dtype=torch.int32)
    most = ops_module._NEXT_EARLY_MAX_BATCH
    for bs, level in ((1, 2), (most, 2), (most + 1, 1)):
        rows = torch.zeros(bs, dtype=torch.int64)
        starts = torch.ones(bs, dtype=torch.int64)
        made.clear()
        specdec_ops.get_last_loc(table, rows, starts)
        specdec_ops.assign_extend_cache_locs(table, rows, starts, None, window_len=2)
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, starts, starts + 2, num_tokens=2 * bs)
        assert len(made) >= 3 and set(made) == {level}, (bs, made)
    made.clear()
    alloc = specdec_ops.DraftCacheAllocator(4096, 4, 256, page_size=16)
    rows = alloc.add_requests([5, 9])
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, [1, 2])
    alloc.alloc_tree_draft(rows, 4, 2, 3)
    alloc.alloc_branches(rows, 2, 3)
    # add_requests, alloc_draft, commit: 2; the tree draft and alloc_branches, which give branches: 1
    assert made == [2, 2, 2, 1, 1], made


@pytest.mark.gpu
def test_gpu_every_launch_is_programmatic_on_hopper_and_gives_what_it_gives_without(monkeypatch):
    """Compute capability 9.0 and up: every launch of every kernel asks for PDL, and its compiled launcher is a
    programmatic dependent one; results and allocator state are those of launches without it, call for call."""
    device = torch.device("cuda", torch.cuda.current_device())
    pdl = torch.cuda.get_device_capability(device)[0] >= 9
    assert backend.supports_pdl(device) == pdl
    made = record_launches(monkeypatch)
    with_pdl = exercise("cuda", monkeypatch)
    assert {name for name, _ in made} == KERNELS
    # Every call here is a small batch: each launch waits, then lets the next kernel start (level 2), but those that
    # give branches, which only wait (level 1).
    for name, constexprs in made:
        branches = bool(constexprs.get("BRANCH")) or name in GIVE_BRANCHES
        assert constexprs["PDL"] == ((1 if branches else 2) if pdl else 0), name
    checked = set()
    for key, (kernel, compiled) in backend._compiled.items():
        name, constexprs = kernel.__name__, dict(key[2])
        if name not in KERNELS:
            continue
        assert compiled.metadata.launch_pdl == bool(constexprs["PDL"]), name
        if constexprs["PDL"]:
            lets_next_start = name in FIRST_LAUNCHES or constexprs["PDL"] > 1
            assert_waits_first(name, compiled.asm["ptx"], constexprs.get("SUMS", 0), lets_next_start)
            checked.add(name)
    assert checked == (KERNELS if pdl else set())
    made.clear()
    monkeypatch.setattr(backend, "supports_pdl", lambda device: False)
    without = exercise("cuda", monkeypatch)
    assert not any(constexprs["PDL"] for _, constexprs in made)
    assert len(with_pdl[0]) == len(without[0])
    assert_same_runs(with_pdl, without)


def assert_waits_first(name: str, ptx: str, sums: int, lets_next_start: bool) -> None:
    """In the PTX of a PDL kernel nothing touches global memory before its first ``griddepcontrol.wait``, except that
    the second launch of two (``SUMS``) loads (never stores) first; no ``cp.async`` anywhere (Triton's software
    pipeliner may move such loads above a wait inside a loop: triton-lang/triton issue 11905). The kernel lets the
    next one start (``griddepcontrol.launch_dependents``) only after that wait, and exactly where
    ``lets_next_start``: a first launch of two always, others at ``PDL`` 2."""
    assert "griddepcontrol.wait" in ptx, name
    assert "cp.async" not in ptx, name
    before = ptx.split("griddepcontrol.wait", 1)[0]
    assert not re.search(r"\b(st|atom|red)\.global", before), name
    if not sums:
        assert "ld.global" not in before, name
    assert "griddepcontrol.launch_dependents" not in before, name
    assert ("griddepcontrol.launch_dependents" in ptx) == lets_next_start, name


def _late_writer_kernel():
    """A kernel that lets the next one start at once (as a PDL-aware kernel of another library may), then spins for
    ``delay_ns`` and only then writes ``dst[:n] = src[:n]``; None without Triton's CUDA extras."""
    import triton
    import triton.language as tl

    try:
        from triton.language.extra.cuda import gdc_launch_dependents, globaltimer
    except ImportError:
        return None

    @triton.jit
    def late_writer(dst, src, n, delay_ns, BLOCK: tl.constexpr):
        gdc_launch_dependents()
        start = globaltimer()
        now = start
        while now - start < delay_ns:
            now = globaltimer()
        offs = tl.arange(0, BLOCK)
        values = tl.load(src + offs, mask=offs < n)
        # The values depend on the loop's last clock reading, so the store cannot move above the loop.
        tl.store(dst + offs, tl.where(now - start >= delay_ns, values, -1), mask=offs < n)

    return late_writer


@pytest.mark.gpu
def test_gpu_a_kernel_waits_for_the_one_before_even_when_that_one_lets_it_start_early():
    """The kernel before ours signals its dependents at its start (``gdc_launch_dependents``), then writes our inputs
    200 us later: a PDL launch that read before waiting would see the old values. Checked for the fused op, a
    commit (which reads the accept lengths) and a commit_and_draft. Fails if the kernels' wait is removed."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs compute capability 9.0 (programmatic dependent launches)")
    writer = _late_writer_kernel()
    if writer is None:
        pytest.skip("this Triton has no gdc_launch_dependents/globaltimer")
    rng = random.Random(1)
    bs, n = 64, 4
    table = torch.randperm(128 * 256, device="cuda").view(128, 256).to(torch.int32)
    rows = torch.randperm(128, device="cuda")[:bs]
    new_starts = torch.tensor([rng.randrange(1, 200) for _ in range(bs)], device="cuda")
    starts = torch.zeros(bs, dtype=torch.int64, device="cuda")
    alloc = specdec_ops.DraftCacheAllocator(16 * 1000, bs, 512, page_size=16)
    reqs = alloc.add_requests([rng.randrange(1, 100) for _ in range(bs)])
    new_accept = torch.tensor([rng.randrange(1, n + 1) for _ in range(bs)], device="cuda")
    accept = torch.zeros(bs, dtype=torch.int64, device="cuda")
    for trial in range(3):
        starts.zero_()
        torch.cuda.synchronize()
        writer[(1,)](starts, new_starts, bs, 200_000, BLOCK=bs)
        out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, starts, None, window_len=n)
        expected = table[rows[:, None], new_starts[:, None] + torch.arange(n, device="cuda")].flatten().long()
        assert torch.equal(out, expected), trial
        assert torch.equal(last, table[rows, new_starts - 1].long()), trial
        for call in ("commit", "commit_and_draft"):
            alloc.alloc_draft(reqs, n)
            seq = alloc.seq_lens[reqs].clone()
            accept.zero_()
            torch.cuda.synchronize()
            writer[(1,)](accept, new_accept, bs, 200_000, BLOCK=bs)
            if call == "commit":
                alloc.commit(reqs, accept)
            else:
                alloc.commit_and_draft(reqs, accept, n)
            torch.cuda.synchronize()
            assert torch.equal(alloc.seq_lens[reqs], seq + new_accept), (trial, call)
            if call == "commit_and_draft":
                alloc.commit(reqs, torch.zeros_like(accept))


@pytest.mark.gpu
def test_gpu_ragged_two_launches_wait_for_the_kernel_before_the_first(monkeypatch):
    """Ragged windows in two launches: the tile sums wait for the kernel before them, and the gather for the sums.
    The kernel before signals its dependents at its start and writes the windows' ends 200 us later: the result
    must be that of the final ends. Fails if the first launch's wait is removed."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs compute capability 9.0 (programmatic dependent launches)")
    writer = _late_writer_kernel()
    if writer is None:
        pytest.skip("this Triton has no gdc_launch_dependents/globaltimer")
    monkeypatch.setattr(ops_module, "_RAGGED_ONE_LAUNCH_MAX_BATCH", 8)
    monkeypatch.setattr(ops_module, "_ragged_in_two_launches", lambda bs, window_len, device: window_len is None)
    made = record_launches(monkeypatch)
    rng = random.Random(4)
    bs = 256
    table = torch.randperm(512 * 128, device="cuda").view(512, 128).to(torch.int32)
    rows = torch.randperm(512, device="cuda")[:bs]
    starts = torch.tensor([rng.randrange(0, 100) for _ in range(bs)], device="cuda")
    new_ends = starts + torch.tensor([rng.randrange(0, 17) for _ in range(bs)], device="cuda")
    num_tokens = int((new_ends - starts).sum())
    ends = starts.clone()
    out = torch.full((num_tokens,), -7, dtype=torch.int64, device="cuda")
    for trial in range(3):
        ends.copy_(starts)
        out.fill_(-7)
        torch.cuda.synchronize()
        made.clear()
        writer[(1,)](ends, new_ends, bs, 200_000, BLOCK=bs)
        got, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            table, rows, starts, ends, out, num_tokens=num_tokens
        )
        torch.cuda.synchronize()
        assert [name for name, _ in made] == [
            "_window_tile_sums_kernel",
            "_get_last_loc_and_assign_extend_cache_locs_from_sums_kernel",
        ]
        want = specdec_ops.reference.get_last_loc_and_assign_extend_cache_locs_torch(table, rows, starts, new_ends)
        assert torch.equal(got, want[0]) and torch.equal(last, want[1]), trial


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["chain", "tree"])
def test_gpu_two_launches_wait_for_the_kernel_before_the_first(path, monkeypatch):
    """The two launches of a step past one program: the first waits for the kernel before it and only then lets the
    second start, whose programs load their own requests before their own wait. The kernel before signals its
    dependents at its start and writes, 200 us later, what the second launch loads early: the accept lengths
    (chain: ``commit_and_draft`` counted), the rows in another order (tree: ``commit_tree_and_draft`` counted).
    The result must be that of a twin allocator given the final values directly. (The first trial may compile
    inside the window; the later ones do not.)"""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs compute capability 9.0 (programmatic dependent launches)")
    writer = _late_writer_kernel()
    if writer is None:
        pytest.skip("this Triton has no gdc_launch_dependents/globaltimer")
    bs, n, topk, steps, tree = 64, 4, 2, 3, 4
    rng = random.Random(2)
    prompts = [rng.randrange(16, 100) for _ in range(bs)]
    twins = [specdec_ops.DraftCacheAllocator(16 * 4000, bs, 1024, page_size=16) for _ in range(2)]
    rows = [alloc.add_requests(prompts) for alloc in twins]
    perm = rows[0][torch.randperm(bs, generator=torch.Generator().manual_seed(3)).cuda()]
    index = torch.tensor([[0, 1, -1, -1]] * bs, device="cuda")
    accept = torch.tensor([rng.randrange(0, n + 1) for _ in range(bs)], device="cuda")
    cls = allocator_module.DraftCacheAllocator
    if path == "chain":
        monkeypatch.setattr(cls, "_in_two_launches", lambda self, *a: True)
    else:
        monkeypatch.setattr(cls, "_tree_step_launch_choice", lambda self, *a: (False, False))
        monkeypatch.setattr(cls, "_tree_step_counts", lambda self, *a: True)
    made = record_launches(monkeypatch)
    for alloc, r in zip(twins, rows):
        if path == "chain":
            alloc.alloc_draft(r, n)
        else:
            alloc.alloc_tree_draft(r, tree, topk, steps)
    for trial in range(3):
        late = torch.zeros_like(accept) if path == "chain" else rows[0].clone()
        torch.cuda.synchronize()
        made.clear()
        if path == "chain":
            writer[(1,)](late, accept, bs, 200_000, BLOCK=bs)
            got = twins[0].commit_and_draft(rows[0], late, n)
            want = twins[1].commit_and_draft(rows[1], accept, n)
        else:
            writer[(1,)](late, perm, bs, 200_000, BLOCK=bs)
            got = twins[0].commit_tree_and_draft(late, index, accept, tree, topk, steps)
            want = twins[1].commit_tree_and_draft(perm, index, accept, tree, topk, steps)
        torch.cuda.synchronize()
        first = "_count_pops_kernel" if path == "chain" else "_commit_tree_count_kernel"
        assert [name for name, _ in made][:2] == [first, "_alloc_windows_kernel"] and made[1][1]["SUMS"]
        assert len(got) == len(want)  # (zip's strict= needs Python 3.10; the project supports 3.9)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (path, trial)
    assert_same_runs(([], snapshot(twins[0])), ([], snapshot(twins[1])))
