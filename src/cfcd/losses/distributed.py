"""Small torch.distributed helpers for losses whose statistics span the global batch.

Every helper branches on ``torch.distributed.is_initialized()`` (not on a config flag), so the
same loss module runs unchanged in a single process, under ``torchrun``/DDP, or in a spawned
test. Gathers concatenate in rank order, which is what the CFCD reference does with
``all_gather`` + ``torch.cat``; the local batches may have different sizes (the last batch of an
epoch often does), which the reference silently does not support.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "gather_sizes", "all_gather_cat"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (1 when torch.distributed is unavailable or not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


@torch.no_grad()
def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """The leading sizes of every rank's local tensor, in rank order (one tiny all_gather)."""
    ws = world_size(group)
    if ws == 1:
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(out, mine, group=group)
    return [int(s.item()) for s in out]


@torch.no_grad()
def all_gather_cat(
    x: Tensor, sizes: list[int] | None = None, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order. No gradient flows back.

    ``sizes`` (from :func:`gather_sizes`) lets callers that gather several tensors of the
    same batch pay for the size exchange once. Unequal sizes are handled by padding to the
    largest and trimming, so the result is exactly ``torch.cat([x_rank0, x_rank1, ...])``.
    """
    ws = world_size(group)
    if ws == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    if len(sizes) != ws:
        raise ValueError(f"all_gather_cat: got {len(sizes)} sizes for a world of {ws} ranks")
    x = x.detach().contiguous()
    biggest = max(sizes)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    out = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(out, x, group=group)
    return torch.cat([chunk[:n] for chunk, n in zip(out, sizes)], dim=0)
