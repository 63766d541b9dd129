"""Pure-PyTorch versions of every op: vectorised (no Python loop over requests), any device.

They define the semantics the kernels are tested against and serve as the "torch" baseline of the
benchmarks. Unlike the kernels they do not guard against bad values: indices must be in range.
"""

from __future__ import annotations

import torch

__all__ = [
    "assign_extend_cache_locs_torch",
    "get_last_loc_and_assign_extend_cache_locs_torch",
    "get_last_loc_torch",
]


def get_last_loc_torch(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor
) -> torch.Tensor:
    """``req_to_token[req_pool_indices, prefix_lens - 1]`` where ``prefix_lens > 0``, else -1.

    Returns a ``[bs]`` tensor of ``prefix_lens.dtype``.
    """
    slots = req_to_token[req_pool_indices.long(), (prefix_lens.long() - 1).clamp(min=0)]
    return torch.where(prefix_lens > 0, slots.to(prefix_lens.dtype), -1)


def assign_extend_cache_locs_torch(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    *,
    num_tokens: int | None = None,
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Slots of the windows ``[start_offset, end_offset)`` packed in batch order; ``[num_tokens]`` of ``out_dtype``.

    ``num_tokens`` must be the windows' total when given; ``None`` computes it (one device→host sync).
    """
    device = req_to_token.device
    lengths = end_offset.long() - start_offset.long()
    if num_tokens is None:
        num_tokens = int(lengths.sum())
    request = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=num_tokens)
    first_token = torch.cumsum(lengths, 0) - lengths  # exclusive prefix sum
    positions = start_offset.long()[request] + torch.arange(num_tokens, device=device) - first_token[request]
    return req_to_token[req_pool_indices.long()[request], positions].to(out_dtype)


def get_last_loc_and_assign_extend_cache_locs_torch(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    *,
    num_tokens: int | None = None,
    out_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(assign_extend_cache_locs_torch(...), get_last_loc_torch(req_to_token, req_pool_indices, start_offset))``."""
    out_cache_loc = assign_extend_cache_locs_torch(
        req_to_token, req_pool_indices, start_offset, end_offset, num_tokens=num_tokens, out_dtype=out_dtype
    )
    return out_cache_loc, get_last_loc_torch(req_to_token, req_pool_indices, start_offset)
