"""The README's Python examples run as printed, on the CPU through the interpreter, and do what their comments say.

Each example is found in README.md by its first line and run with ``exec`` in the namespace of the examples before it
in the README's order, as a reader would paste them. Names an example uses but does not define (the engine's
``batch_rows``, ``accepted``, ``paths``; the loop's ``decoding``) come from the setup given with it below. An example
the README no longer has, or one that changed its first line, fails here: edit both together.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

import specdec_ops
from specdec_ops import reference

README = Path(__file__).resolve().parents[1] / "README.md"


def example(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"README.md has {len(found)} python examples starting with {first_line!r}"
    return found[0]


def run(code: str, namespace: dict) -> str:
    """``code`` run in ``namespace``; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    return printed.getvalue()


class Steps:
    """``while decoding:`` for ``count`` iterations."""

    def __init__(self, count: int) -> None:
        self.left = count

    def __bool__(self) -> bool:
        self.left -= 1
        return self.left >= 0


def test_the_api_example_prints_what_its_comment_says():
    code = example("import torch, specdec_ops")
    printed = run(code, {})
    said = re.search(r"print\(.*\)\s*#\s*(.*)$", code, re.M).group(1)
    assert printed.strip() == said.strip()


def test_the_allocator_examples_run_in_order_and_keep_the_pool_whole():
    ns: dict = {"torch": torch, "specdec_ops": specdec_ops}
    run(example("alloc = specdec_ops.DraftCacheAllocator("), ns)
    alloc = ns["alloc"]
    total = alloc.num_free_slots()
    assert alloc.num_requests == 0  # the loop example ends by freeing its requests

    # The prefix cache: the README's text before it has request 0 alive with 100 tokens.
    ns["rows"] = alloc.add_requests([100, 37])
    run(example("kept = alloc.free_requests(rows[:1], keep_lens=[96])"), ns)
    kept = ns["kept"]
    assert kept.numel() == 96
    assert alloc.num_cached_slots() == 0  # released: the pages went back to the pool
    alloc.free_requests(ns["rows"][1:])
    assert (alloc.num_requests, alloc.num_free_slots()) == (0, total)

    # Tree drafts in three launches, then in two, then the one-call tree step.
    ns["rows"] = alloc.add_requests([100, 37])
    run(example("slots, copy_src, copy_dst = alloc.alloc_branches(rows, 4, 5, return_copies=True)"), ns)
    seq_before = alloc.seq_lens[ns["rows"]].tolist()
    assert seq_before == [103, 39]  # accept_lens [3, 2] past prompts of 100 and 37
    kv_src, kv_dst = ns["kv_src"], ns["kv_dst"]
    assert kv_src.numel() == kv_dst.numel() == 2 * 8  # a pair per tree node: bs * T
    run(example("out_cache_loc, last_loc, slots, copy_src, copy_dst = alloc.alloc_tree_draft(rows, 8, 4, 5)  #"), ns)
    assert alloc.seq_lens[ns["rows"]].tolist() == [106, 41]
    ns["decoding"] = Steps(2)
    run(example("out_cache_loc, last_loc, slots, copy_src, copy_dst = alloc.alloc_tree_draft(rows, 8, 4, 5)\n"), ns)
    assert alloc.seq_lens[ns["rows"]].tolist() == [112, 45]  # two more tree commits of [3, 2] nodes
    alloc.free_requests(ns["rows"])
    assert (alloc.num_requests, alloc.num_free_slots()) == (0, total)


def test_the_plan_run_examples_match_the_calls_they_stand_for():
    alloc = specdec_ops.DraftCacheAllocator(num_slots=4096, max_requests=8, max_context_len=512, page_size=16)
    twin = specdec_ops.DraftCacheAllocator(num_slots=4096, max_requests=8, max_context_len=512, page_size=16)
    bs, n, steps = 3, 4, 3
    prompts = [100, 37, 64]
    rows, twin_rows = alloc.add_requests(prompts), twin.add_requests(prompts)
    accepted = torch.tensor([4, 1, 2])
    ns = {
        "specdec_ops": specdec_ops,
        "alloc": alloc,
        "req_to_token": alloc.req_to_token,
        "rows": torch.zeros(bs, dtype=torch.int64),
        "seq_lens": torch.zeros(bs, dtype=torch.int64),
        "out": torch.empty(bs * n, dtype=torch.int64),
        "last": torch.empty(bs, dtype=torch.int64),
        "draft_out": torch.empty(bs * n, dtype=torch.int64),
        "draft_last": torch.empty(bs, dtype=torch.int64),
        "accept_lens": torch.zeros(bs, dtype=torch.int64),
        "bs": bs,
        "n": n,
        "steps": steps,
        "batch_rows": rows,
        "batch_seq_lens": torch.tensor(prompts),
        "accepted": accepted,
    }
    run(example("locs = specdec_ops.CacheLocsWrapper(req_to_token)"), ns)
    for _ in range(steps):  # the same loop through the methods
        want_slots, want_last = twin.alloc_draft(twin_rows, n)
        twin.commit(twin_rows, accepted)
    assert torch.equal(ns["draft_slots"], want_slots) and torch.equal(ns["draft_last_loc"], want_last)
    assert torch.equal(alloc.seq_lens, twin.seq_lens) and torch.equal(alloc.req_to_token, twin.req_to_token)
    want = reference.get_last_loc_and_assign_extend_cache_locs_torch(
        alloc.req_to_token, rows, torch.tensor(prompts), torch.tensor(prompts) + n
    )
    assert torch.equal(ns["out_cache_loc"], want[0]) and torch.equal(ns["last_loc"], want[1])

    # The tree step: plan() with accept_index, topk and num_steps.
    paths = torch.tensor([[0, 1, 3, 0], [0, 0, 0, 0], [0, 2, 0, 0]])
    ns.update(accept_index=torch.zeros(bs, n, dtype=torch.int64), paths=paths, step=specdec_ops.DraftStepWrapper(alloc))
    accept_index = paths.clone()
    accept_lens = torch.tensor([3, 1, 2])
    ns["accepted"] = accept_lens
    run(example("step.plan(rows, n, accept_lens=accept_lens, accept_index=accept_index, topk=4, num_steps=5)"), ns)
    for _ in range(steps):
        want_branches = twin.alloc_branches(twin_rows, 4, 5, return_copies=True)
        twin.alloc_draft(twin_rows, n)
        want_kv = twin.commit_tree(twin_rows, accept_index, accept_lens)
    for got, want in zip(
        (ns["branch_slots"], ns["copy_src"], ns["copy_dst"], ns["kv_src"], ns["kv_dst"]),
        (
            *want_branches,
            *want_kv,
        ),
    ):
        assert torch.equal(got, want)
    assert torch.equal(alloc.seq_lens, twin.seq_lens) and torch.equal(alloc.req_to_token, twin.req_to_token)


def test_every_python_example_of_the_readme_is_run_here():
    """No example left out: the first line of each ```python block of the README is one that a test above runs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    firsts = {block.splitlines()[0] for block in blocks}
    assert firsts == set(_RUN_FIRST_LINES)


# The first lines of the examples the tests above run (in full: example() matches a block by a prefix of them).
_RUN_FIRST_LINES = [
    "import torch, specdec_ops",
    "alloc = specdec_ops.DraftCacheAllocator(num_slots=4096, max_requests=8, max_context_len=512, page_size=16)",
    "kept = alloc.free_requests(rows[:1], keep_lens=[96])  # pages of positions [0, 96) go to the cache, not the pool",
    "slots, copy_src, copy_dst = alloc.alloc_branches(rows, 4, 5, return_copies=True)"
    "  # [bs, topk, steps] scratch slots",
    "out_cache_loc, last_loc, slots, copy_src, copy_dst = alloc.alloc_tree_draft(rows, 8, 4, 5)"
    "  # T 8, topk 4, 5 steps",
    "out_cache_loc, last_loc, slots, copy_src, copy_dst = alloc.alloc_tree_draft(rows, 8, 4, 5)",
    "locs = specdec_ops.CacheLocsWrapper(req_to_token)",
    "step.plan(rows, n, accept_lens=accept_lens, accept_index=accept_index, topk=4, num_steps=5)",
]
