"""torch.distributed setup for training: one process, or one per GPU/CPU worker under torchrun.

``torchrun --nproc_per_node=8 -m cfcd train --config ...`` (or ``cfcd train`` with the
environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); multi-node runs use
torchrun's own options (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``). NCCL on GPUs, gloo
on CPU. Without those variables the same code runs in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cfcd.runtime import DistInfo, barrier, destroy, init_distributed, resolve_device

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "destroy", "init_distributed", "pick_device"]


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    return resolve_device(name, local_rank=local_rank)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
