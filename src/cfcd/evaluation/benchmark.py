"""The benchmark workflow, once: describe a ground truth's queries (cropped) and database, check the
distractors, evaluate. ``cfcd benchmark``, the trainer's benchmark hook, the demo and the web page
all call :func:`run_benchmark`.

Which images are described and how they are scored is the benchmark dataset's rule
(:class:`cfcd.data.datasets.BenchmarkDataset`: ``benchmark_list``, ``setups``, ``metrics``);
without one, revisitop's (queries cropped to their boxes, Easy/Medium/Hard, mAP and mP@k). GLDv2
retrieval describes whole test images and scores DELF's mAP@100 (``docs/gldv2.md``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cfcd.data.lists import gnd_image_list
from cfcd.errors import CfcdError
from cfcd.evaluation import evaluate_files
from cfcd.extract import extract_to_store
from cfcd.store import check_compatible, open_store

PARTS = (("queries", True), ("database", False))


@dataclass
class BenchmarkResult:
    """The evaluation without and (when distractors were given) with distractors, and the stores."""

    plain: Any  # cfcd.evaluation.EvaluationResult
    protocol: dict
    with_distractors: Any = None
    protocol_distractors: dict | None = None
    stores: dict = field(default_factory=dict)  # part -> DescriptorStore
    summaries: dict = field(default_factory=dict)  # part -> ExtractSummary
    stopped: bool = False

    def to_dict(self) -> dict:
        out = {"without_distractors": self.plain.to_dict(self.protocol)} if self.plain is not None else {}
        if self.with_distractors is not None:
            out["with_distractors"] = self.with_distractors.to_dict(self.protocol_distractors)
        return out


def describe_benchmark(model, gnd, root: str | os.PathLike, out: str | os.PathLike, options, *,
                       weights=None, overwrite: bool = False, log: Callable[[str], None] | None = None,
                       on_part: Callable[[str, Any], None] | None = None,
                       parts: Sequence[str] = ("queries", "database"), dataset=None) -> tuple[dict, dict, bool]:
    """Extract ``out/queries`` (cropped, in qimlist order) and ``out/database`` (resumable);
    ``parts=("queries",)`` for the queries alone (the web page evaluates a served database).
    ``dataset`` (a :class:`cfcd.data.datasets.BenchmarkDataset`) chooses the images; default revisitop's.

    Returns ``(stores, summaries, stopped)``. A benchmark image that cannot be read is an error:
    a benchmark with a hole in it gives a number that cannot be compared with anyone's.
    """

    out = Path(out)
    gnd_meta = {"gnd": {"dataset": gnd.dataset, "path": str(gnd.path), "sha256": gnd.sha256}}
    stores, summaries = {}, {}
    unknown = set(parts) - {p for p, _ in PARTS}
    if unknown:
        raise ValueError(f"unknown benchmark parts {sorted(unknown)}; choose from queries, database")
    for part, queries in PARTS:
        if part not in parts:
            continue
        images = (dataset.benchmark_list(gnd, root, queries=queries) if dataset is not None
                  else gnd_image_list(gnd, root=root, queries=queries))
        summary = extract_to_store(model, images, out / part, options,
                                   # whole-image queries (GLDv2) are described as database images are
                                   weights=weights, queries=queries and images.boxes is not None,
                                   overwrite=overwrite, log=log,
                                   extra_meta={**gnd_meta, "benchmark_part": part})
        if summary.stopped:
            return stores, summaries, True
        if summary.failures:
            first = "; ".join(f"{f['id']}: {f['reason']}" for f in summary.failures[:3])
            raise CfcdError(f"{out / part}: {len(summary.failures)} benchmark image(s) could not be read "
                            f"({first}); fix the dataset")
        stores[part], summaries[part] = summary.store, summary
        if on_part is not None:
            on_part(part, summary)
    return stores, summaries, False


def run_benchmark(model, gnd, root: str | os.PathLike, out: str | os.PathLike, options, *, weights=None,
                  distractors: Sequence[str | os.PathLike] = (), whiten=None, overwrite: bool = False,
                  evaluate: bool = True, log: Callable[[str], None] | None = None,
                  on_part: Callable[[str, Any], None] | None = None, dataset=None) -> BenchmarkResult:
    """Describe the benchmark into ``out`` and evaluate it (with ``distractors`` as a second result).
    ``dataset`` (a :class:`cfcd.data.datasets.BenchmarkDataset`) gives the images, setups and
    metrics; default revisitop's.

    Under torchrun every rank extracts its share; only the result of rank 0 is meaningful, and
    ``evaluate=False`` lets the other ranks skip the evaluation.
    """

    out = Path(out)
    stores, summaries, stopped = describe_benchmark(model, gnd, root, out, options, weights=weights,
                                                    overwrite=overwrite, log=log, on_part=on_part, dataset=dataset)
    result = BenchmarkResult(None, {}, stores=stores, summaries=summaries, stopped=stopped)
    if stopped or not evaluate:
        return result
    for path in distractors:  # before the evaluation: a mismatch must not cost a 1M-row pass
        check_compatible(stores["database"], open_store(path))
    scoring = {"setups": dataset.setups, "metrics": dataset.metrics} if dataset is not None else {}
    result.plain, result.protocol = evaluate_files(gnd=gnd, queries=out / "queries", database=out / "database",
                                                   whiten=whiten, **scoring)
    if distractors:
        result.with_distractors, result.protocol_distractors = evaluate_files(
            gnd=gnd, queries=out / "queries", database=out / "database", distractors=list(distractors), whiten=whiten,
            **scoring)
    return result
