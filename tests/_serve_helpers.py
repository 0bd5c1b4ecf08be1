"""A tiny revisitop-layout benchmark of real photos, its stores and index, for the serve tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

MODEL = "gem_efficientnet_lite0"
LANDMARKS = ("coffee", "astronaut", "chelsea", "rocket")
DISTRACTORS = ("camera", "coins", "moon", "grass", "brick", "china", "flower")


def _photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in LANDMARKS + DISTRACTORS[:5]}
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = image
    out = {}
    for name, image in photos.items():
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return out


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    s = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(8, round(w * s)), max(8, round(h * s))), Image.BILINEAR))


def _crop(image: np.ndarray, y0: float, x0: float, frac: float, angle: float = 0.0) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    ch, cw = int(h * frac), int(w * frac)
    y, x = int((h - ch) * y0), int((w - cw) * x0)
    view = Image.fromarray(image[y:y + ch, x:x + cw])
    if angle:
        view = view.rotate(angle, resample=Image.BILINEAR)
    return np.asarray(view)


def build_benchmark(root: Path, side: int = 128) -> Path:
    """``root/jpg/*.jpg`` and ``root/gnd_tiny.pkl``: 4 queries with boxes; per query 2 easy, 1 hard
    and 1 junk view; distractors. Returns the gnd path."""
    from PIL import Image

    jpg = root / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    photos = {k: _resize(v, side) for k, v in _photos().items()}
    imlist, qimlist, gnd = [], [], []

    def save(name, image):
        Image.fromarray(image).save(jpg / f"{name}.jpg", quality=92)
        imlist.append(name)
        return len(imlist) - 1

    for name in DISTRACTORS:
        save(name, photos[name])
    for name in LANDMARKS:
        image = photos[name]
        h, w = image.shape[:2]
        Image.fromarray(image).save(jpg / f"{name}_query.jpg", quality=92)
        qimlist.append(f"{name}_query")
        entry = {"bbx": [w * 0.1, h * 0.1, w * 0.9, h * 0.9], "easy": [], "hard": [], "junk": []}
        entry["easy"].append(save(f"{name}_easy0", _crop(image, 0.1, 0.2, 0.9)))
        entry["easy"].append(save(f"{name}_easy1", _crop(image, 0.8, 0.7, 0.85)))
        entry["hard"].append(save(f"{name}_hard0", _crop(image, 0.5, 0.5, 0.5, angle=15)))
        entry["junk"].append(save(f"{name}_junk0", _crop(image, 0.0, 0.0, 0.3)))
        gnd.append(entry)
    path = root / "gnd_tiny.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=3)
    return path


def build_index_dir(root: Path) -> dict[str, Path]:
    """Benchmark, database store, query store and flat index under ``root`` (single scale, lite0)."""
    import cfcd.models
    from cfcd.data.gnd import load_gnd
    from cfcd.data.lists import gnd_image_list
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.index import build_index

    bench = root / "bench"
    gnd_path = build_benchmark(bench)
    gnd = load_gnd(gnd_path)
    model = cfcd.models.create(MODEL)
    options = ExtractOptions(scales=parse_scales("single"), workers=0, progress=False)
    quiet = lambda message: None  # noqa: E731
    db = root / "db.store"
    q = root / "q.store"
    extract_to_store(model, gnd_image_list(gnd, root=bench), db, options, log=quiet)
    extract_to_store(model, gnd_image_list(gnd, root=bench, queries=True), q, options, queries=True, log=quiet)
    index = root / "index"
    build_index(db, "flat", out=index)
    return {"bench": bench, "gnd": gnd_path, "db": db, "queries": q, "index": index, "jpg": bench / "jpg"}


_BUILT: dict[str, dict[str, Path]] = {}


def built(tmp_path_factory) -> dict[str, Path]:
    """The benchmark and index, built once per test process (shared by the serve test modules)."""
    if "main" not in _BUILT:
        _BUILT["main"] = build_index_dir(tmp_path_factory.mktemp("serve-data"))
    return _BUILT["main"]


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
