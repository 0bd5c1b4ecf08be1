"""Training data: labelled image lists, the GLDv2-clean converter, augmentation and the dataset.

A training list is a text file in the GLDv2 layout used by CFCD and DOLG: one ``path label``
pair per line, the path relative to a ``--root`` directory and the label a contiguous class
index ``0..C-1`` (CFCD ``datasets/commondataset.py``, ``datasets/data/landmark/train_list.txt``). :func:`make_gldv2_lists` builds such lists from the official
``train_clean.csv`` with a deterministic, seed-controlled train/val split written to disk
(the original repositories never published theirs).

Augmentation follows the reference pipeline (CFCD ``datasets/transforms.py`` and
``datasets/commondataset.py`` ``_prepare_im``)
operation by operation: Inception random-sized crop, horizontal flip, AlexNet PCA lighting,
then the model's own normalisation (``model.preprocess``, BGR for the CFCD/DOLG weights).
Unlike the reference, the randomness of every sample comes from its own
``numpy.random.Generator`` seeded by ``(seed, epoch, index)``, so an epoch is reproduced
exactly whatever the number of workers, processes or restarts.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cfcd.data.images import load_image
from cfcd.errors import InputError
from cfcd.models.preprocess import Preprocess
from cfcd.utils.io import atomic_write_json, atomic_write_text, sha256_file

logger = logging.getLogger("cfcd.train.data")

# AlexNet PCA lighting constants (RGB order), as in pycls / CFCD ``commondataset.py``.
EIG_VALS = np.array([0.2175, 0.0188, 0.0045])
EIG_VECS = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)
# ImageNet statistics in RGB order; the reference applies them reversed to BGR images.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# labelled lists
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LabelledList:
    """A training or validation list: image paths (relative to ``root``) and integer labels."""

    paths: list[str]
    labels: np.ndarray  # int64, one per path
    source: Path | None = None
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def full_path(self, i: int) -> Path:
        p = Path(self.paths[i])
        return p if self.root is None or p.is_absolute() else self.root / p

    def class_indices(self) -> dict[int, list[int]]:
        """``label -> [indices]`` in first-appearance order (the reference's ``_class_indices``)."""
        out: dict[int, list[int]] = {}
        for i, c in enumerate(self.labels.tolist()):
            out.setdefault(c, []).append(i)
        return out


def read_labelled_list(path: str | os.PathLike, root: str | os.PathLike | None = None,
                       *, num_classes: int | None = None) -> LabelledList:
    """Read a ``path label`` list. Blank lines and ``#`` comments are skipped.

    Raises :class:`InputError` naming the file and line for a malformed line, a negative or
    non-integer label, or a label ``>= num_classes`` when that is given.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training list not found")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # the path itself may contain spaces: the label is the last field
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise InputError(f"{path}:{lineno}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise InputError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise InputError(f"{path}:{lineno}: negative label {label}")
            if num_classes is not None and label >= num_classes:
                raise InputError(f"{path}:{lineno}: label {label} >= num_classes {num_classes}")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise InputError(f"{path}: training list is empty")
    return LabelledList(paths, np.asarray(labels, dtype=np.int64), path,
                        Path(root) if root is not None else None)


def write_labelled_list(path: str | os.PathLike, paths: Sequence[str], labels: Sequence[int]) -> None:
    """Write a ``path label`` list atomically."""
    atomic_write_text(path, "".join(f"{p} {int(c)}\n" for p, c in zip(paths, labels)))


def gldv2_image_path(image_id: str, prefix: str = "train", ext: str = ".jpg") -> str:
    """GLDv2 layout: ``train/a/b/c/abc....jpg`` from the id's first three characters."""
    if len(image_id) < 3:
        raise InputError(f"GLDv2 image id {image_id!r} is shorter than 3 characters")
    rel = f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}{ext}"
    return f"{prefix}/{rel}" if prefix else rel


def read_gldv2_csv(csv_path: str | os.PathLike) -> tuple[dict[int, list[str]], str]:
    """``landmark_id -> [image ids]`` from ``train_clean.csv`` (``landmark_id,images``, the ids
    space-separated) or ``train.csv`` (``id,url,landmark_id``, one image a row); and which of the two."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: GLDv2 csv not found")
    per_class: dict[int, list[str]] = {}
    seen: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in (next(reader, None) or [])]
        if header[:2] == ["landmark_id", "images"]:
            kind, id_col, lid_col = "train_clean", None, 0
        elif "id" in header and "landmark_id" in header:
            kind, id_col, lid_col = "train", header.index("id"), header.index("landmark_id")
        else:
            raise InputError(f"{csv_path}: expected the header 'landmark_id,images' (train_clean.csv) or "
                             f"'id,url,landmark_id' (train.csv), got {header}")
        width = 2 if id_col is None else max(id_col, lid_col) + 1
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < width:
                raise InputError(f"{csv_path}:{lineno}: expected {width} columns ({','.join(header)})")
            try:
                lid = int(row[lid_col])
            except ValueError:
                raise InputError(f"{csv_path}:{lineno}: landmark_id {row[lid_col]!r} is not an integer") from None
            ids = row[1].split() if id_col is None else [row[id_col].strip()]
            for image_id in ids:
                if image_id in seen and seen[image_id] != lid:
                    raise InputError(f"{csv_path}:{lineno}: image {image_id} is listed under landmarks "
                                     f"{seen[image_id]} and {lid}")
                seen[image_id] = lid
            per_class.setdefault(lid, []).extend(ids)
    return per_class, kind


def gldv2_images_on_disk(base: str | os.PathLike, ext: str = ".jpg") -> set[str]:
    """Ids of the images stored in the GLDv2 layout under ``base`` (``a/b/c/abc....jpg``): one walk
    of the tree, instead of a stat per csv row (1.6M for GLDv2-clean)."""
    base = Path(base)
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(base):
        rel = Path(dirpath).relative_to(base).parts
        if len(rel) != 3:
            continue
        for name in files:
            if name.endswith(ext):
                stem = name[: -len(ext)]
                if tuple(stem[:3]) == rel:
                    found.add(stem)
    return found


def make_gldv2_lists(csv_path: str | os.PathLike, out_dir: str | os.PathLike, *, root: str | os.PathLike | None = None,
                     val_fraction: float = 0.01, seed: int = 0, min_images: int = 2,
                     prefix: str = "train", ext: str = ".jpg") -> dict[str, Any]:
    """Convert the official GLDv2 ``train_clean.csv`` (or ``train.csv``) into training lists.

    ``train_clean.csv`` has the columns ``landmark_id,images`` where ``images`` is a space-separated
    list of image ids; ``train.csv`` has ``id,url,landmark_id``. With ``root``, only the images
    present as ``root/prefix/a/b/c/<id><ext>`` are listed (a partial download trains on what is
    there; ``missing_images`` counts the others). Landmarks with fewer than ``min_images`` listed
    images are dropped; the remaining ones get contiguous labels ``0..C-1`` in increasing
    landmark-id order.

    The validation split is an image-level held-out part of the same classes (as in CFCD,
    whose ``val_list.txt`` points into ``train/``). It is deterministic: images are sorted,
    permuted by ``numpy.random.default_rng(seed)``, and an image goes to val while fewer
    than ``round(val_fraction * N)`` have been taken and its class keeps at least
    ``min_images`` training images (so every class stays usable for tuples).

    Writes ``train_list.txt``, ``val_list.txt``, ``label_map.tsv`` (``label landmark_id
    n_train n_val``), ``label_map.json`` (``{landmark_id: label}``) and ``split.json`` (the
    parameters, counts and the csv's sha256). Returns the content of ``split.json``.
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if min_images < 1:
        raise InputError(f"--min-images must be >= 1, got {min_images}")
    per_class, kind = read_gldv2_csv(csv_path)
    per_class = {lid: sorted(set(ids)) for lid, ids in per_class.items()}
    csv_images = sum(len(ids) for ids in per_class.values())
    missing = 0
    if root is not None:
        base = Path(root) / prefix if prefix else Path(root)
        if not base.is_dir():
            raise InputError(f"{base}: no such directory (images are looked up as {base}/a/b/c/<id>{ext}; "
                             "--prefix '' if --root holds the a/b/c directories itself)")
        present = gldv2_images_on_disk(base, ext)
        listed = per_class
        per_class = {lid: [i for i in ids if i in present] for lid, ids in listed.items()}
        missing = csv_images - sum(len(ids) for ids in per_class.values())
        if missing == csv_images:
            example = next(i for ids in listed.values() for i in ids)
            raise InputError(f"{base}: none of the {csv_images} images of {csv_path} is there (looked for "
                             f"{base / gldv2_image_path(example, '', ext)} and the like)")
    landmarks = sorted(lid for lid, ids in per_class.items() if len(ids) >= min_images)
    if not landmarks:
        raise InputError(f"{csv_path}: no landmark has at least {min_images} images"
                         + (f" under {root}" if root is not None else ""))
    label_of = {lid: i for i, lid in enumerate(landmarks)}
    items = [(image_id, label_of[lid]) for lid in landmarks for image_id in per_class[lid]]
    counts = np.bincount([c for _, c in items], minlength=len(landmarks))
    n_val_target = int(round(val_fraction * len(items)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    is_val = np.zeros(len(items), dtype=bool)
    train_left = counts.copy()
    n_val = 0
    for i in order.tolist():
        if n_val >= n_val_target:
            break
        c = items[i][1]
        if train_left[c] > min_images:
            is_val[i] = True
            train_left[c] -= 1
            n_val += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [(gldv2_image_path(i, prefix, ext), c) for (i, c), v in zip(items, is_val) if not v]
    val = [(gldv2_image_path(i, prefix, ext), c) for (i, c), v in zip(items, is_val) if v]
    write_labelled_list(out_dir / "train_list.txt", [p for p, _ in train], [c for _, c in train])
    write_labelled_list(out_dir / "val_list.txt", [p for p, _ in val], [c for _, c in val])
    val_counts = counts - train_left
    atomic_write_text(out_dir / "label_map.tsv", "label\tlandmark_id\tn_train\tn_val\n" + "".join(
        f"{label_of[lid]}\t{lid}\t{train_left[label_of[lid]]}\t{val_counts[label_of[lid]]}\n"
        for lid in landmarks))
    atomic_write_json(out_dir / "label_map.json", {str(lid): label_of[lid] for lid in landmarks})
    info = {
        "csv": str(csv_path), "csv_format": kind, "csv_sha256": sha256_file(csv_path),
        "root": None if root is None else str(root), "csv_images": csv_images, "missing_images": missing,
        "seed": seed, "val_fraction": val_fraction, "min_images": min_images, "prefix": prefix, "ext": ext,
        "num_classes": len(landmarks), "num_train": len(train), "num_val": len(val),
        "dropped_landmarks": len(per_class) - len(landmarks),
        "files": ["train_list.txt", "val_list.txt", "label_map.tsv", "label_map.json"],
    }
    atomic_write_json(out_dir / "split.json", info)
    return info


# ----------------------------------------------------------------------------------------------
# classifier confusions (landmark_scores.txt)
# ----------------------------------------------------------------------------------------------


def read_confusions(path: str | os.PathLike, samples: LabelledList) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``path gt pred score`` file and align it to ``samples``.

    Returns ``(gt, pred)`` int64 arrays, one per sample in list order. Every path of the list
    must be present (as in the reference) and its ``gt`` must equal the list's label;
    otherwise :class:`InputError` names the file and the first offending path.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: confusion file not found")
    gt_pred: dict[str, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise InputError(f"{path}:{lineno}: expected 'path gt pred score', got {line.strip()!r}")
            try:
                gt_pred[parts[0]] = (int(parts[1]), int(parts[2]))
                float(parts[3])
            except ValueError:
                raise InputError(f"{path}:{lineno}: gt/pred must be integers and score a number") from None
    gt = np.empty(len(samples), dtype=np.int64)
    pred = np.empty(len(samples), dtype=np.int64)
    for i, (p, c) in enumerate(zip(samples.paths, samples.labels.tolist())):
        if p not in gt_pred:
            raise InputError(f"{path}: no entry for training image {p!r} of {samples.source}")
        g, q = gt_pred[p]
        if g != c:
            raise InputError(f"{path}: {p!r} has gt {g} but label {c} in {samples.source}")
        gt[i], pred[i] = g, q
    return gt, pred


# ----------------------------------------------------------------------------------------------
# transforms (HWC BGR in, CHW float32 normalised out)
# ----------------------------------------------------------------------------------------------


def scale_short_side(im: np.ndarray, size: int) -> np.ndarray:
    """Short side -> ``size`` with ``floor`` for the long side and cv2 INTER_LINEAR (pycls ``scale``)."""
    import cv2

    h, w = im.shape[:2]
    if (w <= h and w == size) or (h <= w and h == size):
        return im
    h_new, w_new = size, size
    if w < h:
        h_new = int(math.floor((float(h) / w) * size))
    else:
        w_new = int(math.floor((float(w) / h) * size))
    return cv2.resize(im, (w_new, h_new), interpolation=cv2.INTER_LINEAR)


def center_crop(im: np.ndarray, size: int) -> np.ndarray:
    """Center crop with ``ceil`` offsets (pycls ``center_crop``)."""
    h, w = im.shape[:2]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} smaller than {size}")
    y = int(math.ceil((h - size) / 2))
    x = int(math.ceil((w - size) / 2))
    return im[y:y + size, x:x + size]


def random_sized_crop(im: np.ndarray, size: int, rng: np.random.Generator, *,
                      area_frac: float = 0.08, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      max_iter: int = 10) -> np.ndarray:
    """Inception-style crop exactly as pycls: area U(area_frac, 1), aspect U(3/4, 4/3), w/h
    swapped with p = 0.5, ``max_iter`` tries, then fallback to short-side scale + center crop.
    The result is resized to ``size x size`` with cv2 INTER_LINEAR on float32 pixels."""
    import cv2

    h, w = im.shape[:2]
    area = h * w
    for _ in range(max_iter):
        target_area = rng.uniform(area_frac, 1.0) * area
        aspect = rng.uniform(ratio[0], ratio[1])
        w_crop = int(round(math.sqrt(float(target_area) * aspect)))
        h_crop = int(round(math.sqrt(float(target_area) / aspect)))
        if rng.uniform() < 0.5:
            w_crop, h_crop = h_crop, w_crop
        if 0 < h_crop <= h and 0 < w_crop <= w:
            # numpy's exclusive upper bound, as in the reference
            y = 0 if h_crop == h else int(rng.integers(0, h - h_crop))
            x = 0 if w_crop == w else int(rng.integers(0, w - w_crop))
            crop = im[y:y + h_crop, x:x + w_crop].astype(np.float32)
            return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return center_crop(scale_short_side(im.astype(np.float32), size), size)


def pca_lighting(chw_bgr01: np.ndarray, rng: np.random.Generator, alpha_std: float = 0.1) -> np.ndarray:
    """AlexNet PCA lighting on a CHW **BGR** image in [0, 1] (in place).

    The offset is computed in RGB; BGR channel ``i`` receives ``rgb[2 - i]``, as in the reference.
    """
    if alpha_std == 0:
        return chw_bgr01
    alpha = rng.normal(0.0, alpha_std, size=3)
    rgb = EIG_VECS @ (alpha * EIG_VALS)
    for i in range(3):
        chw_bgr01[i] += rgb[2 - i]
    return chw_bgr01


class _Normalise:
    """The model's :meth:`Preprocess.normalise_numpy` in place on CHW BGR [0, 1] float32."""

    def __init__(self, preprocess: Any):
        self.preprocess = Preprocess.coerce(preprocess)
        self.order = self.preprocess.channel_order

    def __call__(self, chw_bgr01: np.ndarray) -> np.ndarray:
        return self.preprocess.normalise_numpy(chw_bgr01, input_order="BGR", layout="CHW", from_u8=False,
                                               out="inplace")


def _to_chw01(im: np.ndarray) -> np.ndarray:
    """HWC -> contiguous float32 CHW divided by 255 (one copy, then in place)."""
    x = np.empty((im.shape[2], im.shape[0], im.shape[1]), dtype=np.float32)
    for c in range(im.shape[2]):
        x[c] = im[:, :, c]
    x /= 255.0
    return x


class TrainTransform:
    """Reference training augmentation: random-sized crop -> flip -> /255 -> PCA lighting -> normalise.

    Input: HWC BGR uint8 image and a ``numpy.random.Generator``. Output: CHW float32 in the
    model's channel order (``preprocess.channel_order``) normalised with its mean/std.
    """

    def __init__(self, size: int = 512, preprocess: Any = None, *, area_frac: float = 0.08,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5, lighting: float = 0.1,
                 max_iter: int = 10):
        self.size, self.area_frac, self.ratio = int(size), float(area_frac), tuple(ratio)
        self.flip, self.lighting, self.max_iter = float(flip), float(lighting), int(max_iter)
        self.normalise = _Normalise(preprocess)

    def __call__(self, im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        im = random_sized_crop(im, self.size, rng, area_frac=self.area_frac, ratio=self.ratio,
                               max_iter=self.max_iter)
        if rng.uniform() < self.flip:
            im = im[:, ::-1]
        x = _to_chw01(im)
        x = pca_lighting(x, rng, self.lighting)
        return self.normalise(x)


class ValTransform:
    """Reference validation transform: short side -> ``test_size`` (floor), center crop ``size``."""

    def __init__(self, size: int = 512, test_size: int | None = None, preprocess: Any = None):
        self.size = int(size)
        self.test_size = int(test_size if test_size is not None else size)
        if self.size > self.test_size:
            raise InputError(f"crop size {self.size} is larger than the val resize {self.test_size}")
        self.normalise = _Normalise(preprocess)

    def __call__(self, im: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        im = center_crop(scale_short_side(im.astype(np.float32), self.test_size), self.size)
        return self.normalise(_to_chw01(im))


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------


class TrainingDataset:
    """Map-style dataset over a :class:`LabelledList`.

    ``dataset[i]`` or ``dataset[(epoch, i)]`` returns ``(image CHW float32 tensor, label, i)``.
    The augmentation randomness is seeded by ``(seed, epoch, i)``, so results do not depend
    on the worker that loads a sample. An unreadable image is logged once (per process) and
    replaced by a readable image **of the same class** chosen deterministically, which keeps
    batches full and stage-2 tuples valid; if the whole class is unreadable the error is raised.
    """

    def __init__(self, samples: LabelledList, transform: Callable[..., np.ndarray], *, seed: int = 0,
                 loader: Callable[[str], np.ndarray] | None = None, max_substitutes: int = 16):
        self.samples, self.transform, self.seed = samples, transform, int(seed)
        self.loader = loader or functools.partial(load_image, channel_order="BGR")
        self.max_substitutes = max_substitutes
        self._bad: set[int] = set()
        self._by_class: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return self.samples.labels

    def _read(self, i: int) -> np.ndarray | None:
        if i in self._bad:
            return None
        try:
            return self.loader(str(self.samples.full_path(i)))
        except Exception as exc:  # noqa: BLE001 - one bad image never kills an epoch
            self._bad.add(i)
            logger.warning("skipping unreadable training image %s: %s", self.samples.full_path(i), exc)
            return None

    def __getitem__(self, key: int | tuple[int, int]):
        import torch

        epoch, i = key if isinstance(key, tuple) else (0, key)
        i = int(i)
        rng = np.random.default_rng([self.seed, int(epoch), i])
        im = self._read(i)
        if im is None:
            im = self._substitute(i, rng)
        x = self.transform(im, rng)
        return torch.from_numpy(x), int(self.samples.labels[i]), i

    def _substitute(self, i: int, rng: np.random.Generator) -> np.ndarray:
        if self._by_class is None:
            self._by_class = self.samples.class_indices()
        same = [j for j in self._by_class[int(self.samples.labels[i])] if j != i and j not in self._bad]
        for j in rng.permutation(same)[: self.max_substitutes].tolist():
            im = self._read(int(j))
            if im is not None:
                return im
        raise InputError(f"{self.samples.full_path(i)}: unreadable, and no readable image of class "
                         f"{int(self.samples.labels[i])} can replace it")


def collate(batch):
    """Stack ``(image, label, index)`` samples into tensors."""
    import torch

    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    index = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, labels, index


def opencv_fork_guard() -> None:
    """Call in the parent before a DataLoader forks its workers (``num_workers > 0``).

    OpenCV's pthreads pool is not fork-safe: once the parent has used it, a forked child that
    changes the thread count (``worker_init``'s ``cv2.setNumThreads(1)``) waits forever on the
    pool's threads, which do not exist in the child. Shrinking the pool to one thread in the
    parent first makes the child's call a no-op (OpenCV ``setNumThreads`` docs; PyTorch's
    DataLoader docs advise ``cv2.setNumThreads`` for the same deadlock). The parent's own cv2
    calls then run single-threaded, which costs nothing here: the workers do the decoding."""
    import cv2

    cv2.setNumThreads(1)


def worker_init(_worker_id: int) -> None:
    """DataLoader workers: one thread each for cv2 and torch (the workers are the parallelism).

    Pair with :func:`opencv_fork_guard` in the parent, or this hangs if the parent used cv2."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
