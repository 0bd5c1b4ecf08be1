"""cfcd benchmark|evaluate --dataset gldv2_retrieval on a miniature mirror: whole-image queries,
Public/Private mAP@100 equal to DELF's metric on the exact top 100 of the stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _download_helpers import FileServer, gldv2_mirror
from _reference_delf import delf_mean_average_precision, delf_mean_precisions, delf_read_solution
from cfcd.cli import main
from cfcd.store import open_store

FAST = ["--model", "gem_efficientnet_lite0", "--scales", "single", "--max-size", "64", "--workers", "0",
        "--no-progress", "--device", "cpu"]


def test_gldv2_retrieval_benchmark_equals_delf(tmp_path, capsys):
    mirror = gldv2_mirror()
    root, out = tmp_path / "data", tmp_path / "bench"
    with FileServer(mirror.files) as server:
        assert main(["data", "download", "gldv2_retrieval", "--root", str(root), "--base-url", server.url,
                     "--parts", "index:0-1", "--parts", "test:0", "--no-progress", "--backoff", "0"]) == 0
    assert main(["benchmark", "--dataset", "gldv2_retrieval", "--root", str(root), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "GLDv2 public mAP@100" in printed and "mPrecision@100" in printed
    report = json.loads((out / "benchmark.json").read_text())["without_distractors"]

    queries, database = open_store(out / "queries"), open_store(out / "database")
    public, private = delf_read_solution(mirror.solution)
    assert sorted(queries.ids) == sorted({**public, **private})  # the scored test images; the Ignored one is not
    assert len(database.ids) == 16
    assert queries.meta["extract"]["crop_rule"] is None  # whole images, no box
    scores = np.asarray(queries.descriptors, np.float64) @ np.asarray(database.descriptors, np.float64).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    predictions = {q: [database.ids[j] for j in top[i]] for i, q in enumerate(queries.ids)}
    for name, solution in (("public", public), ("private", private)):
        chosen = {q: predictions[q] for q in solution}
        assert report[name]["mAP@100"] == pytest.approx(100 * delf_mean_average_precision(chosen, solution), abs=1e-4)
        assert report[name]["mPrecision@100"] == pytest.approx(100 * delf_mean_precisions(chosen, solution)[99],
                                                               abs=1e-4)
    assert report["all"]["mAP@100"] > 0
    assert "DELF MeanAveragePrecision" in report["protocol"]["metric"]

    # cfcd evaluate scores the same stores to the same numbers
    assert main(["evaluate", "--dataset", "gldv2_retrieval", "--root", str(root), "-q", str(out / "queries"),
                 "-x", str(out / "database"), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for name in ("public", "private", "all"):
        assert evaluated[name] == pytest.approx(report[name])
