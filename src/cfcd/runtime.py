"""Runtime helpers shared by extraction, training, search and the server.

One place for: the device a command runs on, the torchrun process group, the precision
vocabulary (``fp32``/``bf16``/``fp16``) and its autocast, progress bars, and JSON-plain values.
Importing this module does not import torch; each function imports it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Any

from cfcd.errors import InputError

# --------------------------------------------------------------------------- device


def resolve_device(requested: Any = None, *, local_rank: int = 0):
    """``None``/``"auto"``: CUDA when available (else MPS, else CPU); ``"cuda"`` under torchrun is
    ``cuda:LOCAL_RANK``. An unavailable or unknown device is a clear :class:`InputError`."""
    import torch

    if isinstance(requested, torch.device):
        return requested
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            requested = "cuda"
        else:
            mps = getattr(torch.backends, "mps", None)
            return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {requested!r}: expected cpu, cuda or cuda:N ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: CUDA is not available on this machine")
        if dev.index is None and local_rank:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


# --------------------------------------------------------------------------- precision

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str | None):
    """``fp32``/``none``/None -> None (no autocast); ``bf16``/``fp16`` -> the torch dtype."""
    import torch

    key = "fp32" if precision in (None, False, "none", "fp32") else str(precision)
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if key not in table:
        raise InputError(f"unknown precision {precision!r} (expected fp32, bf16 or fp16)")
    return table[key]


def precision_name(dtype) -> str:
    """The inverse of :func:`autocast_dtype`: None -> fp32, bfloat16 -> bf16, float16 -> fp16."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device_type: str, precision: str | None):
    """``torch.autocast`` for ``bf16``/``fp16``, a no-op context for fp32."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


# --------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class DistInfo:
    """This process in the torchrun group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        barrier()

    def close(self) -> None:
        destroy(self)


def init_distributed(device: Any = None, *, timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> DistInfo:
    """Join the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; idempotent):
    NCCL on CUDA, gloo on the CPU. Without torchrun the same code runs in one process."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank) if world > 1 else "0"))
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local_rank, dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        info.initialised_here = True
    if dist.is_initialized():
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def destroy(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------- progress and JSON


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, *, enabled: bool = True, desc: str = "", unit: str = "img", initial: int = 0):
    """A tqdm bar on stderr, or a no-op with the same methods. Below 1 item/s tqdm shows s/item."""
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def jsonable(value: Any, *, finite: bool = False) -> Any:
    """A JSON-plain copy: mappings, lists, numbers, strings; objects with ``to_dict`` converted,
    numpy scalars/arrays to numbers/lists, anything else to ``str``. ``finite=True`` turns NaN and
    infinities into None (strict JSON, what a browser's ``JSON.parse`` accepts)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, finite=finite) for v in value]
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist(), finite=finite)
    return json.loads(json.dumps(value, default=str))
