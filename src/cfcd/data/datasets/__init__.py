"""Datasets: their official sources, ground truth, on-disk layout, download and verification.

Registry of the datasets that ``cfcd data download|verify|layout`` knows. Each is a
:class:`BenchmarkDataset` (archives extracted into ``ROOT/<name>/jpg/`` plus small files such
as the gnd pickle placed in ``ROOT/<name>/``) defined in its own module
(:mod:`cfcd.data.datasets.revisitop`, :mod:`cfcd.data.datasets.gldv2`; a new benchmark is one
more, see ``docs/extending.md``). The layouts and sources are documented in ``docs/revisitop.md``
and ``docs/gldv2.md``.

Example::

    from cfcd.data.datasets import download_dataset, verify_dataset
    download_dataset("roxford5k", "data/datasets")
    report = verify_dataset("roxford5k", "data/datasets")
    print(report.summary())
"""

from __future__ import annotations

from cfcd.data.datasets.base import BenchmarkDataset, RemoteFile
from cfcd.data.datasets.gldv2 import GLDv2Dataset, GLDv2Retrieval  # registers gldv2_train, gldv2_retrieval
from cfcd.data.datasets.install import (
    DownloadSummary,
    VerifyReport,
    check_image,
    download_dataset,
    expected_for,
    layout_report,
    load_manifest,
    manifest_from_download,
    verify_dataset,
)
from cfcd.data.datasets.registry import DATASETS, get_dataset, list_datasets, register_dataset
from cfcd.data.datasets.revisitop import DistractorSet, RevisitopDataset  # registers the built-ins
from cfcd.data.download import MIRROR_ENV, resolve_url

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
    "layout_report",
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
