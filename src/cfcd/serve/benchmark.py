"""The benchmark view: revisitop evaluation of a served index, query by query.

The table and every query's AP come from :func:`cfcd.evaluation.evaluate_files` on the query
store and the index's source store, i.e. the code and the numbers of ``cfcd evaluate``. The
ranked lists shown for a query are the stable ``argsort`` of ``-(q @ X.T)`` over the ground
truth's database (the ranking the evaluation scores), each image labelled with its ground-truth
class; the precision-recall points are computed from that ranking with junk removed, as the AP is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfcd.data.lists import gnd_image_list
from cfcd.errors import InputError
from cfcd.evaluation import evaluate_files, protocol_setups
from cfcd.evaluation.benchmark import describe_benchmark
from cfcd.postprocess import whiten_store
from cfcd.runtime import jsonable
from cfcd.serve.service import RequestError, SearchService
from cfcd.store import StoreMeta, check_compatible, is_store, load_descriptors

CLASS_KEYS_REVISITED = ("easy", "hard", "junk")
CLASS_KEYS_CLASSIC = ("ok", "junk")


def query_store_for(service: SearchService, gnd, *, image_root: Path, log=None) -> Path:
    """Describe the ground truth's queries (cropped to their boxes) with the service's model and
    settings into a store in the cache; reused while model, settings and ground truth stay the same."""

    settings = StoreMeta.of(service.meta).settings
    key = hashlib.sha1(
        json.dumps([gnd.sha256, settings, str(Path(image_root).resolve())], sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    missing = [str(p) for p in gnd_image_list(gnd, root=image_root, queries=True).paths if not Path(p).is_file()]
    if missing:
        raise InputError(f"{len(missing)} query image(s) of {gnd.path} not found, first: {missing[0]} "
                         "(pass --images ROOT with the benchmark's jpg directory)")
    out_dir = service.cache_dir / "benchmark" / f"{gnd.dataset}-{key}"
    stores, _, stopped = describe_benchmark(service.model, gnd, image_root, out_dir, service.extractor.options,
                                            weights=service.weights, parts=("queries",),
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


@dataclass
class Benchmark:
    """One index evaluated on one ground truth, with what the page shows per query."""

    name: str
    gnd: Any
    result: Any
    protocol: dict
    scores: np.ndarray  # nq x N float32, q @ X.T over the ground truth's database
    query_store: Path
    database_store: Path

    @classmethod
    def build(cls, service: SearchService, gnd, *, queries: str | os.PathLike | None = None,
              image_root: Path | None = None, log=None) -> "Benchmark":
        db = Path(str((service.index.source or {}).get("path") or ""))
        if not db.name or not is_store(db):
            raise InputError(
                f"the benchmark view evaluates the descriptor store the index was built from ({db}), "
                "which is not there; rebuild the index from a store, or serve without --gnd"
            )
        if queries is None:
            root = image_root or service.images.root
            if root is None:
                raise InputError("--gnd needs the query images: pass --images ROOT (the benchmark's jpg directory) "
                                 "or --queries STORE")
            queries = query_store_for(service, gnd, image_root=root, log=log)
        result, protocol = evaluate_files(gnd=gnd, queries=queries, database=db)
        q = load_descriptors(queries, expected_ids=gnd.qimlist, role="queries")
        x = load_descriptors(db, expected_ids=gnd.imlist, role="database")
        if service.whitening is None and q.meta:
            check_compatible((f"the index {service.index.path}", service.meta), q)
        scores = np.asarray(q.descriptors, dtype=np.float32) @ np.asarray(x.descriptors, dtype=np.float32).T
        service.images.add_ids(list(gnd.qimlist) + list(gnd.imlist))
        return cls(service.name, gnd, result, jsonable(protocol, finite=True), scores, Path(queries), db)

    # ---- the whole benchmark

    @property
    def setups(self) -> list[str]:
        return list(self.result.setups)

    def summary(self) -> dict:
        r = self.result
        per_query = r.per_query(percent=True)
        queries = []
        for i, qid in enumerate(self.gnd.qimlist):
            row = per_query[qid]
            queries.append({
                "id": qid,
                "index": i,
                "AP": {s: row[s]["AP"] for s in self.setups},
                "positives": {s: row[s]["positives"] for s in self.setups},
                "bbx": self.gnd.bbx(i),
            })
        return {
            "name": self.name,
            "dataset": self.gnd.dataset,
            "setups": self.setups,
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
            return self.gnd.qimlist.index(query)
        except ValueError:
            raise RequestError(404, f"no query {query!r} in {self.gnd.dataset}") from None

    def classes(self, qi: int) -> dict[int, str]:
        entry = self.gnd.gnd[qi]
        keys = CLASS_KEYS_REVISITED if "easy" in entry else CLASS_KEYS_CLASSIC
        out: dict[int, str] = {}
        for key in keys:
            for j in entry.get(key, []):
                out.setdefault(int(j), key)
        return out

    def detail(self, query: str, *, setup: str | None = None, k: int = 100) -> dict:
        qi = self.query_index(query)
        setups = protocol_setups(self.gnd)
        setup = setup or ("medium" if "medium" in setups else self.setups[0])
        if setup not in setups:
            raise RequestError(400, f"unknown setup {setup!r}; choose from {', '.join(setups)}")
        ok_keys, junk_keys = setups[setup]
        entry = self.gnd.gnd[qi]
        ok = {int(j) for key in ok_keys for j in entry.get(key, [])}
        junk = {int(j) for key in junk_keys for j in entry.get(key, [])}
        classes = self.classes(qi)
        row = self.scores[qi]
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
        per_query = self.result.per_query(percent=True)[query]
        return {
            "query": {"id": query, "index": qi, "bbx": self.gnd.bbx(qi)},
            "name": self.name,
            "setup": setup,
            "AP": {s: per_query[s]["AP"] for s in self.setups},
            "metrics": per_query,
            "positives": nres,
            "k": k,
            "ranked": ranked,
            "missed": missed,
            "pr": pr,
        }


def comparison(model: Benchmark, baseline: Benchmark) -> dict:
    """The served index (the model) against ``--compare`` (its baseline): both tables and, per
    query, both APs and the change from the baseline to the model (``diff`` = model - baseline)."""
    if model.gnd.sha256 != baseline.gnd.sha256:
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
        "kappas": sm["kappas"],
        "model": {"name": model.name, "metrics": sm["metrics"],
                  "model": (model.protocol.get("model") or {}).get("database")},
        "baseline": {"name": baseline.name, "metrics": sb["metrics"],
                     "model": (baseline.protocol.get("model") or {}).get("database")},
        "diff": "model - baseline",
        "queries": rows,
    }
