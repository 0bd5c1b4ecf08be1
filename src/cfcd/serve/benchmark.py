"""The benchmark view: the evaluation of a served index on a benchmark, query by query.

The benchmark is a revisitop ground truth (``--gnd``) or a registered dataset (``--dataset``,
e.g. GLDv2 retrieval) with its own setups and metrics. The table and every query's value of the
primary metric (the first one: revisitop's AP, GLDv2's AP@100) come from
:func:`cfcd.evaluation.evaluate_files` on the query store and the index's source store, i.e. the
code and the numbers of ``cfcd evaluate``. The ranked lists shown for a query are the stable
``argsort`` of ``-(X @ q)`` over the ground truth's database (the ranking the evaluation scores),
computed when asked (GLDv2's database has 762k images), each image labelled with its ground-truth
class; the precision-recall points are computed from that ranking with junk removed, as the AP is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cfcd.data.lists import ImageList, gnd_image_list
from cfcd.errors import InputError
from cfcd.evaluation import evaluate_files, protocol_setups
from cfcd.evaluation.benchmark import describe_benchmark
from cfcd.postprocess import whiten_store
from cfcd.runtime import jsonable
from cfcd.serve.service import RequestError, SearchService
from cfcd.store import StoreMeta, check_compatible, is_store, load_descriptors

_ROW_CHUNK = 65536  # database rows cast to float32 at a time when a query's scores are computed


def benchmark_images(gnd, root: Path, dataset=None, *, queries: bool) -> ImageList:
    """The benchmark's query (or database) images: the dataset's rule (whole images for GLDv2),
    else revisitop's (queries cropped to their boxes)."""
    return (dataset.benchmark_list(gnd, root, queries=queries) if dataset is not None
            else gnd_image_list(gnd, root=root, queries=queries))


def query_store_for(service: SearchService, gnd, *, image_root: Path, dataset=None, log=None) -> Path:
    """Describe the ground truth's queries (revisitop's cropped to their boxes, a ``dataset``'s by its
    rule) with the service's model and settings into a store in the cache; reused while model,
    settings and ground truth stay the same."""

    meta = StoreMeta.of(service.meta)
    rule = None if dataset is None else dataset.name
    key = hashlib.sha1(  # whitening too: the whitened queries are kept beside the plain ones
        json.dumps([gnd.sha256, meta.settings, meta.whitening, str(Path(image_root).resolve()), rule],
                   sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    images = benchmark_images(gnd, image_root, dataset, queries=True)
    missing = [str(p) for p in images.paths if not Path(p).is_file()]
    if missing:
        where = ("pass --root DIR where 'cfcd data download' put it" if dataset is not None
                 else "pass --images ROOT with the benchmark's jpg directory")
        raise InputError(f"{len(missing)} query image(s) of {gnd.path} not found, first: {missing[0]} ({where})")
    out_dir = service.cache_dir / "benchmark" / f"{gnd.dataset}-{key}"
    stores, _, stopped = describe_benchmark(service.model, gnd, image_root, out_dir, service.extractor.options,
                                            weights=service.weights, parts=("queries",), dataset=dataset,
                                            log=log or (lambda message: None))
    if stopped:
        raise InputError(f"{out_dir / 'queries'}: the query extraction was interrupted; start again to resume it")
    out = Path(stores["queries"].path)
    if service.whitening is not None:
        whitened = out_dir / "queries-whitened"
        if not (whitened / "meta.json").is_file():  # what `cfcd whiten --apply` writes
            whiten_store(out, whitened, service.whitening)
        out = whitened
    return out


def _class_keys(setups: dict) -> tuple[str, ...]:
    """The ground-truth keys an image is labelled with, positives' first: revisitop's easy, hard,
    junk; classic ok, junk; GLDv2's public, private."""
    positive = [k for ok, _ in setups.values() for k in ok]
    junk = [k for _, j in setups.values() for k in j]
    return tuple(dict.fromkeys(positive + junk))


@dataclass
class Benchmark:
    """One index evaluated on one ground truth, with what the page shows per query."""

    name: str
    gnd: Any
    result: Any
    protocol: dict
    setup_keys: dict  # {setup: (positive keys, junk keys)}: the dataset's, else protocol_setups(gnd)
    metric: str  # the primary per-query metric ("AP", "AP@100"), in the JSON's "AP" fields
    queries: np.ndarray  # nq x D float32
    database: np.ndarray  # N x D, the ground truth's database in imlist order (memory-mapped when it can be)
    query_store: Path
    database_store: Path

    @classmethod
    def build(cls, service: SearchService, gnd, *, queries: str | os.PathLike | None = None,
              image_root: Path | None = None, dataset=None, log=None) -> "Benchmark":
        """``dataset`` (a :class:`cfcd.data.datasets.BenchmarkDataset`) gives the setups, metrics and
        images (under ``image_root``, its ``--root``); without it, revisitop's."""
        db = Path(str((service.index.source or {}).get("path") or ""))
        if not db.name or not is_store(db):
            raise InputError(
                f"the benchmark view evaluates the descriptor store the index was built from ({db}), "
                "which is not there; rebuild the index from a store, or serve without --gnd"
            )
        if dataset is not None and image_root is None:
            raise InputError(f"--dataset {dataset.name} needs --root DIR (where 'cfcd data download' put it)")
        root = image_root or service.images.root
        if queries is None:
            if root is None:
                raise InputError("--gnd needs the query images: pass --images ROOT (the benchmark's jpg directory) "
                                 "or --queries STORE")
            queries = query_store_for(service, gnd, image_root=root, dataset=dataset, log=log)
        setup_keys = dict(dataset.setups) if dataset is not None and dataset.setups else protocol_setups(gnd)
        # the scoring of `cfcd evaluate --dataset` (evaluate_dataset) on the ground truth already loaded
        scoring = {"setups": dataset.setups, "metrics": dataset.metrics} if dataset is not None else {}
        result, protocol = evaluate_files(gnd=gnd, queries=queries, database=db, **scoring)
        q = load_descriptors(queries, expected_ids=gnd.qimlist, role="queries")
        x = load_descriptors(db, expected_ids=gnd.imlist, role="database", dtype=None)
        if q.meta:
            check_compatible((f"the index {service.index.path}", service.meta), q)
        if dataset is not None and root is not None:
            # the dataset's own paths (GLDv2: test/ and index/ a/b/c/<id>.jpg), still only under the image root
            for part in (True, False):
                listed = dataset.benchmark_list(gnd, root, queries=part)
                service.images.add_paths(dict(zip(listed.ids, listed.paths)))
        else:
            service.images.add_ids(list(gnd.qimlist) + list(gnd.imlist))
        first = next(iter(result.setups.values()))
        return cls(service.name, gnd, result, jsonable(protocol, finite=True), setup_keys,
                   first.metrics[0].query_name, np.asarray(q.descriptors, dtype=np.float32), x.descriptors,
                   Path(queries), db)

    # ---- the whole benchmark

    @property
    def setups(self) -> list[str]:
        return list(self.result.setups)

    @cached_property
    def per_query(self) -> dict:
        """Every query's metrics per setup, in percent (computed once: the evaluation does not change)."""
        return self.result.per_query(percent=True)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.gnd.qimlist)}

    def summary(self) -> dict:
        return self._summary

    @cached_property
    def _summary(self) -> dict:
        r = self.result
        per_query = self.per_query
        queries = []
        for i, qid in enumerate(self.gnd.qimlist):
            row = per_query[qid]
            queries.append({
                "id": qid,
                "index": i,
                "AP": {s: row[s][self.metric] for s in self.setups},
                "positives": {s: row[s]["positives"] for s in self.setups},
                "bbx": self.gnd.bbx(i),
            })
        return {
            "name": self.name,
            "dataset": self.gnd.dataset,
            "setups": self.setups,
            "metric": self.metric,
            "kappas": list(r.kappas),
            "num_queries": r.num_queries,
            "num_database": r.num_database,
            "metrics": r.metrics(percent=True),
            "per_query": per_query,
            "queries": queries,
            "protocol": self.protocol,
        }

    # ---- one query

    def query_index(self, query: str) -> int:
        try:
            return self._positions[query]
        except KeyError:
            raise RequestError(404, f"no query {query!r} in {self.gnd.dataset}") from None

    def scores(self, qi: int) -> np.ndarray:
        """(N,) float32 ``X @ q`` over the database, in chunks (no N x D float32 copy of a float16 store)."""
        q = self.queries[qi]
        out = np.empty(self.database.shape[0], dtype=np.float32)
        for start in range(0, out.size, _ROW_CHUNK):
            out[start:start + _ROW_CHUNK] = np.asarray(self.database[start:start + _ROW_CHUNK], dtype=np.float32) @ q
        return out

    def classes(self, qi: int) -> dict[int, str]:
        entry = self.gnd.gnd[qi]
        out: dict[int, str] = {}
        for key in _class_keys(self.setup_keys):
            for j in entry.get(key, []):
                out.setdefault(int(j), key)
        return out

    def detail(self, query: str, *, setup: str | None = None, k: int = 100) -> dict:
        qi = self.query_index(query)
        setups = self.setup_keys
        setup = setup or ("medium" if "medium" in self.setups else self.setups[0])
        if setup not in setups:
            raise RequestError(400, f"unknown setup {setup!r}; choose from {', '.join(setups)}")
        ok_keys, junk_keys = setups[setup]
        entry = self.gnd.gnd[qi]
        ok = {int(j) for key in ok_keys for j in entry.get(key, [])}
        junk = {int(j) for key in junk_keys for j in entry.get(key, [])}
        classes = self.classes(qi)
        row = self.scores(qi)
        order = np.argsort(-row, kind="stable")  # the evaluation's tie policy: lower index first
        rank_of = np.empty(order.size, dtype=np.int64)
        rank_of[order] = np.arange(order.size)

        def item(j: int) -> dict:
            role = "positive" if j in ok else ("ignored" if j in junk else "negative")
            return {"id": self.gnd.imlist[j], "rank": int(rank_of[j]) + 1, "score": float(row[j]),
                    "class": classes.get(j, "negative"), "role": role}

        k = max(1, min(int(k), order.size))
        ranked = [item(int(j)) for j in order[:k]]
        missed = sorted((item(j) for j in ok if rank_of[j] >= k), key=lambda e: e["rank"])
        # precision-recall over the ranking with the setup's junk removed (as revisitop's AP)
        pos = np.sort(rank_of[list(ok)]) if ok else np.zeros(0, dtype=np.int64)
        jpos = np.sort(rank_of[list(junk)]) if junk else np.zeros(0, dtype=np.int64)
        shifted = pos - np.searchsorted(jpos, pos, side="left")
        nres = len([j for key in ok_keys for j in entry.get(key, [])])
        pr = [{"recall": (i + 1) / nres, "precision": (i + 1) / (int(p) + 1)} for i, p in enumerate(shifted)] if nres else []
        per_query = self.per_query[query]
        return {
            "query": {"id": query, "index": qi, "bbx": self.gnd.bbx(qi)},
            "name": self.name,
            "setup": setup,
            "metric": self.metric,
            "AP": {s: per_query[s][self.metric] for s in self.setups},
            "metrics": per_query,
            "positives": nres,
            "k": k,
            "ranked": ranked,
            "missed": missed,
            "pr": pr,
        }


def comparison(model: Benchmark, baseline: Benchmark) -> dict:
    """The served index (the model) against ``--compare`` (its baseline): both tables and, per
    query, both values of the primary metric (AP) and the change from the baseline to the model
    (``diff`` = model - baseline)."""
    if model.gnd.sha256 != baseline.gnd.sha256 or model.metric != baseline.metric:
        raise InputError("the two indexes are compared on different ground truths")
    sm, sb = model.summary(), baseline.summary()
    rows = []
    for qm, qb in zip(sm["queries"], sb["queries"]):
        diff = {}
        for s in model.setups:
            vm, vb = qm["AP"][s], qb["AP"][s]
            diff[s] = None if vm is None or vb is None else vm - vb
        rows.append({"id": qm["id"], "index": qm["index"], "AP": {"model": qm["AP"], "baseline": qb["AP"]},
                     "diff": diff, "positives": qm["positives"]})
    return {
        "dataset": model.gnd.dataset,
        "setups": model.setups,
        "metric": model.metric,
        "kappas": sm["kappas"],
        "model": {"name": model.name, "metrics": sm["metrics"],
                  "model": (model.protocol.get("model") or {}).get("database")},
        "baseline": {"name": baseline.name, "metrics": sb["metrics"],
                     "model": (baseline.protocol.get("model") or {}).get("database")},
        "diff": "model - baseline",
        "queries": rows,
    }
