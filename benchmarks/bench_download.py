"""Cost of the safety in ``cfcd data download|verify``, each measured against the plain path.

1. download: ``download_file`` (.part, fsync, sha256 while streaming, progress off) vs a bare
   ``urlopen`` + ``shutil.copyfileobj`` of the same file from a local HTTP server.
2. extract: ``extract_archive`` (member by member, sha256 of every file, atomic rename, flatten)
   vs ``tarfile.extractall`` (what the original revisitop script does), same .tgz.
3. verify: ``check_image`` (Pillow open + verify) over the extracted JPEGs with 1 thread vs
   ``--workers`` threads, and ``decode=True`` (full decode) with the same threads.

    .venv/bin/python benchmarks/bench_download.py [--files 3000] [--mbytes 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _download_helpers import FileServer  # noqa: E402

from cfcd.data.datasets import check_image  # noqa: E402
from cfcd.data.download import download_file, extract_archive  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_tgz(n: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
            data = io.BytesIO()
            image.save(data, format="JPEG", quality=85)
            info = tarfile.TarInfo(f"oxbuild/{i % 11}/img_{i:06d}.jpg")
            info.size = data.tell()
            data.seek(0)
            tar.addfile(info, data)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--mbytes", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_download_"))
    try:
        payload = os.urandom(args.mbytes << 20)
        with FileServer({"/blob": payload}) as server:
            def plain():
                with urllib.request.urlopen(server.url + "/blob") as r, open(work / "plain", "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)

            def ours():
                (work / "ours").unlink(missing_ok=True)
                download_file(server.url + "/blob", work / "ours", progress=False, backoff=0)

            t_plain, t_ours = best_of(args.repeat, plain), best_of(args.repeat, ours)
        mb = args.mbytes
        print(f"download {mb} MiB: urlopen+copyfileobj {t_plain:.3f}s ({mb / t_plain:.0f} MiB/s), "
              f"download_file {t_ours:.3f}s ({mb / t_ours:.0f} MiB/s), ratio {t_ours / t_plain:.2f}x")

        archive = work / "images.tgz"
        archive.write_bytes(make_tgz(args.files))

        def plain_extract():
            shutil.rmtree(work / "plain_x", ignore_errors=True)
            with tarfile.open(archive) as tar:
                tar.extractall(work / "plain_x", filter="data")

        def ours_extract():
            shutil.rmtree(work / "jpg", ignore_errors=True)
            extract_archive(archive, work / "jpg", flatten=True)

        t_plain, t_ours = best_of(args.repeat, plain_extract), best_of(args.repeat, ours_extract)
        print(f"extract {args.files} JPEGs ({archive.stat().st_size / 2**20:.1f} MiB .tgz): tarfile.extractall "
              f"{t_plain:.3f}s, extract_archive (sha256 + atomic + flatten) {t_ours:.3f}s, "
              f"ratio {t_ours / t_plain:.2f}x")

        paths = sorted((work / "jpg").iterdir())

        def check(workers: int, decode: bool):
            with ThreadPoolExecutor(workers) as pool:
                bad = [r for r in pool.map(lambda p: check_image(p, decode=decode), paths, chunksize=16) if r]
            assert not bad, bad[:3]

        t1 = best_of(args.repeat, lambda: check(1, False))
        tn = best_of(args.repeat, lambda: check(args.workers, False))
        td = best_of(args.repeat, lambda: check(args.workers, True))
        print(f"verify {len(paths)} images: open+verify 1 thread {t1:.3f}s ({len(paths) / t1:.0f}/s), "
              f"{args.workers} threads {tn:.3f}s (speed-up {t1 / tn:.2f}x); "
              f"--decode {args.workers} threads {td:.3f}s ({td / tn:.1f}x the open+verify time)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
