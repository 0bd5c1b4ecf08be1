"""The demo's data: a revisitop-layout benchmark and a disjoint GLDv2-layout training list, built
offline from real photos that installed packages ship.

Sources (see :data:`CATALOG`): scikit-image's ``skimage.data``, scikit-learn's sample images and,
when Debian's ``opencv-doc`` is installed, its ``examples/data`` photos, which include real
multi-view pairs (``box``/``box_in_scene``, ``graf1``/``graf3``, ``leuvenA``/``leuvenB``, the
``aloe`` stereo pair, ...). Every *source* (a scene: one photo, or several real photos of it) has
one role:

* ``test``: a benchmark query (the photo, cropped by its box); its database positives are its real
  second views and synthetic views graded **easy / hard / junk** by severity (:func:`synthetic_view`);
* ``val``: the same, in a second, smaller benchmark (``demoval``) used for the held-out mAP per
  training epoch and to tune the recipe -- never the test queries;
* ``train``: one class of the training list (the photo, its real views and synthetic views of
  every severity);
* ``distractor``: a photo (and one view of it) in the test database, relevant to no query.

No source has two roles, so no photo and no view of a photo is both in the training list and in a
benchmark; ``manifest.json`` records the source of every image written, and
:func:`check_disjoint` verifies it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cfcd.errors import InputError
from cfcd.train.data import write_labelled_list
from cfcd.utils.io import atomic_write_json, atomic_write_text

OPENCV_DATA = Path(os.environ.get("CFCD_OPENCV_DATA", "/usr/share/doc/opencv-doc/examples/data"))
TEST_DATASET = "demo"
VAL_DATASET = "demoval"


@dataclass(frozen=True)
class Source:
    """One scene: ``views[0]`` is the photo a query or class starts from, ``views[1:]`` are real
    other photos of it; ``grades`` says how each real second view counts for the query."""

    name: str
    origin: str                 # skimage | sklearn | opencv
    views: tuple[str, ...]      # loader keys (skimage attribute, sklearn stem, opencv file name)
    role: str                   # test | val | train | distractor
    grades: tuple[str, ...] = ()  # one per views[1:]: easy or hard


def _s(name, views, role, grades=(), origin="skimage"):
    return Source(name, origin, tuple(views), role, tuple(grades))


def _cv(name, files, role, grades=()):
    return Source(name, "opencv", tuple(files), role, tuple(grades))


#: Every source and its role, fixed so that the demo is the same on every machine that has the
#: same packages (the opencv-doc sources are dropped where it is not installed).
CATALOG: tuple[Source, ...] = (
    # benchmark queries
    _s("coffee", ["coffee"], "test"),
    _s("astronaut", ["astronaut"], "test"),
    _s("chelsea", ["chelsea"], "test"),
    _s("rocket", ["rocket"], "test"),
    _s("motorcycle", ["motorcycle_left", "motorcycle_right"], "test", ["easy"]),
    _cv("box", ["box.png", "box_in_scene.png"], "test", ["hard"]),
    _cv("graffiti", ["graf1.png", "graf3.png"], "test", ["hard"]),
    _cv("leuven", ["leuvenA.jpg", "leuvenB.jpg"], "test", ["easy"]),
    _cv("aloe", ["aloeL.jpg", "aloeR.jpg"], "test", ["easy"]),
    _cv("baboon", ["baboon.jpg"], "test"),
    _cv("building", ["building.jpg"], "test"),
    _cv("fruits", ["fruits.jpg"], "test"),
    _cv("squirrel", ["squirrel_cls.jpg"], "test"),
    # held-out validation benchmark (recipe tuning, mAP per epoch)
    _s("china", ["china"], "val", origin="sklearn"),
    _s("retina", ["retina"], "val"),
    _cv("basketball", ["basketball1.png", "basketball2.png"], "val", ["easy"]),
    _cv("rubberwhale", ["rubberwhale1.png", "rubberwhale2.png"], "val", ["easy"]),
    _cv("butterfly", ["butterfly.jpg"], "val"),
    _cv("starry_night", ["starry_night.jpg"], "val"),
    # training classes
    _s("flower", ["flower"], "train", origin="sklearn"),
    _s("hubble", ["hubble_deep_field"], "train"),
    _s("coins", ["coins"], "train"),
    _s("camera", ["camera"], "train"),
    _s("ihc", ["immunohistochemistry"], "train"),
    _s("page", ["page"], "train"),
    _s("brick", ["brick"], "train"),
    _s("cell", ["cell"], "train"),
    _s("clock", ["clock"], "train"),
    _s("text", ["text"], "train"),
    _cv("suzanne", ["Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg"], "train"),
    _cv("aerial", ["aero1.jpg", "aero3.jpg"], "train"),
    _cv("ela", ["ela_original.jpg", "ela_modified.jpg"], "train"),
    _cv("books", ["left.jpg", "right.jpg"], "train"),
    _cv("imagetext", ["imageTextN.png", "imageTextR.png"], "train"),
    _cv("happyfish", ["HappyFish.jpg"], "train"),
    _cv("board", ["board.jpg"], "train"),
    _cv("chicky", ["chicky_512.png"], "train"),
    _cv("messi", ["messi5.jpg"], "train"),
    _cv("orange", ["orange.jpg"], "train"),
    _cv("stuff", ["stuff.jpg"], "train"),
    _cv("licenseplate", ["licenseplate_motion.jpg"], "train"),
    _cv("smarties", ["smarties.png"], "train"),
    _cv("sudoku", ["sudoku.png"], "train"),
    _cv("cards", ["cards.png"], "train"),
    _cv("robot", ["ml.png"], "train"),
    _cv("text_defocus", ["text_defocus.jpg"], "train"),
    _cv("apple", ["apple.jpg"], "train"),
    _cv("home", ["home.jpg"], "train"),
    _cv("pca_test", ["pca_test1.jpg"], "train"),
    # distractors
    _s("grass", ["grass"], "distractor"),
    _s("gravel", ["gravel"], "distractor"),
    _s("moon", ["moon"], "distractor"),
    _s("horse", ["horse"], "distractor"),
    _s("logo", ["logo"], "distractor"),
    _cv("linux", ["LinuxLogo.jpg"], "distractor"),
    _cv("windows", ["WindowsLogo.jpg"], "distractor"),
    _cv("opencv_logo", ["opencv-logo.png"], "distractor"),
    _cv("blox", ["blox.jpg"], "distractor"),
    _cv("chessboard", ["left01.jpg"], "distractor"),
    _cv("shapes", ["pic1.png"], "distractor"),
    _cv("shapes2", ["pic3.png"], "distractor"),
    _cv("notes", ["notes.png"], "distractor"),
    _cv("text_motion", ["text_motion.jpg"], "distractor"),
)


@dataclass
class Sizes:
    """How much data a mode builds (see :data:`MODES` in :mod:`cfcd.demo.pipeline`)."""

    max_side: int = 320           # longer side of every written photo
    train_views: int = 8          # synthetic views per training class (besides its real photos)
    test_views: dict = field(default_factory=lambda: {"easy": 2, "hard": 2, "junk": 1})
    max_test: int | None = None   # keep only the first N test sources (the tiny mode)
    max_train: int | None = None
    max_val: int | None = None
    max_distractors: int | None = None


# ----------------------------------------------------------------------------------------------
# photos
# ----------------------------------------------------------------------------------------------


def opencv_available() -> bool:
    return (OPENCV_DATA / "graf1.png").is_file()


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _loader(origin: str) -> Callable[[str], np.ndarray]:
    if origin == "opencv":
        from PIL import Image

        def load(name: str) -> np.ndarray:
            with Image.open(OPENCV_DATA / name) as im:
                return _rgb(np.asarray(im.convert("RGB")))
        return load
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - the demo extra installs both
        raise InputError("the demo photos come from scikit-image and scikit-learn: pip install 'cfcd[demo]' "
                         "(or search your own photos with cfcd demo --images DIR --query PHOTO)") from exc
    if origin == "sklearn":
        sample = load_sample_images()
        by_stem = {Path(f).stem: im for f, im in zip(sample.filenames, sample.images)}
        return lambda name: _rgb(by_stem[name])
    stereo = {}

    def load_skimage(name: str) -> np.ndarray:
        if name.startswith("motorcycle_"):
            if not stereo:
                left, right, _ = data.stereo_motorcycle()
                stereo.update(motorcycle_left=left, motorcycle_right=right)
            return _rgb(stereo[name])
        return _rgb(getattr(data, name)())
    return load_skimage


def available_sources(sizes: Sizes | None = None) -> list[Source]:
    """The catalog entries whose photos are installed, trimmed to the ``sizes`` limits."""
    sizes = sizes or Sizes()
    have_cv = opencv_available()
    out: list[Source] = []
    counts: dict[str, int] = {}
    limits = {"test": sizes.max_test, "train": sizes.max_train, "val": sizes.max_val,
              "distractor": sizes.max_distractors}
    for src in CATALOG:
        if src.origin == "opencv" and not have_cv:
            continue
        n = counts.get(src.role, 0)
        if limits[src.role] is not None and n >= limits[src.role]:
            continue
        counts[src.role] = n + 1
        out.append(src)
    return out


def fit(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so that the longer side is at most ``max_side`` (antialiased)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.LANCZOS))


# ----------------------------------------------------------------------------------------------
# synthetic views
# ----------------------------------------------------------------------------------------------

#: Severity t in [0, 1] (easy..hard) drives every transform; junk keeps only a small piece.
SEVERITY = {"easy": (0.0, 0.25), "hard": (0.7, 1.0), "junk": (0.5, 1.0), "train": (0.0, 1.0)}


def synthetic_view(image: np.ndarray, grade: str, rng: np.random.Generator) -> np.ndarray:
    """A new photo of the same scene: crop, perspective, scale, rotation, lighting, blur, occlusion
    and JPEG, each stronger with the severity of ``grade`` (easy, hard, junk, or train: any)."""
    import cv2
    from PIL import Image, ImageFilter

    lo, hi = SEVERITY[grade]
    t = float(rng.uniform(lo, hi))
    h, w = image.shape[:2]
    keep = float(rng.uniform(0.15, 0.25)) if grade == "junk" else 0.92 - 0.42 * t + float(rng.uniform(-0.04, 0.04))
    ch, cw = max(16, int(h * keep)), max(16, int(w * keep))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    view = np.ascontiguousarray(image[y0:y0 + ch, x0:x0 + cw])
    # perspective: move each corner by up to `p` of the side, plus a rotation about the centre
    p = 0.15 * t
    src = np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]])
    jitter = rng.uniform(-p, p, size=(4, 2)) * np.float32([cw, ch])
    angle = float(rng.uniform(-1, 1)) * (4 + 22 * t)
    centre = np.float32([cw / 2, ch / 2])
    rad = np.deg2rad(angle)
    rot = np.float32([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])
    dst = (src + jitter - centre) @ rot.T + centre
    scale = float(rng.uniform(0.9, 1.1)) * (1.0 - 0.35 * t)
    dst = (dst - dst.min(0)) * scale
    out_w, out_h = max(16, int(np.ceil(dst[:, 0].max()))), max(16, int(np.ceil(dst[:, 1].max())))
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    # the corners the warp uncovers: neutral grey (a random colour read as a second, coloured border)
    view = cv2.warpPerspective(view, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
    # lighting: gain, contrast about the mean, a colour cast
    gain = float(np.exp(rng.uniform(-1, 1) * 0.45 * t + rng.uniform(-0.08, 0.08)))
    contrast = 1.0 - float(rng.uniform(0, 0.4)) * t
    cast = rng.uniform(-12, 12, size=3) * t
    x = view.astype(np.float32)
    x = (x - x.mean()) * contrast + x.mean()
    x = np.clip(x * gain + cast, 0, 255).astype(np.uint8)
    # occlusion: a flat rectangle of up to 20% of the area
    if t > 0.3 and rng.random() < 0.8:
        area = float(rng.uniform(0.05, 0.2)) * out_h * out_w
        oh = int(min(out_h, max(4, np.sqrt(area * rng.uniform(0.5, 2.0)))))
        ow = int(min(out_w, max(4, area / max(1, oh))))
        oy, ox = int(rng.integers(0, out_h - oh + 1)), int(rng.integers(0, out_w - ow + 1))
        x[oy:oy + oh, ox:ox + ow] = rng.integers(0, 256, size=3).astype(np.uint8)
    pil = Image.fromarray(x)
    blur = 2.0 * t * float(rng.uniform(0.5, 1.0))
    if blur > 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(round(95 - 60 * t)))
    buffer.seek(0)
    with Image.open(buffer) as jpeg:
        return np.asarray(jpeg.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# writing the benchmark and the training list
# ----------------------------------------------------------------------------------------------


@dataclass
class DemoData:
    root: Path                 # DIR/data
    test_gnd: Path             # DIR/data/benchmarks/demo/gnd_demo.pkl
    val_gnd: Path              # DIR/data/benchmarks/demoval/gnd_demoval.pkl
    train_list: Path           # DIR/data/train/train_list.txt
    num_classes: int
    manifest: dict

    @property
    def benchmarks(self) -> Path:
        return self.root / "benchmarks"

    @property
    def train_root(self) -> Path:
        return self.train_list.parent


def _save(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="JPEG", quality=92)
    os.replace(tmp, path)


def _write_benchmark(root: Path, dataset: str, sources: list[Source], distractors: list[Source],
                     photos: dict, sizes: Sizes, rng: np.random.Generator, manifest: dict) -> Path:
    jpg = root / dataset / "jpg"
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []

    def add(name: str, image: np.ndarray, source: str) -> int:
        _save(image, jpg / f"{name}.jpg")
        imlist.append(name)
        manifest[f"{dataset}/{name}"] = source
        return len(imlist) - 1

    for src in sources:
        views = photos[src.name]
        query = views[0]
        h, w = query.shape[:2]
        qname = f"{src.name}_query"
        _save(query, jpg / f"{qname}.jpg")
        manifest[f"{dataset}/{qname}"] = src.name
        qimlist.append(qname)
        entry = {"bbx": [round(w * 0.05, 1), round(h * 0.05, 1), round(w * 0.95, 1), round(h * 0.95, 1)],
                 "easy": [], "hard": [], "junk": []}
        for k, (real, grade) in enumerate(zip(views[1:], src.grades)):
            entry[grade].append(add(f"{src.name}_real{k + 1}", real, src.name))
        for grade, count in sizes.test_views.items():
            for k in range(count):
                entry[grade].append(add(f"{src.name}_{grade}{k}", synthetic_view(query, grade, rng), src.name))
        gnd.append(entry)
    for src in distractors:
        image = photos[src.name][0]
        add(src.name, image, src.name)
        add(f"{src.name}_view", synthetic_view(image, "easy", rng), src.name)
    for entry in gnd:
        for key in ("easy", "hard", "junk"):
            entry[key] = sorted(entry[key])
    path = root / dataset / f"gnd_{dataset}.pkl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:  # writing a pickle is safe; reading uses the restricted unpickler
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=3)
    os.replace(tmp, path)
    return path


def build_demo_data(out: str | os.PathLike, sizes: Sizes | None = None, *, seed: int = 0,
                    progress: bool = False) -> DemoData:
    """Write the test and validation benchmarks and the training list under ``out``.

    Layout: ``out/benchmarks/{demo,demoval}/{jpg/,gnd_<ds>.pkl}`` (revisitop, so ``--dataset demo
    --root out/benchmarks`` works with every command), ``out/train/<class>/<k>.jpg`` with
    ``out/train/train_list.txt`` (``path label``, GLDv2 layout) and ``out/manifest.json``.
    The same ``sizes`` and ``seed`` give the same files.
    """

    sizes = sizes or Sizes()
    root = Path(out)
    sources = available_sources(sizes)
    by_role: dict[str, list[Source]] = {}
    for src in sources:
        by_role.setdefault(src.role, []).append(src)
    if any(len(by_role.get(role, [])) < 2 for role in ("test", "val", "train")):
        raise InputError("not enough demo photos found (scikit-image, scikit-learn)")
    loaders = {origin: _loader(origin) for origin in {src.origin for src in sources}}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources), desc="photos", unit="photo", dynamic_ncols=True, leave=False)
    photos = {}
    for src in sources:
        photos[src.name] = [fit(loaders[src.origin](v), sizes.max_side) for v in src.views]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rng = np.random.default_rng(seed)
    manifest: dict[str, str] = {}
    test_gnd = _write_benchmark(root / "benchmarks", TEST_DATASET, by_role["test"], by_role.get("distractor", []),
                                photos, sizes, rng, manifest)
    val_sizes = Sizes(max_side=sizes.max_side, test_views={"easy": 1, "hard": 2, "junk": 1})
    val_gnd = _write_benchmark(root / "benchmarks", VAL_DATASET, by_role["val"], [], photos, val_sizes, rng, manifest)
    paths: list[str] = []
    labels: list[int] = []
    train_root = root / "train"
    for label, src in enumerate(by_role["train"]):
        images = list(photos[src.name])
        images += [synthetic_view(images[0], "train", rng) for _ in range(sizes.train_views)]
        for k, image in enumerate(images):
            rel = f"{src.name}/{k:03d}.jpg"
            _save(image, train_root / rel)
            paths.append(rel)
            labels.append(label)
            manifest[f"train/{rel}"] = src.name
    train_list = train_root / "train_list.txt"
    write_labelled_list(train_list, paths, labels)
    info = {
        "seed": seed,
        "sizes": {"max_side": sizes.max_side, "train_views": sizes.train_views, "test_views": sizes.test_views},
        "opencv_doc": opencv_available(),
        "roles": {role: [s.name for s in group] for role, group in by_role.items()},
        "images": manifest,
    }
    atomic_write_json(root / "manifest.json", info)
    atomic_write_text(root / "README.txt", _README.format(n_test=len(by_role["test"]),
                                                         n_train=len(by_role["train"])))
    return DemoData(root, test_gnd, val_gnd, train_list, len(by_role["train"]), info)


def load_demo_data(root: str | os.PathLike) -> DemoData:
    """Reopen what :func:`build_demo_data` wrote."""
    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{root}: no demo data here (no manifest.json)")
    info = json.loads(manifest.read_text(encoding="utf-8"))
    bench = root / "benchmarks"
    return DemoData(root, bench / TEST_DATASET / f"gnd_{TEST_DATASET}.pkl", bench / VAL_DATASET / f"gnd_{VAL_DATASET}.pkl",
                    root / "train" / "train_list.txt", len(info["roles"]["train"]), info)


def check_disjoint(root: str | os.PathLike) -> None:
    """Raise unless every source has one role and the training list and benchmarks share no source."""
    info = json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8"))
    where: dict[str, set] = {}
    for image, source in info["images"].items():
        part = image.split("/", 1)[0]
        where.setdefault(source, set()).add("train" if part == "train" else "benchmark")
    both = sorted(s for s, parts in where.items() if len(parts) > 1)
    if both:
        raise InputError(f"{root}: sources both in the training list and a benchmark: {both}")
    roles: dict[str, str] = {}
    for role, names in info["roles"].items():
        for name in names:
            if name in roles:
                raise InputError(f"{root}: source {name!r} has two roles ({roles[name]}, {role})")
            roles[name] = role


_README = """cfcd demo data (written by `cfcd demo`)

benchmarks/demo       revisitop layout, {n_test} queries: cfcd evaluate --dataset demo --root benchmarks ...
benchmarks/demoval    held-out validation benchmark (recipe tuning, mAP per epoch)
train/                training list in the GLDv2 layout ({n_train} classes, one per source photo)
manifest.json         the source photo of every image; sources never cross roles
"""
