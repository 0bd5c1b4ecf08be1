"""What ``cfcd evaluate`` runs: stores (or .mat/.npy matrices) in, post-processing, the protocol, a report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import InputError
from cfcd.evaluation.metrics import Metric
from cfcd.evaluation.results import EvaluationResult
from cfcd.evaluation.scoring import _chosen_setups, evaluate
from cfcd.evaluation.setups import DEFAULT_KAPPAS, TIE_POLICY
from cfcd.postprocess import alpha_query_expansion, database_augmentation, load_whitening
from cfcd.store import DescriptorStore, StoreMeta, check_compatible, load_descriptors, open_store
from cfcd.utils.io import sha256_file


def _store_summary(store: Any, role: str) -> dict[str, Any]:
    """Provenance of one descriptor input for the report (its meta, minus the long lists)."""
    meta = dict(getattr(store, "meta", {}) or {})
    path = Path(store.path)
    out: dict[str, Any] = {"path": str(path.resolve()), "kind": "store" if path.is_dir() else path.suffix.lstrip(".").lower() or "npy",
                           "rows": int(store.descriptors.shape[0]), "dim": int(store.descriptors.shape[1]),
                           "dtype": store.descriptors.dtype.name}
    if "failures" in meta:
        out["failures"] = len(meta.pop("failures") or [])
    extract = meta.get("extract")
    if isinstance(extract, dict):
        extract = dict(extract)
        if "warnings" in extract:
            extract["warnings"] = len(extract["warnings"] or [])
        meta["extract"] = extract
    out["meta"] = meta
    return out


def _extraction_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Scales, query cropping and the model, from a store's meta (cfcd extract layout or flat keys)."""
    extract = StoreMeta.of(meta).extract
    out = {}
    for key, names in (
        ("model", ("model",)),
        ("weights_sha256", ("weights_sha256",)),
        ("scales", ("scales",)),
        ("query_crop", ("query_crop", "crop_rule", "crop")),
        ("max_size", ("max_size",)),
        ("precision", ("precision",)),
        ("whitening", ("whitening",)),
    ):
        for name in names:
            value = extract.get(name, meta.get(name))
            if value is not None:
                out[key] = value
                break
    return out


def load_mat_descriptors(
    path: str | os.PathLike,
    *,
    role: str,
    expected_rows: int | None = None,
    expected_dim: int | None = None,
    variable: str | None = None,
):
    """Descriptors from a MATLAB ``.mat`` file, as a :class:`cfcd.store.DescriptorStore` (no ids).

    revisitop's example features (``<ds>_resnet_rsfm120k_gem.mat``) hold ``Q`` (D x nq) and ``X``
    (D x n), the MATLAB/cirtorch column layout: 2-D matrices are read as D x N and transposed.
    CFCD's R1M shards (``savemat(..., {'X': [(1, D) arrays]})``) load as N x 1 x D and are squeezed.
    ``variable`` defaults to ``Q`` for queries (else ``X``). Needs scipy.
    """

    path = Path(path)
    where = f"{path} ({role})"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is in the dev extra
        raise InputError(f"{where}: reading .mat files needs scipy (pip install scipy)") from None
    variable = variable or ("Q" if role == "queries" else "X")
    try:
        mat = loadmat(str(path), variable_names=[variable])
    except Exception as exc:  # truncated, not a .mat, MATLAB v7.3 (HDF5)...
        raise InputError(f"{where}: not a readable MATLAB .mat file: {type(exc).__name__}: {exc}") from None
    if variable not in mat:
        raise InputError(f"{where}: no variable {variable!r} in this .mat file")
    x = np.asarray(mat[variable])
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0, :]  # CFCD R1M shard: N x 1 x D
    elif x.ndim == 2:
        x = x.T  # MATLAB / cirtorch layout: one descriptor per column
    else:
        raise InputError(f"{where}: {variable!r} has shape {x.shape}; expected D x N (or N x 1 x D)")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{where}: {variable!r} must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] == 0:
        raise InputError(f"{where}: contains no descriptors (0 columns)")
    if expected_dim is not None and x.shape[1] != expected_dim:
        raise InputError(f"{where}: descriptors are {x.shape[1]}-D but {expected_dim}-D are expected")
    if expected_rows is not None and x.shape[0] != expected_rows:
        raise InputError(f"{where}: {x.shape[0]} descriptors (columns of {variable!r}) but {expected_rows} "
                         "images are expected")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"{where}: {bad.size} descriptors contain NaN or inf, first: {bad[:5].tolist()}")
    zero = np.flatnonzero(~np.any(x != 0, axis=1))
    if zero.size:
        raise InputError(f"{where}: {zero.size} descriptors are all zero, first: {zero[:5].tolist()}")
    return DescriptorStore(path=path, descriptors=x, ids=None, meta={"source": f".mat variable {variable!r}"})


def evaluate_files(
    *,
    gnd: Any,
    queries: str | os.PathLike,
    database: str | os.PathLike,
    distractors: Sequence[str | os.PathLike] | str | os.PathLike = (),
    whiten: str | os.PathLike | Any | None = None,  # or a cfcd.postprocess.Whitening
    qe: tuple[int, float] | None = None,
    dba: tuple[int, float] | None = None,
    setups: Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    chunk_rows: int | None = None,
    num_threads: int | None = None,
) -> tuple[EvaluationResult, dict[str, Any]]:
    """Load, validate and evaluate descriptor files; returns the result and its ``protocol`` block.

    ``gnd`` is a :class:`cfcd.data.gnd.GroundTruth`. ``queries``/``database`` are descriptor
    stores (matched to ``qimlist``/``imlist`` by id), plain ``.npy`` matrices in that order, or
    MATLAB ``.mat`` files (:func:`load_mat_descriptors`: revisitop's example features);
    ``distractors`` are stores or matrices of the same dimension, streamed from their memory
    maps. Order of post-processing (dirtorch): whitening, then DBA, then alpha-QE (on the
    augmented database; both over the database *and* the distractors). Every bad input raises
    :class:`~cfcd.errors.InputError` naming the file.
    """
    t_load = time.perf_counter()
    qstore, xstore, dstores = _load_inputs(gnd, queries, database, distractors)
    q, x, dmats, names, transform, post = _postprocess(qstore, xstore, dstores, whiten, dba, qe)
    load_seconds = time.perf_counter() - t_load

    result = evaluate(
        q, x, gnd, distractors=dmats or None, setups=setups, kappas=kappas, metrics=metrics, sources=names,
        chunk_rows=chunk_rows, num_threads=num_threads, check=True, transform=transform,
    )
    result.timings["load"] = load_seconds
    return result, _protocol(gnd, result, setups, qstore, xstore, dstores, post)


def _load_inputs(gnd, queries, database, distractors):
    """The query, database and distractor stores, checked against the ground truth and each other."""

    def load(path, ids, dim, role):
        if Path(path).suffix.lower() == ".mat":
            return load_mat_descriptors(path, role=role, expected_rows=len(ids), expected_dim=dim)
        return load_descriptors(path, expected_ids=ids, expected_dim=dim, role=role)

    if isinstance(distractors, (str, os.PathLike)):
        distractors = [distractors]
    qstore = load(queries, gnd.qimlist, None, "queries")
    dim = qstore.descriptors.shape[1]
    xstore = load(database, gnd.imlist, dim, "database")
    dstores = []
    for path in distractors:
        if Path(path).suffix.lower() == ".mat":
            store = load_mat_descriptors(path, role="distractors", expected_dim=dim)
        else:
            store = open_store(path, mmap=True)
        where = f"{store.path} (distractors)"
        x = store.descriptors
        if x.shape[0] == 0:
            raise InputError(f"{where}: contains no descriptors (0 rows)")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{where}: descriptors must be floating point, got dtype {x.dtype}")
        if x.shape[1] != dim:
            raise InputError(f"{where}: descriptors are {x.shape[1]}-D but the queries are {dim}-D")
        dstores.append(store)
    for other in (qstore, *dstores):  # one embedding space, or a clear refusal (not a silent mAP)
        check_compatible(xstore, other)
    return qstore, xstore, dstores


def _postprocess(qstore, xstore, dstores, whiten, dba, qe):
    """Whitening, then DBA, then alpha-QE, in dirtorch's order; returns the matrices to score,
    their source names, the whitening still to apply chunk by chunk, and the ``post`` record."""

    q = np.asarray(qstore.descriptors, dtype=np.float32)
    x = np.asarray(xstore.descriptors, dtype=np.float32)
    dmats: list[np.ndarray] = [s.descriptors for s in dstores]
    names = [f"{xstore.path} (database)"] + [f"{s.path} (distractors)" for s in dstores]
    transform = None
    post: dict[str, Any] = {"whitening": None, "database_augmentation": None, "query_expansion": None}
    if whiten is not None:
        w = load_whitening(whiten)  # a path, or a Whitening (cfcd.postprocess.resolve_whitening)
        desc = w.summary() if hasattr(w, "summary") else {}
        post["whitening"] = {"path": str(w.info.get("file", whiten) if not isinstance(whiten, (str, os.PathLike)) else whiten), **desc}
        if isinstance(whiten, (str, os.PathLike)) and Path(whiten).is_file():
            post["whitening"].setdefault("sha256", sha256_file(whiten))
        q = w.transform(q)
        transform = w.transform  # database and distractors: whitened chunk by chunk while scoring
    dba = dba if dba and int(dba[0]) > 0 else None  # k = 0 is a no-op, as in dirtorch
    qe = qe if qe and int(qe[0]) > 0 else None
    if dba or qe:
        parts = [np.asarray(transform(m) if transform else m, dtype=np.float32) for m in [x, *dmats]]
        x = parts[0]
        full = np.concatenate(parts) if len(parts) > 1 else x
        transform = None
        if dba:
            full = database_augmentation(full, int(dba[0]), float(dba[1]))
            post["database_augmentation"] = {"method": "alpha-DBA (dirtorch)", "k": int(dba[0]), "alpha": float(dba[1])}
        if qe:
            q = alpha_query_expansion(q, full, int(qe[0]), float(qe[1]))
            post["query_expansion"] = {"method": "alpha-QE (dirtorch)", "k": int(qe[0]), "alpha": float(qe[1])}
        x = full[: x.shape[0]]
        dmats = [full[x.shape[0]:]] if full.shape[0] > x.shape[0] else []
        names = names[:1] + ([f"{len(dstores)} distractor file(s) after post-processing"] if dmats else [])
    return q, x, dmats, names, transform, post


REVISITOP_METRIC = ("revisitop compute_map: trapezoidal AP, junk removed from the ranking, queries without "
                    "positives skipped; values in percent")


def _metric_text(result) -> str:
    """What the metrics are: revisitop's, or the ``description`` other metrics carry (GLDv2's)."""
    metrics = next(iter(result.setups.values())).metrics if result.setups else ()
    texts = dict.fromkeys(getattr(m, "description", REVISITOP_METRIC) for m in metrics)
    return "; ".join(texts) or REVISITOP_METRIC


def _protocol(gnd, result, setups, qstore, xstore, dstores, post) -> dict[str, Any]:
    """What was evaluated and how: ground truth, inputs, post-processing, metric and timings."""

    qfields = _extraction_fields(qstore.meta)
    xfields = _extraction_fields(xstore.meta)
    if post["whitening"] is None and qfields.get("whitening") is not None:
        # descriptors whitened beforehand (`cfcd whiten --apply`): say so, from the stores' meta
        post["whitening"] = {"applied_before": True, "queries": qfields.get("whitening"),
                             "database": xfields.get("whitening")}
    setups = _chosen_setups(gnd, setups)
    protocol = {
        "dataset": gnd.dataset,
        "gnd": str(gnd.path),
        "gnd_sha256": gnd.sha256,
        "gnd_official": bool(getattr(gnd, "official", False)),
        "num_queries": result.num_queries,
        "num_database": result.num_database,
        "num_distractors": result.num_distractors,
        "setups": {n: {"positives": "+".join(ok), "junk": "+".join(junk)} for n, (ok, junk) in setups.items()},
        "kappas": list(result.kappas),
        "metrics": [m.name for m in next(iter(result.setups.values())).metrics] if result.setups else [],
        "metric": _metric_text(result),
        "similarity": "float32 inner product (cosine for L2-normalised descriptors)",
        "tie_policy": TIE_POLICY,
        "query_crop": qfields.get("query_crop"),
        "scales": {"queries": qfields.get("scales"), "database": xfields.get("scales")},
        "model": {"queries": qfields.get("model"), "database": xfields.get("model")},
        **post,
        "inputs": {
            "queries": _store_summary(qstore, "queries"),
            "database": _store_summary(xstore, "database"),
            "distractors": [_store_summary(s, "distractors") for s in dstores],
        },
        "cfcd_version": __version__,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }
    return protocol


def evaluate_dataset(dataset, root: str | os.PathLike, *, queries, database, metrics: Sequence[str] | None = None,
                     **kwargs: Any):
    """:func:`evaluate_files` with a dataset's (:class:`cfcd.data.datasets.BenchmarkDataset`) ground truth
    under ``root``, its setups and its metrics; returns ``(result, protocol)``."""
    return evaluate_files(gnd=dataset.ground_truth(root), queries=queries, database=database,
                          setups=dataset.setups, metrics=metrics or dataset.metrics, **kwargs)
