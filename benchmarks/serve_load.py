"""Bounded load test of ``cfcd serve`` on loopback: N concurrent clients, searches by upload.

Starts ``cfcd serve`` in a subprocess (a real uvicorn on a free 127.0.0.1 port) over an index
(``--index DIR``, or one built here from the real skimage/sklearn photos with
``gem_efficientnet_lite0``), then runs the same searches twice in one run: one client after the
other (``--serial`` requests) and ``--clients`` concurrent clients (``--requests`` in all). Every
request uploads a real photo (JPEG) to ``POST /api/search``; any non-200 answer is an error.
Reports p50/p95/p99 latency, throughput and the concurrent/serial throughput ratio.

    python benchmarks/serve_load.py                        # 8 clients, 200 searches
    python benchmarks/serve_load.py --index out/index --images photos/ --clients 8 --requests 200
    python benchmarks/serve_load.py --runtime torch        # against the default (onnxruntime on a CPU)
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _photos(side: int) -> list[bytes]:
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket(), data.camera(), data.coins(),
              data.moon(), data.brick(), data.grass(), data.gravel(), *load_sample_images().images]
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        img = Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
        img.thumbnail((side, side))
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _build_index(work: Path, photos: list[bytes], scales: str) -> Path:
    import cfcd.models
    from cfcd.data.lists import read_image_list
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.search import build_index

    images = work / "photos"
    images.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(photos):
        (images / f"photo{i:03d}.jpg").write_bytes(data)
    store = work / "photos.store"
    extract_to_store(cfcd.models.create("gem_efficientnet_lite0"), read_image_list(images), store,
                     ExtractOptions(scales=parse_scales(scales), workers=0, progress=False), log=lambda m: None)
    build_index(store, "flat", out=work / "index")
    return work / "index"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(base: str, photos: list[bytes], clients: int, requests: int, k: int) -> tuple[list[float], int, float]:
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = http.post("/api/search", files={"image": (f"q{i}.jpg", photos[i % len(photos)], "image/jpeg")},
                                  data={"k": str(k)})
                    ok = r.status_code == 200 and len(r.json()["results"]) > 0
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - t0


def _report(name: str, latencies: list[float], errors: int, wall: float) -> float:
    ms = np.array(latencies) * 1000
    rate = len(latencies) / wall
    print(f"| {name} | {len(latencies)} | {errors} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | "
          f"{np.percentile(ms, 99):.0f} | {rate:.1f} |")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=None, help="serve this index (default: build one here)")
    parser.add_argument("--images", type=Path, default=None, help="--images of cfcd serve for --index")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--serial", type=int, default=40, help="requests of the one-client pass")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--side", type=int, default=384, help="long side of the uploaded photos")
    parser.add_argument("--scales", default="single", help="scales of the index built here (default single)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"], help="cfcd serve --runtime")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cfcd-serve-load-"))
    photos = _photos(args.side)
    index = args.index or _build_index(work, photos, args.scales)
    port = _free_port()
    command = [sys.executable, "-m", "cfcd", "serve", str(index), "--port", str(port), "--device", args.device,
               "--runtime", args.runtime, "--cache-dir", str(work / "cache")]
    if args.images:
        command += ["--images", str(args.images)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 300
        while True:  # wait for the model to load
            if server.poll() is not None:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            try:
                health = httpx.get(f"{base}/api/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        print(f"server: {health['model']} {health['index_type']} {health['count']} x {health['dim']}, "
              f"scales {health['descriptor']['scales']['scales']}, device {health['device']}, "
              f"runtime {health.get('runtime', 'torch')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; uploads of long side {args.side}, k={args.k}")
        _run(base, photos, 1, 5, args.k)  # warm-up
        print("| clients | searches | errors | p50 ms | p95 ms | p99 ms | searches/s |")
        print("|---|---|---|---|---|---|---|")
        serial = _report("1", *_run(base, photos, 1, args.serial, args.k))
        lat, errors, wall = _run(base, photos, args.clients, args.requests, args.k)
        rate = _report(str(args.clients), lat, errors, wall)
        print(f"throughput {args.clients} clients / 1 client: {rate / serial:.2f}x; load average {os.getloadavg()[0]:.2f}")
        return 1 if errors else 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
