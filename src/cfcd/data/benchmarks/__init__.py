"""Benchmark datasets: their official sources, on-disk layout, download and verification.

Registry of the datasets that ``cfcd data download|verify|layout`` knows. Each is a
:class:`BenchmarkDataset` (archives extracted into ``ROOT/<name>/jpg/`` plus small files such
as the gnd pickle placed in ``ROOT/<name>/``). The layout and the sources are documented in
``docs/revisitop.md``.

Example::

    from cfcd.data.benchmarks import download_dataset, verify_dataset
    download_dataset("roxford5k", "data/datasets")
    report = verify_dataset("roxford5k", "data/datasets")
    print(report.summary())
"""

from __future__ import annotations

from cfcd.data.benchmarks.revisitop import (
    DATASETS,
    MIRROR_ENV,
    BenchmarkDataset,
    DownloadSummary,
    RemoteFile,
    VerifyReport,
    check_image,
    describe_layout,
    download_dataset,
    expected_for,
    get_dataset,
    list_datasets,
    load_manifest,
    manifest_from_download,
    resolve_url,
    verify_dataset,
)

__all__ = [
    "DATASETS",
    "MIRROR_ENV",
    "BenchmarkDataset",
    "DownloadSummary",
    "RemoteFile",
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


def register_dataset(dataset: BenchmarkDataset, *, overwrite: bool = False) -> BenchmarkDataset:
    """Add a dataset to the registry (e.g. an in-house benchmark in the revisitop format)."""
    key = dataset.name.lower()
    if key in DATASETS and not overwrite:
        raise ValueError(f"dataset {dataset.name!r} is already registered")
    DATASETS[key] = dataset
    return dataset
