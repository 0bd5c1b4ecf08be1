"""Revisited Oxford / Paris and the R1M distractors: official sources, layout, download, verify.

``ROOT/<ds>/jpg/`` holds the images, ``ROOT/<ds>/gnd_<ds>.pkl`` the ground truth; downloads
resume, are checked against a manifest and never leave ``jpg/`` half-filled. The layout, the
official URLs, the mirror rule and the differences from ``revisitop/python/download.py`` are in
``docs/revisitop.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from cfcd.data.datasets.base import BenchmarkDataset, RemoteFile
from cfcd.data.datasets.registry import register_dataset
from cfcd.data.gnd import find_gnd, load_gnd
from cfcd.errors import InputError

__all__ = ["DistractorSet", "RevisitopDataset"]

VGG_DATA = "https://www.robots.ox.ac.uk/~vgg/data"
REVISITOP_DATA = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
R1M_ARCHIVES = 100


@dataclass(frozen=True)
class RevisitopDataset(BenchmarkDataset):
    """A revisitop benchmark: ``gnd_<name>.pkl`` (Easy/Medium/Hard), images ``jpg/<name>.jpg``."""

    def ground_truth(self, root: str | os.PathLike):
        """``ROOT/<name>/gnd_<name>.pkl`` (or the revisitop/cirtorch layouts, :func:`cfcd.data.gnd.find_gnd`)."""

        return load_gnd(find_gnd(self.name, root), self.name)

    def image_name(self, name: str) -> str:
        return f"{name}.jpg"

    def expected_images(self, root: str | os.PathLike) -> list[str]:
        gt = self.ground_truth(root)
        return [self.image_name(x) for x in gt.qimlist] + [self.image_name(x) for x in gt.imlist]


@dataclass(frozen=True)
class DistractorSet(BenchmarkDataset):
    """Distractor images named by a list file (one path under ``jpg/`` per line, extension included)."""

    is_distractor_set: ClassVar[bool] = True

    def expected_images(self, root: str | os.PathLike) -> list[str]:
        path = self.file_path(root, "list")
        if path is None or not path.is_file():
            raise InputError(f"{path}: image list not found; run 'cfcd data download {self.name} --root {root}'")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# sha256 and size of the published gnd pickles (pickle protocol 3, as served by cmp.felk.cvut.cz).
_GND_KNOWN = {
    "roxford5k": (149871, "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471"),
    "rparis6k": (276508, "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499"),
}


def _gnd_file(name: str) -> RemoteFile:
    size, sha = _GND_KNOWN[name]
    return RemoteFile(f"{REVISITOP_DATA}/{name}/gnd_{name}.pkl", "gnd", size, sha)


register_dataset(RevisitopDataset(
    name="roxford5k",
    description="Revisited Oxford5k: 4993 database images + 70 queries (face-blurred -v1 images)",
    archives=(RemoteFile(f"{VGG_DATA}/oxbuildings/oxbuild_images-v1.tgz", "images"),),
    files=(_gnd_file("roxford5k"),),
    flatten=True,
))
register_dataset(RevisitopDataset(
    name="rparis6k",
    description="Revisited Paris6k: 6322 database images + 70 queries (face-blurred -v1 images)",
    archives=(
        RemoteFile(f"{VGG_DATA}/parisbuildings/paris_1-v1.tgz", "images"),
        RemoteFile(f"{VGG_DATA}/parisbuildings/paris_2-v1.tgz", "images"),
    ),
    files=(_gnd_file("rparis6k"),),
    flatten=True,
))
register_dataset(DistractorSet(
    name="revisitop1m",
    description="R1M: 1,001,001 distractor images in 100 tarballs",
    archives=tuple(
        RemoteFile(f"{REVISITOP1M}/jpg/revisitop1m.{i}.tar.gz", "images") for i in range(1, R1M_ARCHIVES + 1)
    ),
    files=(RemoteFile(f"{REVISITOP1M}/revisitop1m.txt", "list"),),
    flatten=False,
))
