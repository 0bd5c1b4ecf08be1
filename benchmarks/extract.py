"""Extraction speed: the fast batched path against the reference procedure, end to end from JPEGs.

    python benchmarks/extract.py --model cfcd_r50 --device cuda --precision bf16 --n 512
    python benchmarks/extract.py --model gem_efficientnet_lite0 --device cpu --n 16 --naive-n 8

Generates ``--n`` JPEGs of 1024x768 (every fourth one 768x1024) from the skimage/sklearn photos
(random crops, flips and resizes, so no two are alike), then times on the same files:

* **fast**: ``cfcd.extract.Extractor`` as ``cfcd extract`` runs it (DataLoader decoding workers,
  size buckets, device resizing, autocast at ``--precision``, one ``.cpu()`` per batch);
* **naive**: the CFCD ``evaler/infer.py`` procedure (batch 1, fp32, ``cv2.resize`` and numpy
  normalisation on the CPU, one forward and one ``.cpu()`` per scale, decoding on the main thread)
  on the first ``--naive-n`` files, on the same device.

Both include decoding. Reports images/s of each, the ratio, and the cosine between the two paths
per image on the files both saw (same weights: random initialisation is fine for speed). The
bound is 0.9999 for fp32 and 0.999 for bf16/fp16 autocast (the target for the GPU path).
A warm-up batch (not timed) runs first for both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_photos(directory: Path, n: int, width: int = 1024, height: int = 768, seed: int = 0) -> list[Path]:
    """``n`` JPEGs from the skimage/sklearn photos; reused when already there."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"photo_{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images]
    sources = [np.ascontiguousarray(s[..., :3]) for s in sources]
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        if path.exists():
            continue
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = src[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        size = (height, width) if i % 4 == 3 else (width, height)  # a quarter portrait
        Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return paths


def run_path(model, image_list, options, warmup_list) -> tuple[np.ndarray, float]:
    import torch

    from cfcd.extract import Extractor

    extractor = Extractor(model, options)
    extractor.extract(warmup_list)  # cuDNN autotuning, allocator, lazy init: not timed
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rows, failures, _ = extractor.extract(image_list)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"unexpected failures: {failures[:3]}")
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cfcd_r50")
    parser.add_argument("--weights", default=None, help="weights (default: random init / embedded)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--n", type=int, default=512, help="images for the fast path")
    parser.add_argument("--naive-n", type=int, default=None, help="images for the reference path (default min(n, 32))")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 1 on the CPU")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--scales", default="cfcd")
    parser.add_argument("--max-size", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where the generated JPEGs go (kept; default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--no-naive", action="store_true", help="time the fast path only")
    args = parser.parse_args(argv)

    import torch

    import cfcd.models
    from cfcd.data.lists import read_image_list
    from cfcd.extract import ExtractOptions, parse_scales

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    naive_n = min(args.n, 32) if args.naive_n is None else min(args.naive_n, args.n)
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cfcd-bench-extract-")
        directory = Path(tmp.name)
    else:
        directory = Path(args.dir)
    t0 = time.perf_counter()
    make_photos(directory, args.n)
    generate_s = time.perf_counter() - t0
    full = read_image_list(directory)
    full = full.subset([i for i, image_id in enumerate(full.ids) if image_id.startswith("photo_")][: args.n])
    warm = full.subset(range(min(len(full), 4)))

    weights = args.weights or (None if cfcd.models.has_embedded_weights(args.model) else "random")  # speed only
    model = cfcd.models.create(args.model, weights=weights)
    recipe = parse_scales(args.scales)
    common = dict(scales=recipe, max_size=args.max_size, device=args.device, progress=False)
    if args.batch_size is None:
        args.batch_size = 32 if args.device.startswith("cuda") else 1
    fast_opts = ExtractOptions(**common, precision=args.precision, batch_size=args.batch_size, workers=args.workers)
    fast_rows, fast_s = run_path(model, full, fast_opts, warm)
    result = {
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "precision": args.precision,
        "scales": list(recipe.scales),
        "image_size": "1024x768 (1/4 portrait)",
        "max_size": args.max_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "fast": {"images": len(full), "seconds": round(fast_s, 3), "images_per_s": round(len(full) / fast_s, 2)},
        "generate_s": round(generate_s, 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if not args.no_naive and naive_n > 0:
        subset = full.subset(range(naive_n))
        naive_opts = ExtractOptions(**common, mode="naive", precision="fp32", batch_size=1, workers=0)
        naive_rows, naive_s = run_path(model, subset, naive_opts, warm.subset([0]))
        cos = (fast_rows[:naive_n] * naive_rows).sum(1)
        bound = 0.9999 if args.precision == "fp32" else 0.999
        result["naive"] = {"images": naive_n, "seconds": round(naive_s, 3), "images_per_s": round(naive_n / naive_s, 3)}
        result["speedup"] = round((len(full) / fast_s) / (naive_n / naive_s), 2)
        result["cosine"] = {"min": float(cos.min()), "mean": float(cos.mean()), "bound": bound, "ok": bool(cos.min() >= bound)}
    print(json.dumps(result, indent=2))
    if args.json:
        from cfcd.utils.io import atomic_write_json

        atomic_write_json(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return 0 if result.get("cosine", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
