"""The registered datasets: ``cfcd data download|verify|layout``, ``cfcd benchmark`` and ``cfcd evaluate``
know a dataset by its lower-case name. Built-ins register when :mod:`cfcd.data.datasets` is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfcd.utils.registry import Registry

if TYPE_CHECKING:
    from cfcd.data.datasets.base import BenchmarkDataset

DATASETS: Registry[BenchmarkDataset] = Registry("dataset", key=str.lower)


def register_dataset(dataset: BenchmarkDataset, *, overwrite: bool = False) -> BenchmarkDataset:
    """Add a dataset (an equal one registered again is harmless: modules may be imported twice)."""
    same = dataset.name in DATASETS and DATASETS.get(dataset.name) == dataset
    return DATASETS.register(dataset.name, dataset, replace=overwrite or same)


def list_datasets() -> list[str]:
    return DATASETS.names()


def get_dataset(name: str) -> BenchmarkDataset:
    return DATASETS.get(name)
