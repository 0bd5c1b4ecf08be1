"""Classifier confusions for hard-negative tuples: ``landmark_scores.txt`` (``path gt pred score``).

The reference produces it with ``infer.py`` over the training list, which -- because the split
name contains "train" -- applies random crops and flips to the images being scored (CFCD
``datasets/commondataset.py`` lines 76 and 90).
Here the stage-1 model sees the **validation transform** (short side -> test size, center crop):
``pred`` is the argmax cosine of the classifier and ``score`` its softmax probability with the
head in eval mode (MadaCos: margin 0, scale from the batch, as the reference's ``infer_model``).

The job is resumable: every rank appends finished lines to ``<out>.rank<r>.partial`` (flushed
per batch) and skips what is already there; rank 0 merges the parts in list order and writes
``out`` atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import cfcd.models as models
from cfcd.errors import InputError
from cfcd.losses import is_classification_head
from cfcd.train.config import TrainConfig
from cfcd.train.data import TrainingDataset, ValTransform, collate, read_labelled_list
from cfcd.train.distributed import barrier, destroy, init_distributed
from cfcd.train.trainer import build_head, init_from_checkpoint
from cfcd.utils.io import atomic_open

logger = logging.getLogger("cfcd.train")


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    n = 0
    with open(path, "rb") as fh:
        data = fh.read()
    # a torn last line (killed mid-write) is dropped and redone
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "wb") as fh:
            fh.write(complete)
    n = complete.count(b"\n")
    return n


@torch.no_grad()
def write_confusions(cfg: TrainConfig, weights: str | os.PathLike, list_path: str | os.PathLike,
                     root: str | os.PathLike | None, out: str | os.PathLike, *, batch_size: int = 64,
                     workers: int = 4, device: str | None = None, progress: bool = True) -> dict:
    """Score every image of a training list with a stage-1 model; see the module docstring."""
    from torch.utils.data import DataLoader



    out = Path(out)
    dist_info = init_distributed(device)
    try:
        dev = dist_info.device
        model = models.create(cfg.model.name, weights=models.RANDOM_WEIGHTS, **cfg.model.kwargs)  # then the checkpoint
        head = build_head(cfg, int(model.embedding_dim))
        if not is_classification_head(head):
            raise InputError(f"{cfg.name}: confusions need a classification head (loss.global)")
        report = init_from_checkpoint(model, head, str(weights), strict=False)
        if not any(k.startswith("desc_cls.") for k in report.extra):
            raise InputError(f"{weights}: has no classifier weights (desc_cls.*): cannot predict classes")
        model.to(dev).eval()
        head.to(dev).eval()
        samples = read_labelled_list(list_path, root, num_classes=cfg.loss.num_classes)
        n, r, w = len(samples), dist_info.rank, dist_info.world_size
        lo, hi = r * n // w, (r + 1) * n // w
        part = out.with_name(f"{out.name}.rank{r}.partial")
        part.parent.mkdir(parents=True, exist_ok=True)
        done = _count_lines(part)
        todo = list(range(lo + done, hi))
        ds = TrainingDataset(samples, ValTransform(cfg.data.im_size, cfg.data.test_size, model.preprocess))
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                            pin_memory=dev.type == "cuda")
        bar = None
        if progress and dist_info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=hi - lo, initial=done, desc="confusions", dynamic_ncols=True)
        with head.local_statistics(), open(part, "a", encoding="utf-8") as fh:  # ranks score different images
            for images, labels, index in loader:
                images, labels = images.to(dev), labels.to(dev)
                emb = model.forward_features(images)["global"]
                prob = F.softmax(head.logits(emb, labels).float(), dim=1)
                score, pred = prob.max(dim=1)
                fh.write("".join(f"{samples.paths[i]} {g} {p} {s:.8f}\n" for i, g, p, s in
                                 zip(index.tolist(), labels.tolist(), pred.tolist(), score.tolist())))
                fh.flush()
                if bar is not None:
                    bar.update(len(index))
        if bar is not None:
            bar.close()
        barrier()
        summary = {}
        if dist_info.is_main:
            parts = [out.with_name(f"{out.name}.rank{k}.partial") for k in range(w)]
            correct = total = 0
            with atomic_open(out, "w") as dst:
                for p in parts:
                    with open(p, encoding="utf-8") as src:
                        for line in src:
                            dst.write(line)
                            f = line.split()
                            correct += f[1] == f[2]
                            total += 1
            if total != n:
                raise InputError(f"{out}: merged {total} lines for {n} images (a rank did not finish)")
            for p in parts:
                p.unlink(missing_ok=True)
            summary = {"images": total, "top1": correct / max(1, total), "out": str(out)}
        barrier()
        return summary
    finally:
        destroy(dist_info)
