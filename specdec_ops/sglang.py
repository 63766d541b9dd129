"""SGLang's tensors in this library's form, where the two differ (README, "Where SGLang differs").

Pure PyTorch on the tensors' device: no host sync, so a CUDA/NPU graph can capture it (a few small device ops).
"""

from __future__ import annotations

import torch

from .checks import INDEX_DTYPES, check_count, check_dense, type_name

__all__ = ["tree_accept_from_sglang"]


def tree_accept_from_sglang(
    accept_index: torch.Tensor, accept_length: torch.Tensor, draft_token_num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's tree verification outputs as :meth:`DraftCacheAllocator.commit_tree`'s ``(accept_index,
    accept_lens)``.

    SGLang's verify gives ``accept_index`` ``[bs, spec_steps + 1]``: indices into the batch's flattened trees
    (``i * draft_token_num + node``, -1 past the path), the root first; and ``accept_length`` ``[bs]``: the draft
    tokens accepted, the root not counted. ``commit_tree`` takes ``[bs, T]`` request-local nodes (``T =
    draft_token_num``) and the positions committed, the root counted.

    Args:
        accept_index: SGLang's ``[bs, w]`` int32/int64 tensor, ``w <= draft_token_num``.
        accept_length: SGLang's ``[bs]`` int32/int64 tensor, on the same device.
        draft_token_num: the tree's nodes per request (``T``), as SGLang's ``draft_token_num``.

    Returns:
        ``(index, accept_lens)``: ``index`` ``[bs, T]`` of ``accept_index``'s dtype, ``accept_index[i, m] - i * T``
        where that entry is not negative and -1 elsewhere (the columns past ``w`` too), and ``accept_lens =
        accept_length + 1``. Values are not checked (no sync): ``commit_tree`` stops a path at its first entry that
        is no node of the window, and ``validate=True`` there names it.
    """
    tree = check_count("draft_token_num", draft_token_num)
    for name, tensor, dims in (("accept_index", accept_index, 2), ("accept_length", accept_length, 1)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type_name(tensor)}")
        check_dense(name, tensor)
        if tensor.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
        if tensor.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")
    bs, width = accept_index.shape
    if accept_length.shape[0] != bs:
        raise ValueError(f"accept_length has {accept_length.shape[0]} elements but accept_index has {bs} rows")
    if accept_length.device != accept_index.device:
        raise ValueError(
            f"accept_length must be on the device of accept_index ({accept_index.device}), got {accept_length.device}"
        )
    if width > tree:
        raise ValueError(f"accept_index must have at most draft_token_num = {tree} columns, got {width}")
    base = torch.arange(bs, device=accept_index.device, dtype=accept_index.dtype)[:, None] * tree
    index = torch.full((bs, tree), -1, dtype=accept_index.dtype, device=accept_index.device)
    index[:, :width] = torch.where(accept_index >= 0, accept_index - base, -1)
    return index, accept_length + 1
