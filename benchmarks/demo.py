"""`cfcd demo` speed: extraction with 1 thread vs all cores (on the demo's own images), and the
demo's wall and CPU time per mode.

    python benchmarks/demo.py                    # threads comparison on 40 database images
    python benchmarks/demo.py --demo quick       # + a fresh `cfcd demo --quick` run, wall and CPU time

The load average is printed with every figure: on a busy machine, OpenMP threads that wait for
each other's time slices make small CPU convolutions much slower than one thread, which is why
the demo runs on one thread (``cfcd.demo.pipeline.THREADS``), which also makes its numbers the same on any machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def threads_comparison(n: int, scales) -> None:
    import torch

    import cfcd.models
    from cfcd.data.gnd import load_gnd
    from cfcd.data.lists import gnd_image_list
    from cfcd.demo.data import Sizes, build_demo_data
    from cfcd.extract import ExtractOptions, Extractor, parse_scales

    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_data(tmp, Sizes(max_side=256))
        gnd = load_gnd(data.test_gnd, "demo")
        images = gnd_image_list(gnd, root=data.benchmarks).subset(range(min(n, len(gnd.imlist))))
        model = cfcd.models.create("gem_efficientnet_lite0")
        options = ExtractOptions(scales=parse_scales(scales), workers=0, progress=False)
        results = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            Extractor(model, options).extract(images.subset(range(2)))  # warm-up
            t0 = time.perf_counter()
            Extractor(model, options).extract(images)
            results[threads] = (time.perf_counter() - t0) / len(images)
            print(f"threads={threads}: {1000 * results[threads]:.1f} ms/img (load average {os.getloadavg()[0]:.1f})")
        if len(results) == 2:
            one, many = results[1], results[max(results)]
            print(f"ratio {max(results)} threads / 1 thread: {many / one:.2f}")


def demo_run(mode: str) -> None:
    from cfcd.demo.pipeline import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        cpu0, t0 = _cpu(), time.perf_counter()
        summary = run_demo(Path(tmp) / "demo", mode=mode, progress=False, stream=sys.stderr)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    print(f"cfcd demo --{mode}: wall {wall:.1f} s, CPU {cpu:.1f} s (load average {os.getloadavg()[0]:.1f})")
    print("steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items()))
    for when in ("before", "after"):
        print(f"{when}: " + ", ".join(f"{s} {summary[when][s]['mAP']:.2f}" for s in ("easy", "medium", "hard")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="database images for the threads comparison")
    parser.add_argument("--scales", default="0.7071 1.0")
    parser.add_argument("--demo", choices=("tiny", "quick", "full"), help="also time a fresh demo run")
    args = parser.parse_args()
    threads_comparison(args.n, args.scales)
    if args.demo:
        demo_run(args.demo)


if __name__ == "__main__":
    main()
