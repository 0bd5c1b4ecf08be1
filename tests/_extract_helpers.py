"""Shared helpers of the extraction tests: real photos on disk, a generated revisitop layout,
and a tiny network that follows the ``cfcd.models`` contract (for the fast unit tests)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn


def real_photos() -> dict[str, np.ndarray]:
    """Real RGB uint8 photos shipped with scikit-image and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {"coffee": data.coffee(), "astronaut": data.astronaut(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = image
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}


def resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def write_photo_dir(directory: Path, *, count: int = 8, long_side: int = 160, quality: int = 90) -> list[str]:
    """``count`` JPEGs made from real photos: landscape long_side x 3/4, every fourth portrait,
    some with other crops so that several sizes occur. Returns the ids (relative, no extension)."""
    from PIL import Image

    photos = list(real_photos().values())
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    short = long_side * 3 // 4
    for i in range(count):
        src = photos[i % len(photos)]
        if i % 4 == 3:
            w, h = short, long_side
        elif i % 5 == 4:
            w, h = long_side - 8, short + 4
        else:
            w, h = long_side, short
        if i % 2:  # a different crop of the photo, not just another resize
            src = src[src.shape[0] // 8 :, src.shape[1] // 10 :]
        image = resize_rgb(np.ascontiguousarray(src), w, h)
        sub = directory / ("a" if i % 3 else "b")
        sub.mkdir(exist_ok=True)
        name = f"img{i:03d}"
        Image.fromarray(image).save(sub / f"{name}.jpg", quality=quality)
        ids.append(f"{sub.name}/{name}")
    return sorted(ids)


def write_revisitop(root: Path, dataset: str = "toyoxf", *, n_db: int = 8, n_q: int = 3, long_side: int = 160) -> Path:
    """A tiny revisitop layout ROOT/<ds>/jpg/*.jpg + ROOT/<ds>/gnd_<ds>.pkl with real photos and
    bounding boxes. Query q shows photo q; its easy/hard positives are other crops of it."""
    from PIL import Image

    photos = list(real_photos().values())
    jpg = root / dataset / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    short = long_side * 3 // 4
    imlist, qimlist, gnd = [], [], []
    for i in range(n_db):
        src = photos[i % n_q] if i < 2 * n_q else photos[(i % (len(photos) - n_q)) + n_q]
        crop = src[(i % 3) * src.shape[0] // 12 :, (i % 2) * src.shape[1] // 12 :]
        w, h = (short, long_side) if i % 4 == 3 else (long_side, short)
        name = f"db_{i:04d}"
        Image.fromarray(resize_rgb(np.ascontiguousarray(crop), w, h)).save(jpg / f"{name}.jpg", quality=90)
        imlist.append(name)
    for q in range(n_q):
        name = f"query_{q:02d}"
        Image.fromarray(resize_rgb(photos[q], long_side, short)).save(jpg / f"{name}.jpg", quality=90)
        qimlist.append(name)
        positives = [i for i in range(min(n_db, 2 * n_q)) if i % n_q == q]
        gnd.append(
            {
                "bbx": [10.5, 7.4, long_side - 12.5, short - 5.6],
                "easy": positives[:1],
                "hard": positives[1:],
                "junk": [],
            }
        )
    with open(root / dataset / f"gnd_{dataset}.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=3)
    return root / dataset / f"gnd_{dataset}.pkl"


class TinyPreprocess:
    def __init__(self, channel_order: str = "BGR"):
        self.channel_order = channel_order
        self.mean = (0.406, 0.456, 0.485)
        self.std = (0.225, 0.224, 0.229)


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2 -> GeM(3) -> FC -> L2: the cfcd.models contract in 3 layers."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        )
        self.fc = nn.Linear(48, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
        self.preprocess = TinyPreprocess()
        self.embedding_dim = dim
        self.model_config = {"name": "tiny_test_net", "kwargs": {"dim": dim, "seed": seed}}

    def forward_features(self, x):
        f = self.body(x)
        g = f.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        return {"global": self.fc(g), "local": f}

    def forward(self, x):
        return nn.functional.normalize(self.forward_features(x)["global"], dim=1)
