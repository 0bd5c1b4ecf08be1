"""Shared test fixtures: real ground truth and real photos, nothing mocked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The real Revisited Oxford/Paris ground truth sits in ../shared beside the checkout.
REVISITOP_GND = Path(os.environ.get("CFCD_REVISITOP_GND", REPO.parent / "shared" / "data" / "revisitop"))


def _limit_threads() -> None:
    # Tests run on 2 cores; one intra-op thread per process keeps parallel runs predictable.
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


_limit_threads()


@pytest.fixture(scope="session", autouse=True)
def _private_cfcd_cache(tmp_path_factory):
    """ONNX graphs (cfcd.extract.runtimes) and other cache entries go to a per-session directory,
    never to the user's cache; the graphs are shared by the tests of the session."""
    if os.environ.get("CFCD_CACHE"):
        yield
        return
    os.environ["CFCD_CACHE"] = str(tmp_path_factory.mktemp("cfcd-cache"))
    try:
        yield
    finally:
        os.environ.pop("CFCD_CACHE", None)


@pytest.fixture(scope="session")
def revisitop_gnd_dir() -> Path:
    if not (REVISITOP_GND / "gnd_roxford5k.pkl").exists():
        pytest.skip(f"real revisitop ground truth not found in {REVISITOP_GND}")
    return REVISITOP_GND


@pytest.fixture(scope="session")
def real_photos() -> dict[str, np.ndarray]:
    """Real RGB uint8 photos shipped by scikit-image and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = image
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}
