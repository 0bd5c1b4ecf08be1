"""``cfcd demo``: the offline first run -- benchmark, baseline, CFCD fine-tuning, index, report.

    cfcd demo [--out DIR] [--quick | --tiny] [--seed N]
    cfcd demo --images DIR --query PHOTO [--k 10] [--cache DIR]

The first form builds a small benchmark and a disjoint training list from real photos shipped by
installed packages, evaluates the embedded pretrained model, fine-tunes it with CFCD (MadaCos
stage 1, confusions, local-triplet stage 2), evaluates again, builds a FAISS index and writes
DIR/report.html and DIR/summary.json. Rerun with the same --out to resume an interrupted demo.
Every step runs on one torch thread, so a seed gives the same numbers on any machine and at any load.
The second form searches your own photos; their index is kept in a cache (--cache, $CFCD_CACHE
or $XDG_CACHE_HOME/cfcd) and updated incrementally.
"""

from __future__ import annotations

import argparse

DEFAULT_OUT = "cfcd-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    g = parser.add_argument_group("the demo")
    g.add_argument("--out", default=None, help=f"demo directory: data, stores, checkpoints, index, report "
                                                f"(default ./{DEFAULT_OUT}; rerun to resume)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="smaller photos, 2 scales, shorter training (about 3 minutes on a busy 2-core machine)")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="mode",
                      help="a few photos and one short epoch per stage (the test suite's run)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    g.add_argument("--overwrite", action="store_true", help="start a demo directory again from scratch")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = parser.add_argument_group("your own photos")
    g.add_argument("--images", help="a folder of photos to index (incrementally, in the cache)")
    g.add_argument("--query", help="with --images: the query photo")
    g.add_argument("--k", type=int, default=10, help="results to show (default 10)")
    g.add_argument("--cache", help="cache directory (default $CFCD_CACHE, else $XDG_CACHE_HOME/cfcd or ~/.cache/cfcd)")
    g.add_argument("--model", default="gem_efficientnet_lite0", help="registry name (default gem_efficientnet_lite0)")
    g.add_argument("--scales", default="cfcd", help="scale preset or list (default: the CFCD 5 scales)")
    g.add_argument("--max-size", type=int, default=1024, help="cap the longer side of every photo (default 1024)")
    from cfcd.cli.extract import add_runtime_choice

    add_runtime_choice(parser.add_argument_group("runtime"))


def run(args: argparse.Namespace) -> int:
    from cfcd.errors import InputError

    if args.images or args.query:
        if not (args.images and args.query):
            raise InputError("--images and --query go together (index your photos, then rank them for the query)")
        if args.mode or args.out:
            raise InputError("--images/--query search your photos; --out/--quick/--tiny are for the built-in demo")
        if args.k < 1:
            raise InputError(f"--k must be >= 1, got {args.k}")
        from cfcd.demo.photos import search_photos

        search_photos(args.images, args.query, model_name=args.model, scales=args.scales,
                      max_size=args.max_size, k=args.k, cache=args.cache, progress=not args.no_progress,
                      runtime=args.runtime)
        return 0

    from cfcd.demo.pipeline import run_demo

    run_demo(args.out or DEFAULT_OUT, mode=args.mode or "full", seed=args.seed, overwrite=args.overwrite,
             progress=not args.no_progress, runtime=args.runtime)
    return 0
