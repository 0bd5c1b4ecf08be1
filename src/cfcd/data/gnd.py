"""Revisited Oxford/Paris ground truth (``gnd_<dataset>.pkl``), loaded without running pickled code.

The revisitop ground-truth files are pickles (protocol 3, builtin types only)::

    {"imlist": [4993 names], "qimlist": [70 names],
     "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...], "junk": [...]}, ...]}

``easy``/``hard``/``junk`` are sorted, pairwise disjoint, 0-based indices into ``imlist``; no query is
in ``imlist``. The classic Oxford5k/Paris6k files (served by cirtorch) have ``ok``/``junk`` instead.

A pickle can execute arbitrary code when it is loaded, and these files are downloaded from the
web, so :func:`safe_load_pickle` uses a restricted unpickler: plain containers, numbers, strings
and numpy arrays only. Anything else (``os.system``, ``builtins.eval``, any class) is refused
before it is called.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfcd.errors import InputError
from cfcd.utils.io import sha256_file

__all__ = [
    "UnsafePickleError",
    "GroundTruth",
    "safe_load_pickle",
    "safe_loads_pickle",
    "load_gnd",
    "find_gnd",
    "KNOWN_GND",
]

# Official files (sha256 of the revisitop downloads, checked against /work/shared/data/revisitop).
KNOWN_GND: dict[str, dict[str, Any]] = {
    "roxford5k": {
        "sha256": "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471",
        "num_database": 4993,
        "num_queries": 70,
    },
    "rparis6k": {
        "sha256": "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499",
        "num_database": 6322,
        "num_queries": 70,
    },
    # classic datasets: counts only (the files are served by cirtorch; hashes not recorded here)
    "oxford5k": {"sha256": None, "num_database": 5063, "num_queries": 55},
    "paris6k": {"sha256": None, "num_database": 6392, "num_queries": 55},
}


class UnsafePickleError(InputError):
    """A pickle asked for something other than plain data (a function, a class, a module)."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables an ``ndarray``/dtype/scalar pickle needs, under their old and new module names."""
    import numpy as np

    try:  # numpy >= 2
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _ma._reconstruct
        allowed[(module, "scalar")] = _ma.scalar
    if hasattr(_num, "_frombuffer"):  # pickle protocol 5 arrays
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = _num._frombuffer
    return allowed


def _builtin_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import collections

    allowed: dict[tuple[str, str], Any] = {}
    for module in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex), ("bytearray", bytearray),
                          ("bytes", bytes), ("list", list), ("dict", dict), ("tuple", tuple)):
            allowed[(module, name)] = obj
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # protocol <= 2 pickles written by Python 3 store bytes (numpy array buffers) as _codecs.encode(str, "latin1")
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self._source = source
        self._allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed is None:
            self._allowed = {**_builtin_globals()}
            if module.startswith("numpy"):
                self._allowed.update(_numpy_globals())
        elif module.startswith("numpy") and ("numpy", "ndarray") not in self._allowed:
            self._allowed.update(_numpy_globals())
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle {module}.{name}: this file may only contain plain "
                "containers, numbers, strings and numpy arrays (it may be malicious or not a ground-truth file)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing to unpickle a persistent id ({pid!r})")


def _restricted_load(data: bytes, source: str) -> Any:
    for encoding in ("ASCII", "latin1"):  # latin1: Python 2 pickles holding numpy arrays
        try:
            return _RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError:
            if encoding == "latin1":
                raise InputError(f"{source}: not a valid pickle (undecodable strings)") from None
        except Exception as exc:  # EOFError, UnpicklingError, ValueError, TypeError from bad opcodes...
            raise InputError(
                f"{source}: not a valid pickle (truncated or corrupted?): {type(exc).__name__}: {exc}"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def safe_loads_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with the restricted unpickler of :func:`safe_load_pickle`."""
    return _restricted_load(data, source)


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may only contain plain containers, numbers, strings and numpy arrays.

    Allowed: dict, list, tuple, set, frozenset, OrderedDict, str, bytes, int, float, complex, bool,
    None, numpy arrays/dtypes/scalars (not object arrays of anything else). Any other global
    (``os.system``, ``builtins.eval``, a class) raises :class:`UnsafePickleError` *before* it is
    called; a missing, truncated or corrupt file raises :class:`~cfcd.errors.InputError`.
    Python 2 pickles are read with ``encoding="latin1"`` when ASCII fails.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a pickle file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"{path}: empty file (truncated download?)")
    return _restricted_load(data, str(path))


@dataclass
class GroundTruth:
    """A validated revisitop (or classic Oxford/Paris) ground truth.

    ``gnd[i]`` is a dict with ``bbx`` (``[x1, y1, x2, y2]`` floats, or ``None``) and either
    ``easy``/``hard``/``junk`` (revisited) or ``ok``/``junk`` (classic), each a list of 0-based
    ``int`` indices into ``imlist``, in file order.
    """

    dataset: str
    path: Path
    sha256: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    official: bool = field(default=False)  # sha256 matches the published file of ``dataset``

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    @property
    def num_database(self) -> int:
        return len(self.imlist)

    @property
    def revisited(self) -> bool:
        """True for the revisitop format (easy/hard/junk), False for classic (ok/junk)."""
        return bool(self.gnd) and "easy" in self.gnd[0]

    def bbx(self, query: int) -> list[float] | None:
        return self.gnd[query].get("bbx")


_REVISITED_KEYS = ("easy", "hard", "junk")
_CLASSIC_KEYS = ("ok", "junk")


def _as_names(value: Any, key: str, where: str) -> list[str]:
    import numpy as np

    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: '{key}' must be a list of image names, found {type(value).__name__}")
    names = []
    for i, name in enumerate(value):
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not isinstance(name, str):
            raise InputError(f"{where}: '{key}'[{i}] is {type(name).__name__} {name!r}, expected an image name")
        names.append(name)
    return names


def _as_indices(value: Any, key: str, n: int, where: str) -> list[int]:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.size and not np.issubdtype(value.dtype, np.integer):
            raise InputError(f"{where}: '{key}' must hold integer indices, found dtype {value.dtype}")
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: '{key}' must be a list of database indices, found {type(value).__name__}")
    out = []
    for idx in value:
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
            raise InputError(f"{where}: '{key}' holds {idx!r} ({type(idx).__name__}), expected integer indices")
        idx = int(idx)
        if not 0 <= idx < n:
            raise InputError(f"{where}: '{key}' index {idx} is out of range for {n} database images (0-based)")
        out.append(idx)
    return out


def _as_bbx(value: Any, where: str) -> list[float] | None:
    import numpy as np

    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise InputError(f"{where}: 'bbx' must be [x1, y1, x2, y2], found {value!r}")
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'bbx' must hold 4 numbers, found {value!r}") from None
    return box


def dataset_from_path(path: str | os.PathLike) -> str | None:
    """``gnd_roxford5k.pkl`` -> ``"roxford5k"``; ``None`` if the name does not follow the pattern."""
    stem = Path(path).name
    if stem.startswith("gnd_") and stem.endswith(".pkl"):
        return stem[4:-4] or None
    return None


def load_gnd(path: str | os.PathLike, dataset: str | None = None) -> GroundTruth:
    """Load and validate a ground-truth pickle with the restricted unpickler.

    ``dataset`` defaults to the ``<ds>`` of ``gnd_<ds>.pkl``. For the known datasets (roxford5k,
    rparis6k, oxford5k, paris6k) the numbers of database images and queries must match the
    published ones (a file given for the wrong ``--dataset`` is an error). Every problem raises
    one :class:`~cfcd.errors.InputError` naming the file, the query and the key.
    """
    path = Path(path)
    obj = safe_load_pickle(path)
    where = str(path)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a dict with 'imlist', 'qimlist' and 'gnd', found {type(obj).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
    if missing:
        raise InputError(
            f"{where}: not a revisitop ground truth: missing key(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, list(obj)[:8]))})"
        )
    imlist = _as_names(obj["imlist"], "imlist", where)
    qimlist = _as_names(obj["qimlist"], "qimlist", where)
    entries = obj["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise InputError(f"{where}: 'gnd' must be a list of per-query dicts, found {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise InputError(f"{where}: 'gnd' has {len(entries)} entries but 'qimlist' has {len(qimlist)} queries")
    if not imlist:
        raise InputError(f"{where}: 'imlist' is empty")
    if len(set(imlist)) != len(imlist):
        raise InputError(f"{where}: 'imlist' has duplicate image names")
    n = len(imlist)
    gnd: list[dict] = []
    fmt: tuple[str, ...] | None = None
    for q, entry in enumerate(entries):
        qwhere = f"{where}: query {q} ({qimlist[q]!r})"
        if not isinstance(entry, dict):
            raise InputError(f"{qwhere}: expected a dict, found {type(entry).__name__}")
        this = _REVISITED_KEYS if "easy" in entry or "hard" in entry else _CLASSIC_KEYS
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise InputError(f"{qwhere}: mixes the revisited (easy/hard/junk) and classic (ok/junk) formats")
        # revisitop's compute_map treats a missing 'junk' as empty; the positives must be present
        required = [k for k in fmt if k != "junk" and k not in entry]
        if required:
            raise InputError(f"{qwhere}: missing key(s) {', '.join(map(repr, required))}")
        out = {"bbx": _as_bbx(entry.get("bbx"), qwhere)}
        for key in fmt:
            out[key] = _as_indices(entry.get(key, []), key, n, qwhere)
        gnd.append(out)
    if dataset is None:
        dataset = dataset_from_path(path) or path.stem
    known = KNOWN_GND.get(dataset)
    if known is not None and (known["num_database"], known["num_queries"]) != (n, len(qimlist)):
        raise InputError(
            f"{where}: has {n} database images and {len(qimlist)} queries, but {dataset} has "
            f"{known['num_database']} and {known['num_queries']}: wrong ground-truth file for this dataset?"
        )
    digest = sha256_file(path)
    official = bool(known and known["sha256"] == digest)
    return GroundTruth(
        dataset=dataset, path=path, sha256=digest, imlist=imlist, qimlist=qimlist, gnd=gnd, official=official
    )


def gnd_candidates(dataset: str, root: str | os.PathLike) -> list[Path]:
    """Where :func:`find_gnd` looks, in order."""
    root = Path(root)
    name = f"gnd_{dataset}.pkl"
    return [
        root / dataset / name,  # cfcd / revisitop "datasets" dir as root
        root / name,
        root / "datasets" / dataset / name,  # revisitop data/ as root
        root / "test" / dataset / name,  # cirtorch data/ as root
    ]


def find_gnd(dataset: str, root: str | os.PathLike) -> Path:
    """Locate ``ROOT/<ds>/gnd_<ds>.pkl`` (or ``ROOT/gnd_<ds>.pkl``, revisitop or cirtorch layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data root not found (expected a directory holding {dataset}/gnd_{dataset}.pkl)")
    candidates = gnd_candidates(dataset, root)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates[:2])
    raise InputError(
        f"{root}: no ground truth for {dataset} (looked for {tried} and the revisitop/cirtorch layouts); "
        f"download it with `cfcd data download {dataset} --root {root}` or pass --gnd FILE"
    )
