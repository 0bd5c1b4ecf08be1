"""Which runtime runs the network of an extraction: PyTorch or onnxruntime (CPU).

Only the network (normalised B x 3 x H x W image -> B x D descriptor, what
:func:`~cfcd.extract.describe.describe_batch` calls the model for) runs in onnxruntime; decoding,
the multi-scale resizing, flip, power, mean and L2 stay shared, so the two runtimes differ only in
the forward call.

* ``auto`` (the command line's default): onnxruntime on the CPU, PyTorch on a GPU and for the
  reference path (``--naive``) and autocast precisions.
* The graph is exported once per model state, cfcd version, torch version and opset, with dynamic
  batch, height and width, checked against PyTorch at a second size, and cached in
  ``<cache>/onnx/`` (``$CFCD_CACHE``, else ``$XDG_CACHE_HOME/cfcd``, else ``~/.cache/cfcd``),
  written atomically; the 8 most recently used graphs are kept.
* A model that cannot be exported with dynamic sizes (R-MAC pooling, a graph that bakes its input
  size in) runs in PyTorch, with one line saying so; the failure is remembered in the cache.
* CPU policy (measured, ``benchmarks/README.md``): batch 1; intra-op threads = the cores of this
  process's CPU set that other work leaves idle at start-up (``/proc/stat`` over 0.1 s, at least 1);
  intra-op spinning off (it keeps the threads from burning the cores that the JPEG decoding workers
  and other processes need); one decoding worker per 4 cores; torch on one thread while it
  normalises and resizes beside onnxruntime (the engine, ``_torch_threads``).
* ViT (timm's antialiased bicubic resampling of the position embedding) does not export with the
  TorchScript exporter at opset 17: it runs in torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

import cfcd
from cfcd.errors import InputError
from cfcd.models.export import export_onnx
from cfcd.models.fingerprint import model_fingerprint
from cfcd.utils.io import atomic_write_json, cache_root

RUNTIMES = ("auto", "torch", "onnx")
OPSET = 17
KEEP_GRAPHS = 8
_EXPORT_SIZE = (192, 256)  # traced at this size ...
_CHECK_SHAPE = (2, 3, 160, 224)  # ... and checked against PyTorch at another batch and size
_CHECK_COSINE = 0.99999


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str, device: str, *, mode: str = "fast", precision: str = "fp32") -> str:
    """``torch`` or ``onnx`` for an extraction on ``device``; refuses impossible explicit choices."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r} (expected one of {', '.join(RUNTIMES)})")
    cpu = str(device).split(":")[0] == "cpu"
    if runtime == "onnx":
        if not cpu:
            raise InputError(f"--runtime onnx runs on the CPU only (onnxruntime's CPU provider), not on {device}; "
                             "use --device cpu, or --runtime torch/auto")
        if mode == "naive":
            raise InputError("--naive is the PyTorch reference procedure: drop --runtime onnx")
        if precision != "fp32":
            raise InputError(f"--runtime onnx runs in fp32: drop --precision {precision}")
        if not onnxruntime_available():
            raise InputError("--runtime onnx needs onnx and onnxruntime: pip install onnx onnxruntime")
        return "onnx"
    if runtime == "torch" or not cpu or mode == "naive" or precision != "fp32":
        return "torch"
    return "onnx" if onnxruntime_available() else "torch"


# ----------------------------------------------------------------------------- execution policy


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _busy_now(seconds: float = 0.1) -> float | None:
    """Cores of this process's CPU set busy with other work now: /proc/stat sampled over ``seconds``
    (this process is idle meanwhile). None where there is no /proc/stat."""
    import time

    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if not name[3:].isdigit():
                    break
                if mine is not None and int(name[3:]) not in mine:
                    continue
                values = [int(v) for v in fields]
                total += sum(values[:8])  # guest time is already counted in user/nice
                idle += values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return total, idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cores = len(mine) if mine is not None else (os.cpu_count() or 1)
    return cores * (1.0 - (idle1 - idle0) / (total1 - total0))


def free_cores() -> int:
    """CPU cores that other work leaves free now (at least 1): /proc/stat over 0.1 s, else the
    1-minute load average (which also counts this process's own recent work)."""
    cores = usable_cores()
    busy = _busy_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average on this platform
            busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def decode_workers(requested: int) -> int:
    """Decoding processes beside onnxruntime: JPEG decoding and the thumbnail take ~12 ms per
    1024x768 photo, less than half of the network's time per core, so one worker per four cores
    keeps the network fed; more only take cores from the network's threads."""
    return min(int(requested), max(1, usable_cores() // 4)) if requested > 0 else 0


def cpu_policy() -> dict:
    """Session settings for onnxruntime on this CPU now (see the module docstring).
    ``$CFCD_ORT_THREADS`` and ``$CFCD_ORT_SPINNING`` (0/1) override them (for measuring)."""
    threads = os.environ.get("CFCD_ORT_THREADS")
    spinning = os.environ.get("CFCD_ORT_SPINNING")
    return {"threads": int(threads) if threads else free_cores(), "spinning": spinning == "1"}


# ----------------------------------------------------------------------------- the cached graph


def graph_key(model) -> tuple[str, dict]:
    """The cache key of the model's graph and what it hashes: model config and state, versions, opset."""
    import torch


    fingerprint = model_fingerprint(model, None)
    what = {
        "config": fingerprint["config"],
        "state_sha256": fingerprint["state_sha256"],
        "embedding_dim": fingerprint["embedding_dim"],
        "cfcd": cfcd.__version__,
        "torch": torch.__version__.split("+")[0],
        "opset": OPSET,
        "exporter": "torchscript, dynamic batch/height/width",
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], what


def graph_dir(cache: str | os.PathLike | None = None) -> Path:
    return cache_root(cache) / "onnx"


def _model_name(model) -> str:
    config = getattr(model, "model_config", None)
    name = config.get("name") if isinstance(config, dict) else None
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name or type(model).__name__))[:48]


def _check_export(model, path: Path) -> None:
    """Raise if the dynamic graph differs from PyTorch at a batch and size other than the traced ones."""
    import onnxruntime as ort
    import torch

    x = torch.randn(*_CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).float().numpy()
    if got.shape != ref.shape:
        raise ValueError(f"output {got.shape} at input {tuple(x.shape)}, PyTorch gives {ref.shape}")
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    if not np.all(cos >= _CHECK_COSINE):
        raise ValueError(f"cosine {float(cos.min()):.6f} to PyTorch at input {tuple(x.shape)} (the graph bakes its size in)")


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (C++ prints too), restored after."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _prune(directory: Path, keep: int) -> None:
    """Keep the ``keep`` most recently used graphs. Hidden names are exports in progress (another
    process's temporary files) and a graph may vanish under us: both are left alone."""
    def used(path: Path) -> float:
        with contextlib.suppress(FileNotFoundError):
            return path.stat().st_mtime
        return float("-inf")

    graphs = sorted(directory.glob("[!.]*.onnx"), key=used, reverse=True)
    for old in graphs[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def cached_graph(model, *, cache: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> Path | None:
    """The model's dynamic ONNX graph, exported now or reused from the cache; None (after one line to
    ``log``) when the model cannot be exported with dynamic sizes."""

    log = log or (lambda message: print(message, file=sys.stderr))
    key, what = graph_key(model)
    directory = graph_dir(cache)
    name = _model_name(model)
    path = directory / f"{name}-{key}.onnx"
    failed = directory / f"{name}-{key}.failed.json"
    if path.exists():
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: kept by the pruning
        return path
    if failed.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            reason = json.loads(failed.read_text(encoding="utf-8")).get("reason", "")
            log(f"runtime: {name} cannot run in onnxruntime ({reason}); using torch")
            return None
    tmp = directory / f".{name}-{key}.{os.getpid()}.onnx"
    was_training = model.training
    try:
        directory.mkdir(parents=True, exist_ok=True)  # an unwritable cache also means: run in torch
        with _quiet_stdout():  # the exporter prints its whole IR graph (from C++) on a failure
            export_onnx(model, tmp, size=_EXPORT_SIZE, dynamic=True, opset=OPSET)
        _check_export(model.eval(), tmp)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - any export failure means: run in torch
        model.train(was_training)
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        with contextlib.suppress(OSError):
            atomic_write_json(failed, {"reason": reason, "key": what})
        log(f"runtime: {name} cannot run in onnxruntime ({reason}); using torch")
        return None
    model.train(was_training)
    _prune(directory, KEEP_GRAPHS)
    return path


# ----------------------------------------------------------------------------- the network


class OrtNetwork:
    """An onnxruntime session called like the PyTorch model: ``net(x)`` with a B x 3 x H x W float32
    CPU tensor gives a B x D float32 tensor."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, spinning: bool | None = None):
        import onnxruntime as ort

        policy = cpu_policy()
        self.threads = int(threads or policy["threads"])
        self.spinning = policy["spinning"] if spinning is None else bool(spinning)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        except Exception as exc:  # onnxruntime's errors are no RuntimeError: the engine retries those one by one
            raise RuntimeError(f"onnxruntime: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.run(x.detach().float().contiguous().numpy()))

    def describe(self) -> dict:
        return {"runtime": "onnx", "graph": str(self.path), "threads": self.threads, "spinning": self.spinning}


def onnx_network(model, *, cache: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
                 threads: int | None = None, spinning: bool | None = None) -> OrtNetwork | None:
    """The model's network in onnxruntime, or None when it cannot be exported (said in one line)."""
    path = cached_graph(model, cache=cache, log=log)
    if path is None:
        return None
    try:
        return OrtNetwork(path, threads=threads, spinning=spinning)
    except Exception as exc:  # noqa: BLE001 - an unreadable cached graph: drop it, run in torch
        with contextlib.suppress(OSError):
            path.unlink()
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"runtime: onnxruntime cannot load {path} ({type(exc).__name__}); removed it, using torch")
        return None
