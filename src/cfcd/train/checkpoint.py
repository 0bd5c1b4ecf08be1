"""Training checkpoints: everything needed to continue a killed run exactly.

One file per epoch, ``<out>/checkpoints/epoch_XXXX.pt`` (and ``last.pt`` for mid-epoch saves),
written with ``torch.save`` to a temporary file and renamed, and read back with
``torch.load(weights_only=True)``: only tensors and plain containers are stored (RNG states as
tensors, the sampler state as ints). ``model_state`` holds the model **and** the loss head's
parameters under ``desc_cls.*``, the layout of the official CFCD/DOLG ``.pyth`` files, so
``cfcd.models.load_checkpoint_state``/``load_weights`` read ours and theirs the same way
(stage 2 starts from either).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfcd.errors import InputError
from cfcd.utils.io import atomic_open

FORMAT = "cfcd-train-checkpoint"
FORMAT_VERSION = 1
HEAD_PREFIX = "desc_cls."
_EPOCH_RE = re.compile(r"^epoch_(\d{4,})\.pt$")


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, python) as tensors."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (``format``/``version`` added)."""
    path = Path(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``; :class:`InputError` if it is not one."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 - truncated file, pickle with code objects, ...
        raise InputError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not a cfcd training checkpoint (no format {FORMAT!r})")
    if int(ckpt.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt['version']} is newer than this cfcd")
    return ckpt


def epoch_path(out_dir: str | os.PathLike, epoch: int) -> Path:
    """Checkpoint after ``epoch`` completed epochs (1-based in the name, as the reference)."""
    return Path(out_dir) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _EPOCH_RE.match(p.name)))
    return [p for _, p in found]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the most training steps: ``last.pt`` (mid-epoch) or the newest epoch."""
    candidates = list_checkpoints(out_dir)
    last = Path(out_dir) / "checkpoints" / "last.pt"
    best, best_step = None, -1
    for p in candidates[-1:] + ([last] if last.is_file() else []):
        try:
            step = int(load_checkpoint(p)["global_step"])
        except InputError:
            continue  # a torn file cannot exist (atomic writes) but a foreign one can
        if step > best_step:
            best, best_step = p, step
    return best


def prune_checkpoints(out_dir: str | os.PathLike, keep_every: int) -> None:
    """Keep the newest epoch checkpoint and every ``keep_every``-th (reference: 5, 10, ...)."""
    ckpts = list_checkpoints(out_dir)
    for p in ckpts[:-1]:
        n = int(_EPOCH_RE.match(p.name).group(1))
        if keep_every <= 0 or n % keep_every:
            p.unlink(missing_ok=True)


def split_head_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``model_state`` -> (model keys, head keys without the ``desc_cls.`` prefix)."""
    model, head = {}, {}
    for k, v in state.items():
        if k.startswith(HEAD_PREFIX):
            head[k[len(HEAD_PREFIX):]] = v
        else:
            model[k] = v
    return model, head
