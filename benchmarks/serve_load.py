"""Bounded load test of ``cfcd serve`` on loopback: 8, 32 and 48 concurrent clients, searches by upload.

Starts ``cfcd serve`` in a subprocess (a real uvicorn on 127.0.0.1) over an index (``--index
DIR``, or one built here from the real skimage/sklearn photos with ``gem_efficientnet_lite0``).
Each level runs ``--seconds`` with N clients uploading real photos (JPEG) to ``POST
/api/search``; a 503 (queue full) is counted apart and its client waits 0.2 s before the next
request, any other non-200 answer is an error. Per level: successful searches/s, p50/p95 of
the successful ones, 503s, errors, the server's peak RSS (``VmHWM``, reset per level through
``/proc/PID/clear_refs``) and the 1-minute load average before and after.

``--big`` instead uploads a 6300x6300 all-zero PNG and a 6000x4500 JPEG (one each) to an index
extracted with the ``cfcd extract`` defaults (five scales, no size cap) while one client keeps
searching with a small photo: time and status of each big upload, the server's RSS growth and
the small searches' worst latency.

    python benchmarks/serve_load.py                        # 8, 32, 48 clients, 20 s each
    python benchmarks/serve_load.py --big
    python benchmarks/serve_load.py --index out/index --images photos/ --clients 8,32 --seconds 30
    python benchmarks/serve_load.py --clients 8 --runtime torch   # against the default (onnxruntime on a CPU)
"""

from __future__ import annotations

import argparse
import io
import os
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
    from cfcd.index import build_index

    images = work / "photos"
    images.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(photos):
        (images / f"photo{i:03d}.jpg").write_bytes(data)
    store = work / "photos.store"
    extract_to_store(cfcd.models.create("gem_efficientnet_lite0"), read_image_list(images), store,
                     ExtractOptions(scales=parse_scales(scales), workers=0, progress=False), log=lambda m: None)
    build_index(store, "flat", out=work / "index")
    return work / "index"


def _rss(pid: int, key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _run(base: str, photos: list[bytes], clients: int, seconds: float, k: int) -> dict:
    import httpx

    latencies: list[float] = []
    counts = {"busy": 0, "errors": 0}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = c
        with httpx.Client(base_url=base, timeout=300) as http:
            while time.perf_counter() < stop:
                i += clients
                t0 = time.perf_counter()
                try:
                    r = http.post("/api/search", files={"image": (f"q{i}.jpg", photos[i % len(photos)], "image/jpeg")},
                                  data={"k": str(k)})
                    status = r.status_code
                    ok = status == 200 and len(r.json()["results"]) > 0
                except httpx.HTTPError:
                    status, ok = None, False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    elif status == 503:
                        counts["busy"] += 1
                    else:
                        counts["errors"] += 1
                if status == 503:
                    time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "wall": time.perf_counter() - t0, **counts}


def _start(index: Path, work: Path, args, extra=()) -> tuple[subprocess.Popen, str]:
    import httpx

    command = [sys.executable, "-m", "cfcd", "serve", str(index), "--port", "0", "--device", args.device,
               "--runtime", args.runtime, "--cache-dir", str(work / "cache"), *extra]
    if args.images:
        command += ["--images", str(args.images)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in server.stderr:  # the port it got, printed once the model is loaded
        if line.startswith("open http://"):
            base = line.split()[1].rstrip("/")
            break
    else:
        raise SystemExit(f"cfcd serve exited with {server.wait()}")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep the pipe drained
    httpx.get(f"{base}/api/health", timeout=60).raise_for_status()
    return server, base


def _levels(args, photos, work) -> int:
    import httpx

    index = args.index or _build_index(work, photos, args.scales)
    server, base = _start(index, work, args)
    try:
        health = httpx.get(f"{base}/api/health", timeout=60).json()
        print(f"server: {health['model']} {health['index_type']} {health['count']} x {health['dim']}, "
              f"scales {health['descriptor']['scales']['scales']}, device {health['device']}, "
              f"{os.cpu_count()} CPUs; uploads of long side {args.side}, k={args.k}, {args.seconds:g} s per level")
        _run(base, photos, 1, 3, args.k)  # warm-up
        print("| clients | searches/s | p50 ms | p95 ms | 503 | errors | peak RSS MiB | load avg before/after |")
        print("|---|---|---|---|---|---|---|---|")
        rates = {}
        for clients in [int(c) for c in args.clients.split(",")]:
            _reset_peak(server.pid)
            before = os.getloadavg()[0]
            out = _run(base, photos, clients, args.seconds, args.k)
            ms = np.array(out["latencies"] or [float("nan")]) * 1000
            rates[clients] = len(out["latencies"]) / out["wall"]
            print(f"| {clients} | {rates[clients]:.1f} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | "
                  f"{out['busy']} | {out['errors']} | {_rss(server.pid, 'VmHWM') / 2**20:.0f} | "
                  f"{before:.1f} / {os.getloadavg()[0]:.1f} |", flush=True)
        first = next(iter(rates))
        for clients, rate in rates.items():
            print(f"successful searches/s, {clients} clients / {first} clients: {rate / rates[first]:.2f}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def _big(args, photos, work) -> int:
    import httpx
    from PIL import Image

    index = args.index or _build_index(work, photos, "cfcd")  # the cfcd extract defaults: five scales, no cap
    uploads = {}
    buffer = io.BytesIO()
    Image.new("RGB", (6300, 6300)).save(buffer, format="PNG")
    uploads["6300x6300 all-zero PNG"] = buffer.getvalue()
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((6000, 4500), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    uploads["6000x4500 JPEG"] = buffer.getvalue()
    server, base = _start(index, work, args)
    try:
        print(f"index: {index} (cfcd extract defaults), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        _run(base, photos, 1, 3, args.k)  # warm-up
        print("| upload | bytes | status | seconds | described at | server RSS growth MiB | small searches: worst s, count |")
        print("|---|---|---|---|---|---|---|")
        for name, payload in uploads.items():
            _reset_peak(server.pid)
            rss0 = _rss(server.pid, "VmRSS")
            small: list[float] = []
            done = threading.Event()

            def searcher():
                with httpx.Client(base_url=base, timeout=300) as http:
                    while not done.is_set():
                        t0 = time.perf_counter()
                        http.post("/api/search", files={"image": ("s.jpg", photos[0], "image/jpeg")}, data={"k": "10"})
                        small.append(time.perf_counter() - t0)

            t = threading.Thread(target=searcher)
            t.start()
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/api/search", files={"image": ("big", payload, "application/octet-stream")},
                           data={"k": "10"}, timeout=600)
            dt = time.perf_counter() - t0
            done.set()
            t.join()
            ds = r.json().get("query", {}).get("downscaled") if r.status_code == 200 else r.text[:80]
            print(f"| {name} | {len(payload)} | {r.status_code} | {dt:.1f} | {ds} | "
                  f"{(_rss(server.pid, 'VmHWM') - rss0) / 2**20:.0f} | {max(small):.1f}, {len(small)} |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=None, help="serve this index (default: build one here)")
    parser.add_argument("--images", type=Path, default=None, help="--images of cfcd serve for --index")
    parser.add_argument("--clients", default="8,32,48", help="client counts, one level each (default 8,32,48)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each level (default 20)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--side", type=int, default=384, help="long side of the uploaded photos")
    parser.add_argument("--scales", default="single", help="scales of the index built here (default single)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--big", action="store_true", help="the two big uploads instead of the load levels")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"], help="cfcd serve --runtime")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cfcd-serve-load-"))
    photos = _photos(args.side)
    return _big(args, photos, work) if args.big else _levels(args, photos, work)


if __name__ == "__main__":
    sys.exit(main())
