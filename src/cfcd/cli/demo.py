"""``cfcd demo``: the offline end-to-end demo on the embedded pretrained backbone."""

from __future__ import annotations

import argparse
import tempfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gem_efficientnet_lite2",
                        help="registry name (default: the embedded gem_efficientnet_lite2)")
    parser.add_argument("--workdir", help="where to write the benchmark, stores and index (default: a temp dir)")
    parser.add_argument("--scales", default="cfcd", help="scale preset or list (default: the CFCD 5 scales)")
    parser.add_argument("--images", help="your own photos: a directory to index instead of the built-in benchmark")
    parser.add_argument("--query", help="with --images: the query photo")
    parser.add_argument("--k", type=int, default=5, help="results to show per query")


def run(args: argparse.Namespace) -> int:
    from cfcd.demo import run_benchmark_demo, run_own_photos_demo
    from cfcd.errors import InputError

    if bool(args.images) != bool(args.query):
        raise InputError("--images and --query go together (index your photos, then rank them for the query)")
    with tempfile.TemporaryDirectory(prefix="cfcd-demo-") as tmp:
        workdir = args.workdir or tmp
        if args.images:
            run_own_photos_demo(args.images, args.query, workdir, model_name=args.model, scales=args.scales, k=args.k)
        else:
            run_benchmark_demo(workdir, model_name=args.model, scales=args.scales, k=args.k, keep=bool(args.workdir))
    return 0
