"""Post-processing of global descriptors: PCA whitening, learned whitening (Lw), DBA and alpha-QE.

Row-major N x D float arrays throughout (cirtorch uses D x N columns). The formulas follow
deep-image-retrieval ``dirtorch/utils/common.py`` ``whiten_features``/``expand_descriptors`` and
cirtorch ``cirtorch/utils/whiten.py``; docs/postprocess.md gives each one, the file format and
where cfcd differs (``eigh`` instead of ``eig``, fractional alpha).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import CfcdError, InputError
from cfcd.index import exact_search
from cfcd.store import check_compatible, load_descriptors, transform_store
from cfcd.utils.io import atomic_open, atomic_write_json, sha256_file, utc_timestamp

__all__ = [
    "Whitening",
    "l2_normalize",
    "learn_pca_whitening",
    "learn_lw",
    "whitenlearn",
    "cholesky_with_jitter",
    "load_whitening",
    "resolve_whitening",
    "whitening_from_sklearn_pca",
    "alpha_query_expansion",
    "database_augmentation",
    "WHITENING_KINDS",
]

logger = logging.getLogger(__name__)

WHITENING_KINDS = ("pca", "lw")
_BLOCK = 8192  # rows per streamed block: 128 MB of float64 at 2048-D


def l2_normalize(x: np.ndarray, eps: float = 0.0, axis: int = 1) -> np.ndarray:
    """Row L2 normalisation ``x / (||x|| + eps)``; with ``eps=0`` a zero row stays zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    if eps:
        return x / (norm + eps)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass
class Whitening:
    """An affine whitening ``y = L2((x - mean) @ projection[:dim].T)``.

    ``projection`` holds every learned component (rows, best first); ``dim`` is the default
    number kept. ``eps`` is the constant added to the norm in the final L2 (cirtorch Lw: 1e-6;
    PCA: 0 as dirtorch). ``info`` is the JSON sidecar (kind, whitenp, fitted-on data, ...).
    """

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D_all, D)
    kind: str
    dim: int
    eps: float = 0.0
    info: dict = field(default_factory=dict)
    variance: np.ndarray | None = None  # PCA: the eigenvalue of every projection row

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[1])

    def with_power(self, whitenp: float) -> "Whitening":
        """The same PCA with eigenvalue power ``whitenp`` (rows scaled by ``variance ** (p0 - p)``).

        A PCA stored with ``whiten=False`` (sklearn) ignores the power, as dirtorch's
        ``transform`` does."""
        whitenp = float(whitenp)
        if whitenp < 0:
            raise InputError(f"whitening power must be >= 0, got {whitenp}")
        if self.kind != "pca" or self.variance is None:
            raise InputError(f"{self.info.get('file', 'whitening')}: a {self.kind} whitening without eigenvalues "
                             "has no power to change (--whiten-power needs a PCA whitening)")
        if not self.info.get("pca_whiten", True):
            return self
        current = float(self.info.get("whitenp", 0.0))
        scale = np.asarray(self.variance, dtype=np.float64) ** (current - whitenp)
        info = dict(self.info, whitenp=whitenp)
        return Whitening(mean=self.mean, projection=self.projection * scale[:, None], kind=self.kind, dim=self.dim,
                         eps=self.eps, info=info, variance=self.variance)

    def transform(self, x: np.ndarray, *, dim: int | None = None, normalize: bool = True) -> np.ndarray:
        """Whiten row-major descriptors (N x D, memmap welcome; processed in blocks) -> N x dim float32."""
        x = np.asarray(x) if not isinstance(x, np.ndarray) else x
        single = x.ndim == 1
        if single:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise InputError(
                f"whitening ({self.kind}) expects {self.input_dim}-D descriptors, got shape {tuple(x.shape)}"
            )
        dim = self.dim if dim is None else int(dim)
        if not 1 <= dim <= self.projection.shape[0]:
            raise InputError(f"whitening ({self.kind}) has {self.projection.shape[0]} components, asked for {dim}")
        proj_t = np.ascontiguousarray(self.projection[:dim].T, dtype=np.float32)
        mean = self.mean.astype(np.float32)
        out = np.empty((x.shape[0], dim), dtype=np.float32)
        for s in range(0, x.shape[0], _BLOCK):
            y = (np.asarray(x[s : s + _BLOCK], dtype=np.float32) - mean) @ proj_t
            out[s : s + len(y)] = l2_normalize(y, self.eps) if normalize else y
        return out[0] if single else out

    __call__ = transform

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` (atomic); returns the safetensors path."""
        from safetensors.numpy import save as st_save


        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".safetensors", ".json", ".npz") else path
        tensors = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float64),
            "projection": np.ascontiguousarray(self.projection, dtype=np.float64),
        }
        if self.variance is not None:
            tensors["variance"] = np.ascontiguousarray(self.variance, dtype=np.float64)
        st_path = stem.with_name(stem.name + ".safetensors")
        with atomic_open(st_path, "wb") as handle:
            handle.write(st_save(tensors, metadata={"format": "cfcd-whitening", "kind": self.kind}))
        info = dict(self.info)
        info.update(
            {
                "format": "cfcd-whitening",
                "version": 1,
                "kind": self.kind,
                "dim": int(self.dim),
                "input_dim": self.input_dim,
                "components": int(self.projection.shape[0]),
                "eps": float(self.eps),
                "tensors": st_path.name,
                "cfcd_version": __version__,
            }
        )
        info.setdefault("created", utc_timestamp())
        atomic_write_json(stem.with_name(stem.name + ".json"), info)
        return st_path

    def summary(self) -> dict:
        """The provenance recorded in a whitened store's ``meta["whitening"]``."""
        keys = ("kind", "whitenp", "dim", "input_dim", "fitted_on", "sha256", "source")  # not the path: copies are equal
        out = {k: self.info[k] for k in keys if k in self.info}
        out.update(kind=self.kind, dim=int(self.dim))
        return out


def _as_rows(x, role: str) -> np.ndarray:
    x = x.descriptors if hasattr(x, "descriptors") else x
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim != 2:
        raise InputError(f"{role}: expected an N x D matrix, got shape {x.shape}")
    return x


def _mean_and_covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and n-1 covariance in float64, accumulated over row blocks (two passes, stable)."""
    n, d = x.shape
    mean = np.zeros(d, dtype=np.float64)
    for s in range(0, n, _BLOCK):
        mean += np.asarray(x[s : s + _BLOCK], dtype=np.float64).sum(axis=0)
    mean /= n
    cov = np.zeros((d, d), dtype=np.float64)
    for s in range(0, n, _BLOCK):
        c = np.asarray(x[s : s + _BLOCK], dtype=np.float64) - mean
        cov += c.T @ c
    cov /= max(n - 1, 1)
    return mean, cov


def learn_pca_whitening(
    x: np.ndarray,
    *,
    whitenp: float = 0.5,
    dim: int | None = None,
    rank_tol: float = 1e-10,
) -> Whitening:
    """Fit dirtorch-style PCA whitening with eigenvalue power ``whitenp`` on N x D rows.

    ``dim`` defaults to every component with non-negligible variance (the numerical rank:
    eigenvalues above ``rank_tol`` times the largest); asking for more raises an error, since
    dividing by a ~0 variance would blow up noise. ``whitenp = 0`` is plain PCA (rotation and
    projection only).
    """
    x = _as_rows(x, "PCA whitening")
    n, d = x.shape
    if n < 2:
        raise InputError(f"PCA whitening needs at least 2 descriptors, got {n}")
    if whitenp < 0:
        raise InputError(f"whitenp must be >= 0, got {whitenp}")
    mean, cov = _mean_and_covariance(x)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    rank = int(np.sum(evals > rank_tol * max(evals[0], np.finfo(np.float64).tiny)))
    if rank == 0:
        raise InputError("PCA whitening: the descriptors have zero variance (all rows identical?)")
    if dim is None:
        dim = rank
    if not 1 <= dim <= d:
        raise InputError(f"PCA whitening: dim must be in 1..{d}, got {dim}")
    if dim > rank:
        raise InputError(
            f"PCA whitening: only {rank} components have non-zero variance on {n} descriptors of dimension {d}; "
            f"cannot keep {dim} (use --dim {rank} or fit on more descriptors)"
        )
    evals, evecs = evals[:rank], evecs[:, :rank]
    projection = evecs.T / (evals[:, None] ** whitenp)
    info = {"kind": "pca", "whitenp": float(whitenp), "explained_variance": evals[:dim].tolist()[:16]}
    return Whitening(mean=mean, projection=projection, kind="pca", dim=int(dim), eps=0.0, info=info, variance=evals)


def whitening_from_sklearn_pca(mean, components, explained_variance, *, whiten: bool = True,
                               info: dict | None = None) -> Whitening:
    """A PCA as dirtorch applies it (``common.transform``): ``(x - mean_) components_.T``, divided
    by ``explained_variance_ ** whitenp`` when the PCA was fitted with ``whiten=True``; stored with
    power 0 (choose it with :meth:`Whitening.with_power`)."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    components = np.asarray(components, dtype=np.float64)
    variance = np.asarray(explained_variance, dtype=np.float64).reshape(-1)
    if components.ndim != 2 or components.shape[1] != mean.shape[0] or variance.shape[0] != components.shape[0]:
        raise InputError(f"PCA arrays do not fit: mean {mean.shape}, components {components.shape}, "
                         f"explained_variance {variance.shape}")
    full = {"kind": "pca", "whitenp": 0.0, "pca_whiten": bool(whiten)}
    full.update(info or {})
    return Whitening(mean=mean, projection=components, kind="pca", dim=int(components.shape[0]), eps=0.0,
                     info=full, variance=variance)


WHITENING_DIR = "whitening"  # inside a converted weights directory


def resolve_whitening(spec: str | os.PathLike | Whitening, *, power: float | None = None,
                      weights: str | os.PathLike | None = None) -> Whitening:
    """A whitening file (``.safetensors``/``.json``/stem/``.npz``) or the NAME of one stored in a
    converted checkpoint (``WEIGHTS/whitening/NAME.safetensors``, e.g. dirtorch's
    ``Landmarks_clean``), with the PCA eigenvalue ``power`` applied when given."""
    if isinstance(spec, Whitening):
        w = spec
    else:
        path = Path(spec)
        candidates = [path]
        if weights is not None and not path.suffix and len(path.parts) == 1:
            base = Path(weights)
            base = base if base.is_dir() else base.parent
            candidates.insert(0, base / WHITENING_DIR / path.name)
        found = next((c for c in candidates if c.with_name(c.name + ".safetensors").is_file()
                      or (c.suffix in (".safetensors", ".json", ".npz") and c.is_file())), None)
        if found is None:
            where = f" or in {Path(weights) / WHITENING_DIR}" if weights is not None else ""
            raise InputError(f"--whiten {spec}: no whitening file {spec}{where} "
                             "(a file from `cfcd whiten`, or a name that `cfcd convert` wrote)")
        w = load_whitening(found)
    return w if power is None else w.with_power(power)


def cholesky_with_jitter(s: np.ndarray, max_tries: int = 40) -> np.ndarray:
    """cirtorch's ``cholesky``: add alpha = 0, 1e-10, 1e-9, ... on the diagonal until it succeeds."""
    alpha = 0.0
    eye = np.eye(s.shape[0], dtype=s.dtype)
    for _ in range(max_tries):
        try:
            return np.linalg.cholesky(s + alpha * eye)
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
            logger.info("cholesky: matrix is not positive definite, adding %.0e on the diagonal", alpha)
    raise CfcdError("learned whitening: the intra-pair covariance could not be made positive definite")


def whitenlearn(x: np.ndarray, qidxs: Sequence[int], pidxs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """cirtorch ``whitenlearn`` on row-major ``x`` (N x D): returns ``(m, P)`` with m (D,), P (D x D).

    m = mean of the query rows; S = intra-pair covariance of (x_q - x_p); P1 = chol(S)^-1;
    eigenvectors E of the scatter of P1 (x - m) over all rows, sorted descending; P = E^T P1.
    """
    x = _as_rows(x, "learned whitening")
    q = np.asarray(qidxs, dtype=np.int64)
    p = np.asarray(pidxs, dtype=np.int64)
    if q.shape != p.shape or q.ndim != 1 or q.size == 0:
        raise InputError("learned whitening needs equally long, non-empty lists of query and positive rows")
    n, d = x.shape
    if q.min() < 0 or p.min() < 0 or q.max() >= n or p.max() >= n:
        raise InputError(f"learned whitening: pair indices out of range for {n} descriptors")
    xq = np.asarray(x[q], dtype=np.float64)
    m = xq.mean(axis=0)
    df = xq - np.asarray(x[p], dtype=np.float64)
    s = df.T @ df / df.shape[0]
    p1 = np.linalg.inv(cholesky_with_jitter(s))
    scatter = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, _BLOCK):
        y = (np.asarray(x[start : start + _BLOCK], dtype=np.float64) - m) @ p1.T
        scatter += y.T @ y
    evals, evecs = np.linalg.eigh(scatter)
    order = np.argsort(evals)[::-1]
    evecs = evecs[:, order]
    return m, evecs.T @ p1


class DegenerateWhiteningWarning(UserWarning):
    """A whitening learned from too little data to be full rank."""


def learn_lw(
    x: np.ndarray,
    qidxs: Sequence[int],
    pidxs: Sequence[int],
    *,
    dim: int | None = None,
) -> Whitening:
    """Fit cirtorch's supervised learned whitening (Lw) from matching pairs (rows ``qidxs[i]``, ``pidxs[i]``)."""
    n_pairs, in_dim = len(qidxs), int(np.shape(x)[1])
    if n_pairs < in_dim:
        # the pair-difference covariance has rank <= n_pairs: most of its D eigenvalues are ~0 and
        # their inverse square roots blow noise up (cirtorch learns Lw on ~100k pairs for 2048-D)
        warnings.warn(
            f"learned whitening from {n_pairs} pairs for {in_dim}-D descriptors is degenerate: the pair "
            f"covariance has rank <= {n_pairs} < {in_dim}; use many more pairs than dimensions "
            f"(or --kind pca, or --dim well below {n_pairs})",
            DegenerateWhiteningWarning,
            stacklevel=2,
        )
    m, proj = whitenlearn(x, qidxs, pidxs)
    d = proj.shape[0]
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise InputError(f"learned whitening: dim must be in 1..{d}, got {dim}")
    info = {"kind": "lw", "pairs": int(len(qidxs))}
    return Whitening(mean=m, projection=proj, kind="lw", dim=dim, eps=1e-6, info=info)


def load_whitening(path: str | os.PathLike) -> Whitening:
    """Reopen a whitening saved by :meth:`Whitening.save` (``.safetensors``, ``.json`` or the stem).

    Also reads an ``.npz`` (no pickle) with ``mean``/``projection`` or cirtorch's ``m``/``P``
    (``m`` D x 1 and ``P`` D' x D, as in ``meta['Lw'][...]['ms']`` exported to npz), as kind "lw".
    A :class:`Whitening` is returned as it is.
    """
    if isinstance(path, Whitening):
        return path
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise InputError(f"{path}: whitening file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npz whitening: {exc}") from None
        mean = arrays.get("mean", arrays.get("m"))
        proj = arrays.get("projection", arrays.get("P"))
        if mean is None or proj is None:
            raise InputError(f"{path}: expected arrays 'mean'/'projection' (or cirtorch 'm'/'P'), found {sorted(arrays)}")
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        proj = np.asarray(proj, dtype=np.float64)
        if proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
            raise InputError(f"{path}: projection {proj.shape} does not match mean ({mean.shape[0]},)")
        return Whitening(mean=mean, projection=proj, kind="lw", dim=proj.shape[0], eps=1e-6, info={"file": str(path)})
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    st_path = stem.with_name(stem.name + ".safetensors")
    js_path = stem.with_name(stem.name + ".json")
    if not st_path.is_file():
        raise InputError(f"{st_path}: whitening file not found")
    if not js_path.is_file():
        raise InputError(f"{js_path}: whitening description (JSON sidecar of {st_path.name}) not found")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{st_path}: not a readable safetensors file: {exc}") from None
    try:
        info = json.loads(js_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{js_path}: not valid JSON: {exc}") from None
    if "mean" not in tensors or "projection" not in tensors:
        raise InputError(f"{st_path}: expected tensors 'mean' and 'projection', found {sorted(tensors)}")
    kind = info.get("kind")
    if kind not in WHITENING_KINDS:
        raise InputError(f"{js_path}: unknown whitening kind {kind!r}")
    mean, proj = tensors["mean"].reshape(-1), tensors["projection"]
    variance = tensors.get("variance")
    if proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
        raise InputError(f"{st_path}: projection {proj.shape} does not match mean ({mean.shape[0]},)")

    info.setdefault("file", str(st_path))
    info["sha256"] = sha256_file(st_path)
    return Whitening(
        mean=mean,
        projection=proj,
        kind=kind,
        dim=int(info.get("dim", proj.shape[0])),
        eps=float(info.get("eps", 1e-6 if kind == "lw" else 0.0)),
        info=info,
        variance=None if variance is None else variance.reshape(-1),
    )


# --------------------------------------------------------------------------- query expansion


def _weights(sim: np.ndarray, alpha: float) -> np.ndarray:
    if float(alpha).is_integer():
        return np.power(sim, int(alpha))  # dirtorch: s ** alpha (0 ** 0 == 1)
    return np.sign(sim) * np.power(np.abs(sim), alpha)


def _expand(
    queries: np.ndarray,
    db: np.ndarray,
    sim: np.ndarray,
    idx: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """q' = L2(mean([q, db[j] * w_j for j in idx])) for every row, vectorised."""
    w = _weights(sim.astype(np.float32), alpha)  # nq x k
    neigh = np.asarray(db[idx.reshape(-1)], dtype=np.float32).reshape(idx.shape[0], idx.shape[1], -1)
    agg = np.asarray(queries, dtype=np.float32) + np.einsum("qk,qkd->qd", w, neigh)
    agg /= idx.shape[1] + 1
    return l2_normalize(agg)  # dirtorch divides by the norm without eps


def _expansion_params(k, alpha, what: str) -> tuple[int, float]:
    k, alpha = int(k), float(alpha)
    if k < 0 or alpha < 0:
        raise InputError(f"{what}: k and alpha must be non-negative (k={k}, alpha={alpha})")
    return k, alpha


def alpha_query_expansion(
    queries: np.ndarray,
    database: np.ndarray,
    k: int = 0,
    alpha: float = 0.0,
    *,
    device: str | None = "auto",
    chunk: int = 4096,
) -> np.ndarray:
    """alpha-QE (dirtorch ``expand_descriptors(q, db, alpha, k)``): returns the expanded queries.

    For each query, the top-k database rows by inner product (``exact_search``, chunked) are
    averaged with the query, weighted by ``similarity ** alpha``, then L2-normalised. k = 0 returns
    the queries unchanged (as float32).
    """
    q = _as_rows(queries, "queries")
    x = _as_rows(database, "database")
    k, alpha = _expansion_params(k, alpha, "query expansion")
    if k == 0:
        return np.asarray(q, dtype=np.float32)
    if q.shape[1] != x.shape[1]:
        raise InputError(f"query expansion: queries are {q.shape[1]}-D, the database {x.shape[1]}-D")
    k = min(k, x.shape[0])

    out = np.empty(q.shape, dtype=np.float32)
    for s in range(0, q.shape[0], chunk):
        block = np.asarray(q[s : s + chunk], dtype=np.float32)
        res = exact_search(block, x, k, device=device)
        out[s : s + len(block)] = _expand(block, x, res.scores, res.indices, alpha)
    return out


def database_augmentation(
    database: np.ndarray,
    k: int = 0,
    alpha: float = 0.0,
    *,
    device: str | None = "auto",
    chunk: int = 4096,
) -> np.ndarray:
    """alpha-DBA (dirtorch ``expand_descriptors(db, None, alpha, k)``): every database row expanded
    with its top-k database neighbours, the self-similarity set to 0 (not excluded) as dirtorch.

    Implemented with a chunked top-(k+1) search: the row itself is replaced by a 0 similarity and
    the best k of the k+1 candidates are kept, which equals dirtorch's full-matrix result (up to
    ties) without an N x N matrix.
    """
    x = _as_rows(database, "database")
    k, alpha = _expansion_params(k, alpha, "database augmentation")
    if k == 0:
        return np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    k = min(k, n)

    out = np.empty(x.shape, dtype=np.float32)
    kk = min(k + 1, n)
    for s in range(0, n, chunk):
        block = np.asarray(x[s : s + chunk], dtype=np.float32)
        res = exact_search(block, x, kk, device=device)
        sim, idx = res.scores.copy(), res.indices
        rows = np.arange(s, s + len(block))[:, None]
        sim[idx == rows] = 0.0  # dirtorch zeroes the diagonal of the similarity matrix
        # best k of the k+1 candidates (stable: on equal scores the earlier candidate stays)
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        sim = np.take_along_axis(sim, order, axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        out[s : s + len(block)] = _expand(block, x, sim, idx, alpha)
    return out


def whiten_store(source: str | os.PathLike, out: str | os.PathLike, whitening: Whitening):
    """Write the whitened copy of the descriptor store ``source`` to ``out`` (streamed block by
    block, so a 1M x 2048 store never has to fit in memory); the meta keeps the source's provenance
    and records the whitening. A whitening learned on a store applies only to the same embedding space."""


    store = load_descriptors(source, expected_dim=whitening.input_dim, role="descriptors to whiten", dtype=None)
    if store.ids is None:
        raise InputError(f"{store.path}: a plain .npy has no ids; whitening writes a store (use a store input)")
    fitted = (whitening.info or {}).get("fitted_on") or {}
    if fitted:  # learned on a store: apply it only to descriptors of the same embedding space
        space = {"model": fitted.get("model"), "weights_sha256": fitted.get("weights_sha256"),
                 "extract": {"settings": {"model": {"state_sha256": fitted.get("state_sha256")}}}}
        check_compatible((f"the whitening learned on {fitted.get('path')}", space), store)
    if "whitening" in store.meta:
        raise InputError(f"{store.path}: already whitened ({store.meta['whitening']}); refusing to whiten twice")
    meta = {k: v for k, v in store.meta.items() if k not in ("count", "dim", "dtype", "created")}
    meta["whitening"] = whitening.summary()
    meta["whitened_from"] = str(store.path)
    return transform_store(store, out, whitening.transform, out_dim=whitening.dim, meta=meta)
