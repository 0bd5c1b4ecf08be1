"""What a benchmark dataset is: its sources, its ground truth, its image paths, its metrics.

A benchmark is one :class:`BenchmarkDataset` (a frozen dataclass): the files it is downloaded
from (``archives`` extracted into ``ROOT/<name>/jpg/``, small ``files`` such as the ground truth
placed in ``ROOT/<name>/``) and four rules a subclass gives:

* :meth:`BenchmarkDataset.ground_truth` loads its ground truth (a :class:`cfcd.data.gnd.GroundTruth`);
* :meth:`BenchmarkDataset.image_name` turns a ground-truth name into a path under ``jpg/``;
* :meth:`BenchmarkDataset.expected_images` lists the images the benchmark needs (``verify``);
* :attr:`BenchmarkDataset.metrics` names the metrics it reports (:mod:`cfcd.evaluation.metrics`).

Download, verification and the layout report (:mod:`cfcd.data.datasets.install`) and the
evaluation (:func:`cfcd.evaluation.evaluate_dataset`) work from these alone, so a new benchmark is one
module that defines its dataset and calls :func:`register_dataset` (``docs/extending.md``; the registry: :mod:`cfcd.data.datasets.registry`).
A dataset whose files do not fit "archives into ``jpg/``" (GLDv2: tar parts per split, checked
against md5 sums, downloaded in subsets) overrides :meth:`~BenchmarkDataset.download`,
:meth:`~BenchmarkDataset.verify`, :meth:`~BenchmarkDataset.image_dirs` and
:meth:`~BenchmarkDataset.benchmark_list` (:mod:`cfcd.data.datasets.gldv2`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence
from urllib.parse import urlsplit

from cfcd.data.datasets.install import download_archives, verify_archives
from cfcd.data.download import resolve_url
from cfcd.data.lists import ImageList, gnd_image_list
from cfcd.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from cfcd.data.datasets.install import DownloadSummary, VerifyReport
    from cfcd.data.gnd import GroundTruth
    from cfcd.data.lists import ImageList

IMAGES_DIR = "jpg"

Role = Literal["images", "gnd", "list"]

__all__ = ["BenchmarkDataset", "IMAGES_DIR", "RemoteFile"]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset at its official URL, with its expected size/sha256 (None = unknown)."""

    url: str
    role: Role
    size: int | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name


@dataclass(frozen=True)
class BenchmarkDataset:
    """A benchmark: where its files come from, where they go under ``ROOT/<name>/``, how it is read."""

    name: str
    description: str
    archives: tuple[RemoteFile, ...]      # extracted into jpg/, in this order
    files: tuple[RemoteFile, ...]         # placed as ROOT/<name>/<filename> (gnd, image list)
    flatten: bool                         # move every image to the top of jpg/ (Oxford/Paris)

    #: a set of distractors (a list of images, no queries nor ground truth)
    is_distractor_set: ClassVar[bool] = False
    #: the metrics the benchmark reports (names for :func:`cfcd.evaluation.metrics.parse_metrics`); None:
    #: revisitop's mAP and mP@k for the evaluation's ``kappas``
    metrics: ClassVar[tuple[str, ...] | None] = None
    #: the setups (``{name: (positive keys, junk keys)}``); None: from the ground truth's keys
    setups: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None] = None

    def dir(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.name

    def images_dir(self, root: str | os.PathLike) -> Path:
        return self.dir(root) / IMAGES_DIR

    def file_path(self, root: str | os.PathLike, role: Role) -> Path | None:
        for item in self.files:
            if item.role == role:
                return self.dir(root) / item.filename
        return None

    # -- the rules of one benchmark ------------------------------------------------------------
    def ground_truth(self, root: str | os.PathLike) -> "GroundTruth":
        """The ground truth under ``root`` (``InputError`` naming the file when missing or bad)."""
        raise InputError(f"{self.name} has no ground truth (a distractor set is evaluated with another dataset)")

    def image_name(self, name: str) -> str:
        """The path, relative to ``jpg/``, of the image a ground-truth (or list) line names."""
        return name

    def expected_images(self, root: str | os.PathLike) -> list[str]:  # pragma: no cover - abstract
        """Every image the benchmark needs, relative to ``jpg/`` (queries first)."""
        raise NotImplementedError

    def download(self, root: str | os.PathLike, *, parts: Sequence[str] | None = None, workers: int = 1,
                 force: bool = False, **options: Any) -> "DownloadSummary":
        """Download (or complete) the dataset (the caller holds the download lock); ``options``
        are those of :func:`cfcd.data.datasets.install.download_dataset`. ``workers`` and
        ``force`` only matter to datasets in tar parts; ``parts`` is refused here."""

        if parts:
            raise InputError(f"{self.name}: --parts selects tar parts of GLDv2; {self.name} is downloaded whole")
        return download_archives(self, root, **options)

    def verify(self, root: str | os.PathLike, **options: Any) -> "VerifyReport":
        """Check the files under ``ROOT/<name>/`` (:func:`cfcd.data.datasets.install.verify_dataset`)."""

        return verify_archives(self, root, **options)

    def mirror_url(self, url: str, base_url: str | None) -> str:
        """Where to fetch ``url`` from: on the mirror ``base_url`` (or $CFCD_DATA_MIRROR), the official
        scheme and host replaced (:func:`cfcd.data.download.resolve_url`)."""
        return resolve_url(url, base_url)

    def image_dirs(self, root: str | os.PathLike) -> dict[Path, tuple[RemoteFile, ...]]:
        """Each directory of images and the archives extracted into it (``cfcd data layout``)."""
        return {self.images_dir(root): self.archives}

    def benchmark_list(self, gnd: "GroundTruth", root: str | os.PathLike, *, queries: bool) -> "ImageList":
        """The images ``cfcd benchmark`` describes: revisitop's rule, queries cropped to their boxes."""

        return gnd_image_list(gnd, root=root, queries=queries)

    # -- derived ---------------------------------------------------------------------------
    def image_list(self, root: str | os.PathLike, *, queries: bool = False) -> "ImageList":
        """The database (or the queries, with their boxes) as an :class:`~cfcd.data.lists.ImageList`."""

        gt = self.ground_truth(root)
        names = list(gt.qimlist if queries else gt.imlist)
        boxes = None
        if queries:
            raw = [gt.bbx(q) for q in range(len(names))]
            if any(b is not None for b in raw):  # boxes for all queries or for none
                bad = [names[q] for q, b in enumerate(raw) if b is None or len(b) != 4]
                if bad:
                    raise InputError(f"{gt.path}: query {bad[0]!r} has no 4-number 'bbx'")
                boxes = [tuple(float(v) for v in b) for b in raw]
        directory = self.images_dir(root)
        return ImageList(ids=names, paths=[directory / self.image_name(n) for n in names], boxes=boxes,
                         source=f"{gt.path}:{'qimlist' if queries else 'imlist'}")
