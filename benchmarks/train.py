"""Stage-1 training throughput: the cfcd trainer against a plain fp32 loop on the same model.

Both paths read the same JPEG files through the same data pipeline (cv2 decode, Inception crop,
flip, PCA lighting, normalisation, ``workers`` DataLoader processes) and run the same MadaCos
stage-1 step (forward, CE, backward, SGD nesterov). They differ only in the settings the trainer
adds: bf16 autocast, channels_last, pinned memory + non_blocking copies, cudnn.benchmark and
optionally torch.compile. Images/s are measured after ``--warmup`` steps, data loading included.

    python benchmarks/train.py --model cfcd_r50 --device cuda --size 512 --batch 64 --steps 40
    python benchmarks/train.py --model cfcd_r50 --device cpu --size 128 --batch 8 --steps 3 --images 64

The plain loop is the reference's recipe as written (fp32, PyTorch defaults: cuDNN may use TF32
for convolutions, as it did in the reference's torch 1.7); ``--strict-fp32`` turns TF32 off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_jpegs(root: Path, n: int, n_classes: int, seed: int = 0) -> Path:
    """``n`` JPEGs of about 800 x 600 (crops of real photos), listed with labels."""
    import cv2
    import skimage.data as d

    photos = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.hubble_deep_field(), d.retina()]
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        im = cv2.resize(p, (800, 600) if rng.random() < 0.7 else (600, 800), interpolation=cv2.INTER_LINEAR)
        im = np.roll(im, int(rng.integers(0, 200)), axis=1)
        cv2.imwrite(str(root / f"img/{i:05d}.jpg"), im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"img/{i:05d}.jpg {i % n_classes}\n")
    (root / "train_list.txt").write_text("".join(lines))
    return root / "train_list.txt"


def loader_for(lst, size, preprocess, batch, workers, pin, seed=0):
    from torch.utils.data import DataLoader

    from cfcd.train.samplers import ShuffleBatchSampler
    from cfcd.train.data import TrainingDataset, TrainTransform, collate, worker_init

    ds = TrainingDataset(lst, TrainTransform(size, preprocess), seed=seed)
    sampler = ShuffleBatchSampler(len(lst), global_batch=batch, micro_batch=batch, seed=seed)
    return sampler, DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                               pin_memory=pin, prefetch_factor=4 if workers else None,
                               persistent_workers=workers > 0, worker_init_fn=worker_init if workers else None)


def run_trainer(args) -> dict:
    """The fast path is the trainer itself (cfcd.train.trainer.Trainer.train_step)."""
    from cfcd.train.config import load_config
    from cfcd.train.trainer import Trainer

    out_dir = Path(args.root) / "bench_run"
    cfg = load_config(None, {
        "name": "bench", "model": {"name": args.model},
        "loss": {"global": "madacos", "num_classes": args.num_classes},
        "data": {"root": str(args.root), "train_list": str(args.list), "im_size": args.size,
                 "workers": args.workers, "val_list": None},
        "optim": {"lr": 1e-3, "warmup_epochs": 0},
        "train": {"global_batch": args.batch, "micro_batch": args.batch, "seed": 0, "out_dir": str(out_dir),
                  "amp": args.amp, "channels_last": True, "compile": bool(args.compile),
                  "tensorboard": False, "progress": False},
    })
    trainer = Trainer(cfg, device=args.device, resume=False)
    trainer.build()
    cuda = trainer.device.type == "cuda"
    trainer.module.train()
    total, step, epoch, n_img, t_start = args.warmup + args.steps, 0, 0, 0, None
    while step < total:
        trainer.sampler.set_epoch(epoch)
        loader = iter(trainer._loader(trainer.sampler, trainer.dataset))
        for _ in range(trainer.sampler.steps_per_epoch()):
            if step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                t_start = time.perf_counter()
            window = [next(loader)[:2] for _ in range(trainer.accumulation)]
            trainer.train_step(window, 1e-3)
            step += 1
            if step > args.warmup:
                n_img += args.batch
            if step >= total:
                break
        epoch += 1
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    out = {"path": "cfcd trainer", "images_per_s": n_img / elapsed, "steps": args.steps, "batch": args.batch,
           "size": args.size, "amp": args.amp if cuda else "none", "compile": bool(args.compile)}
    if cuda:
        out["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    trainer.close()
    return out


def run_plain(args) -> dict:
    """The reference's loop: fp32, NCHW, pageable copies, a loss sync every step."""
    import cfcd.models as models
    from cfcd.train.data import read_labelled_list
    from cfcd.losses import MadaCos

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create(args.model, weights=None if models.has_embedded_weights(args.model) else "random").to(dev).train()
    head = MadaCos(model.embedding_dim, args.num_classes, alpha=0.02).to(dev)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=1e-3, momentum=0.9,
                          nesterov=True, weight_decay=1e-4)
    cuda = dev.type == "cuda"
    if cuda and args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    lst = read_labelled_list(args.list, args.root)
    sampler, loader = loader_for(lst, args.size, model.preprocess, args.batch, args.workers, pin=False)
    total, step, epoch, n_img, t_start = args.warmup + args.steps, 0, 0, 0, None
    while step < total:
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            if step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                t_start = time.perf_counter()
            images, labels = images.to(dev), labels.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head.logits(model.forward_features(images)["global"], labels), labels)
            loss.backward()
            opt.step()
            loss.item()  # the reference logs the loss every step (a device sync)
            step += 1
            if step > args.warmup:
                n_img += len(labels)
            if step >= total:
                break
        epoch += 1
    if cuda:
        torch.cuda.synchronize()
    out = {"path": "plain fp32", "images_per_s": n_img / (time.perf_counter() - t_start), "steps": args.steps,
           "batch": args.batch, "size": args.size}
    if cuda:
        out["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    del model, head, opt
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cfcd_r50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="images per step (one process)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", type=int, default=1024, help="JPEG files to generate")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=81313)
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the fast path")
    p.add_argument("--strict-fp32", action="store_true", help="plain path without TF32")
    p.add_argument("--data", help="existing directory with train_list.txt (default: generate in a temp dir)")
    p.add_argument("--only", choices=["plain", "fast"], help="run one path only")
    args = p.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)  # before make_jpegs: workers forked after cv2 started its pool hang in worker_init
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not (root / "train_list.txt").is_file():
            make_jpegs(root, args.images, min(args.num_classes, max(2, args.images // 4)))
        args.root, args.list = root, root / "train_list.txt"
        results = []
        for fast in (False, True):
            if args.only and args.only != ("fast" if fast else "plain"):
                continue
            r = run_trainer(args) if fast else run_plain(args)
            results.append(r)
            print(json.dumps(r), flush=True)
    if len(results) == 2:
        ratio = results[1]["images_per_s"] / results[0]["images_per_s"]
        print(json.dumps({"speedup_fast_over_plain": round(ratio, 3), "device": args.device,
                          "cmd": " ".join(sys.argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
