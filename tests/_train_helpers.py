"""Shared fixtures of the training tests: a tiny CFCD-style model and a tiny landmark dataset.

The model is registered in the real ``cfcd.models`` registry (``tiny_cfcd_test``): a timm
ResNet with one block per stage and 8..64 channels, GeM p=3, FC, BN -- the CFCD architecture
at toy size, with the stage-4 map as local features.

The dataset: each class is a distinct region of a real photo (skimage / sklearn sample
images); its images are random crops, flips and colour jitters of that region, saved as JPEG.
Train and held-out views come from disjoint random draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

TINY_MODEL = "tiny_cfcd_test"


class TinyCFCD(nn.Module):
    def __init__(self, dim: int = 32, width: int = 8):
        super().__init__()
        from cfcd.models.backbones import create_backbone
        from cfcd.models.pooling import GeM
        from cfcd.models.preprocess import BGR_IMAGENET

        self.backbone = create_backbone("resnet18", layers=(1, 1, 1, 1), stem_width=width,
                                        channels=(width, 2 * width, 4 * width, 8 * width))
        self.pool = GeM(p=3.0)
        self.fc = nn.Linear(8 * width, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.embedding_dim = dim
        self.preprocess = BGR_IMAGENET
        self.model_config = {}

    def forward_features(self, x):
        f4 = self.backbone.forward_features(x)
        g = self.bn(self.fc(self.pool(f4).flatten(1)))
        return {"global": g, "local": f4}

    def forward(self, x):
        return nn.functional.normalize(self.forward_features(x)["global"], dim=1)


def register_tiny_model() -> None:
    import cfcd.models as models
    from cfcd.models.registry import MODELS, _ensure_builtin

    _ensure_builtin()
    if TINY_MODEL not in MODELS:
        models.register_model(TINY_MODEL, TinyCFCD, family="cfcd", description="test-only tiny CFCD")


register_tiny_model()


def _photos() -> list[np.ndarray]:
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    ims = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.immunohistochemistry(),
           d.hubble_deep_field(), d.retina()]
    ims += list(load_sample_images().images)
    return [np.ascontiguousarray(i[..., :3]) for i in ims]


def make_landmarks(root: Path, *, n_classes: int = 12, train_per_class: int = 12, test_per_class: int = 4,
                   size: int = 64, seed: int = 0) -> dict:
    """Write ``root/img/*.jpg``, ``train_list.txt``, ``val_list.txt`` and ``test_list.txt``."""
    import cv2

    rng = np.random.default_rng(seed)
    photos = _photos()
    lines = {"train": [], "val": [], "test": []}
    (root / "img").mkdir(parents=True, exist_ok=True)
    for c in range(n_classes):
        photo = photos[c % len(photos)]
        h, w = photo.shape[:2]
        side = min(h, w) // 2
        # distinct regions: classes sharing a photo take different corners
        k = c // len(photos)
        y0 = (k % 2) * (h - side)
        x0 = ((k // 2) % 2) * (w - side)
        region = photo[y0:y0 + side, x0:x0 + side]
        for split, n in (("train", train_per_class), ("val", 2), ("test", test_per_class)):
            for j in range(n):
                s = int(side * rng.uniform(0.6, 0.95))
                yy, xx = rng.integers(0, side - s + 1, 2)
                view = region[yy:yy + s, xx:xx + s].astype(np.float32)
                view = view * rng.uniform(0.8, 1.2, 3) + rng.uniform(-15, 15)
                if rng.random() < 0.5:
                    view = view[:, ::-1]
                view = cv2.resize(np.clip(view, 0, 255).astype(np.uint8), (size + 16, size + 16),
                                  interpolation=cv2.INTER_AREA)
                rel = f"img/{split}_{c:02d}_{j:02d}.jpg"
                cv2.imwrite(str(root / rel), view[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
                lines[split].append(f"{rel} {c}\n")
    for split, ls in lines.items():
        (root / f"{split}_list.txt").write_text("".join(ls))
    return {"n_classes": n_classes, "root": root}


def tiny_config(root: Path, out: Path, **over):
    """A stage-1 MadaCos recipe for the tiny model (the packaged lite0 recipe's settings)."""
    from cfcd.train.config import load_config

    base = {
        "name": "tiny",
        "model": {"name": TINY_MODEL, "kwargs": {}},
        "loss": {"global": "madacos", "global_kwargs": {"alpha": 0.02}, "num_classes": 12},
        "data": {"root": str(root), "train_list": "train_list.txt", "val_list": "val_list.txt",
                 "im_size": 48, "test_size": 56, "workers": 0},
        "optim": {"lr": 0.05, "epochs": 2, "warmup_epochs": 0},
        "train": {"global_batch": 16, "micro_batch": 16, "seed": 0, "out_dir": str(out), "log_every": 1,
                  "tensorboard": False, "progress": False, "amp": "none", "channels_last": False},
    }
    from cfcd.train.config import merge, validate

    cfg = load_config(None, base)
    if over:
        cfg = merge(cfg, over, source="tiny_config")  # a recipe-like merge: kwargs replaced
        validate(cfg)
    return cfg


@torch.no_grad()
def retrieval_map(model, root: Path, list_name: str = "test_list.txt", size: int = 56) -> float:
    """mAP of each held-out view against the others (positives: same class)."""
    from cfcd.train.data import TrainingDataset, ValTransform, read_labelled_list

    lst = read_labelled_list(root / list_name, root)
    ds = TrainingDataset(lst, ValTransform(48, size, model.preprocess))
    model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    d = nn.functional.normalize(model.forward_features(x)["global"].float(), dim=1)
    sim = d @ d.t()
    labels = torch.as_tensor(lst.labels)
    aps = []
    for q in range(len(labels)):
        order = torch.argsort(sim[q], descending=True)
        order = order[order != q]
        rel = (labels[order] == labels[q]).float()
        hits = torch.cumsum(rel, 0)
        prec = hits / torch.arange(1, len(rel) + 1)
        aps.append(float((prec * rel).sum() / rel.sum()))
    return float(np.mean(aps))


def ddp_worker(rank: int, world: int, port: int, cfg) -> None:
    """Entry point of the spawned gloo ranks (torch.multiprocessing.spawn)."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cfcd.train.trainer import train

    train(cfg, device="cpu", resume=False, stop_after_steps=1)
    os._exit(0)  # skip the interpreter's teardown, where live gloo threads can abort (see test_madacos_ddp)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def fixed_tuples_local_loss(model, root: Path, list_name: str = "train_list.txt", size: int = 96,
                            pairs: int = 3, batch_statistics: bool = False) -> float:
    """CFCD local triplet loss (no augmentation) on fixed tuples: for each class, views (2k, 2k+1)
    as anchor/positive and the k-th view of the next 6 classes as negatives. ``batch_statistics``
    normalises with the batch's BN statistics, as in training (the model is not changed)."""
    import copy
    from cfcd.train.data import TrainingDataset, ValTransform, read_labelled_list
    from cfcd.losses import LocalTripletLoss

    lst = read_labelled_list(root / list_name, root)
    ds = TrainingDataset(lst, ValTransform(size, size + 8, model.preprocess))
    by_class = lst.class_indices()
    classes = sorted(by_class)
    idx = []
    for k, c in enumerate(classes):
        for t in range(pairs):
            idx += by_class[c][2 * t:2 * t + 2] + [by_class[classes[(k + j) % len(classes)]][t] for j in range(1, 7)]
    if batch_statistics:
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    x = torch.stack([ds[i][0] for i in idx])
    return float(LocalTripletLoss()(model.forward_features(x)["local"].float(), tuple_size=8))
