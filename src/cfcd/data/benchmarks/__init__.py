"""Benchmark datasets: their official sources, ground truth, on-disk layout, download and verification.

Registry of the datasets that ``cfcd data download|verify|layout`` knows. Each is a
:class:`BenchmarkDataset` (archives extracted into ``ROOT/<name>/jpg/`` plus small files such
as the gnd pickle placed in ``ROOT/<name>/``) defined in its own module
(:mod:`cfcd.data.benchmarks.revisitop`, :mod:`cfcd.data.benchmarks.gldv2`; a new benchmark is one
more, see ``docs/extending.md``). The layouts and sources are documented in ``docs/revisitop.md``
and ``docs/gldv2.md``.

Example::

    from cfcd.data.benchmarks import download_dataset, verify_dataset
    download_dataset("roxford5k", "data/datasets")
    report = verify_dataset("roxford5k", "data/datasets")
    print(report.summary())
"""

from __future__ import annotations

from cfcd.data.benchmarks.base import (
    DATASETS,
    BenchmarkDataset,
    RemoteFile,
    get_dataset,
    list_datasets,
    register_dataset,
)
from cfcd.data.benchmarks.install import (
    MIRROR_ENV,
    DownloadSummary,
    VerifyReport,
    check_image,
    describe_layout,
    download_dataset,
    expected_for,
    load_manifest,
    manifest_from_download,
    resolve_url,
    verify_dataset,
)
from cfcd.data.benchmarks.revisitop import DistractorSet, RevisitopDataset  # registers the built-ins
from cfcd.data.benchmarks.gldv2 import GLDv2Dataset, GLDv2Retrieval  # registers gldv2_train, gldv2_retrieval

__all__ = [
    "DATASETS",
    "MIRROR_ENV",
    "BenchmarkDataset",
    "DistractorSet",
    "DownloadSummary",
    "GLDv2Dataset",
    "GLDv2Retrieval",
    "RemoteFile",
    "RevisitopDataset",
    "VerifyReport",
    "check_image",
    "describe_layout",
    "download_dataset",
    "expected_for",
    "get_dataset",
    "list_datasets",
    "load_manifest",
    "manifest_from_download",
    "register_dataset",
    "resolve_url",
    "verify_dataset",
]
