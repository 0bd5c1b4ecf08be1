"""Extraction speed: the fast batched path against the reference procedure, end to end from JPEGs.

    python benchmarks/extract.py --model cfcd_r50 --device cuda --precision bf16 --n 512
    python benchmarks/extract.py --model gem_efficientnet_lite0 --device cpu --n 16 --naive-n 8
    python benchmarks/extract.py --model gem_efficientnet_lite2 --device cpu --precision fp32 --scales single \
        --max-size 512 --n 64 --no-naive --runtimes torch,onnx --bare    # the CPU section of the README

Generates ``--n`` JPEGs of 1024x768 (every fourth one 768x1024) from the skimage/sklearn photos
(random crops, flips and resizes, so no two are alike), then times on the same files:

* **fast**: ``cfcd.extract.Extractor`` as ``cfcd extract`` runs it (DataLoader decoding workers,
  size buckets, device resizing, autocast at ``--precision``, one ``.cpu()`` per batch);
* **naive**: the CFCD ``evaler/infer.py`` procedure (batch 1, fp32, ``cv2.resize`` and numpy
  normalisation on the CPU, one forward and one ``.cpu()`` per scale, decoding on the main thread)
  on the first ``--naive-n`` files, on the same device.

With ``--runtimes torch,onnx`` the fast path is timed once per runtime (``cfcd extract --runtime``;
the cosine of each to the first is reported); ``--bare`` adds the limit: a bare onnxruntime session
(default settings) timed on ready normalised tensors of every scale's size, no decoding, no
resizing. The 1-minute load average is recorded before and after.

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


def bare_onnx(model, recipe, sizes: list[tuple[int, int]], repeats: int = 3) -> float:
    """Seconds per image of a bare onnxruntime session (default settings) on normalised tensors:
    one forward per scale (and flip), for each (height, width) in ``sizes`` (the mean over them)."""
    import onnxruntime as ort
    import torch

    from cfcd.extract.describe import resize_on_device
    from cfcd.extract.runtimes import cached_graph

    session = ort.InferenceSession(str(cached_graph(model)), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    per_image = []
    for height, width in sizes:
        base = torch.zeros(1, 3, height, width)
        shapes = [tuple(resize_on_device(base, recipe, s).shape) for s in recipe.scales] * (2 if recipe.flip else 1)
        inputs = [np.random.default_rng(0).standard_normal(shape).astype(np.float32) for shape in shapes]
        for x in inputs:  # warm-up
            session.run(None, {name: x})
        start = time.perf_counter()
        for _ in range(repeats):
            for x in inputs:
                session.run(None, {name: x})
        per_image.append((time.perf_counter() - start) / repeats)
    return float(np.mean(per_image))


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
    parser.add_argument("--runtimes", default="torch", help="comma-separated runtimes for the fast path: torch, onnx, auto")
    parser.add_argument("--bare", action="store_true", help="also time a bare onnxruntime forward (the limit)")
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
    load_before = os.getloadavg()[0]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    per_runtime = {}
    for runtime in runtimes:
        opts = ExtractOptions(**common, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                              runtime=runtime)
        rows, seconds = run_path(model, full, opts, warm)
        per_runtime[runtime] = (rows, seconds)
    fast_rows, fast_s = per_runtime[runtimes[0]]
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
        "load_average_before": round(load_before, 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if len(runtimes) > 1 or runtimes != ["torch"]:
        result["runtimes"] = {}
        for runtime, (rows, seconds) in per_runtime.items():
            cos = (rows * fast_rows).sum(1)
            result["runtimes"][runtime] = {"seconds": round(seconds, 3), "images_per_s": round(len(full) / seconds, 2),
                                           "cosine_to_first_min": float(cos.min())}
    if args.bare:
        from PIL import Image

        sizes = sorted({Image.open(p).size[::-1] for p in full.paths})
        if args.max_size:
            sizes = [tuple(int(round(v * min(1.0, args.max_size / max(h, w)))) for v in (h, w)) for h, w in sizes]
        # the share of each size in the list (portrait one in four)
        counts = {}
        for p in full.paths:
            h, w = Image.open(p).size[::-1]
            counts[(h, w)] = counts.get((h, w), 0) + 1
        per = bare_onnx(model, recipe, sizes)
        result["bare_onnx"] = {"ms_per_image": round(1000 * per, 2), "images_per_s": round(1 / per, 2),
                               "sizes": [list(s) for s in sizes]}
        for runtime in result.get("runtimes", {}):
            result["runtimes"][runtime]["of_bare"] = round(result["runtimes"][runtime]["images_per_s"] * per, 3)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
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
