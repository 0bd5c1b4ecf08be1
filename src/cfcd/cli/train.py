"""``cfcd train``: train from a YAML recipe, and the training-data tools.

    cfcd train --config cfcd_r50_s1 data.root=/data/gldv2 [key=value ...]
    torchrun --nproc_per_node=8 -m cfcd train --config configs/cfcd_r50_s1.yaml data.root=...
    cfcd train make-list --csv train_clean.csv --out lists/ [--val-fraction 0.01 --seed 0 --min-images 2]
    cfcd train confusions --config cfcd_r50_s1 --weights runs/cfcd_r50_s1/final \\
        --list lists/train_list.txt --root /data/gldv2 --out lists/landmark_scores.txt
    cfcd train print-config --config cfcd_r50_s2 [key=value ...]
    cfcd train recipes
"""

from __future__ import annotations

import argparse
import json
import sys

ACTIONS = ("make-list", "confusions", "print-config", "recipes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    # REMAINDER: options may follow the action and the overrides; run() re-parses them intermixed
    _add_options(parser, nargs=argparse.REMAINDER)


def _add_options(parser: argparse.ArgumentParser, nargs) -> None:
    parser.add_argument("words", nargs=nargs, metavar="[ACTION] key=value",
                        help=f"optional action ({', '.join(ACTIONS)}) then config overrides, e.g. optim.lr=0.01")
    g = parser.add_argument_group("training")
    g.add_argument("--config", help="recipe: a YAML path or a packaged name (cfcd train recipes)")
    g.add_argument("--device", default=None, help="cuda, cpu or cuda:N (default: the local GPU if any)")
    g.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the output directory")
    g = parser.add_argument_group("make-list (GLDv2-clean csv -> train/val lists)")
    g.add_argument("--csv", help="train_clean.csv (columns landmark_id,images)")
    g.add_argument("--out", help="make-list: output directory; confusions: output file")
    g.add_argument("--val-fraction", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-images", type=int, default=2)
    g.add_argument("--prefix", default="train", help="path prefix of the images (default train/)")
    g = parser.add_argument_group("confusions (stage-1 predictions for hard negatives)")
    g.add_argument("--weights", help="stage-1 checkpoint (ours or the official .pyth) with the classifier")
    g.add_argument("--list", dest="list_path", help="the training list to score")
    g.add_argument("--root", help="image root of the list")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=4)


def _need(args, *names) -> None:
    from cfcd.errors import InputError

    missing = [n for n in names if getattr(args, n.replace("-", "_")) in (None, "")]
    if missing:
        raise InputError("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))


def run(args: argparse.Namespace) -> int:
    import logging

    from cfcd.errors import InputError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if any(w.startswith("-") for w in args.words):
        again = argparse.ArgumentParser(prog="cfcd train")
        _add_options(again, nargs="*")
        args = again.parse_intermixed_args(args.words, namespace=args)
    words = list(args.words)
    action = words.pop(0) if words and words[0] in ACTIONS else None
    if words and action is None and "=" not in words[0]:
        raise InputError(f"unknown action {words[0]!r}: expected one of {', '.join(ACTIONS)} or key=value overrides")

    if action == "recipes":
        import textwrap

        from cfcd.train.config import CONFIGS_DIR, recipe_summary

        for p in sorted(CONFIGS_DIR.glob("*.yaml")):
            lines = textwrap.wrap(recipe_summary(p), width=100) or [""]
            print(f"{p.stem:<26} {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<26} {line}")
        return 0

    if action == "make-list":
        from cfcd.train.data import make_gldv2_lists

        _need(args, "csv", "out")
        info = make_gldv2_lists(args.csv, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                min_images=args.min_images, prefix=args.prefix)
        print(json.dumps(info, indent=2))
        return 0

    from cfcd.train.config import dump_config, load_config

    _need(args, "config")
    cfg = load_config(args.config, words)
    if action == "print-config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if action == "confusions":
        from cfcd.train.confusions import write_confusions

        _need(args, "weights", "list_path", "out")
        summary = write_confusions(cfg, args.weights, args.list_path, args.root or cfg["data"]["root"], args.out,
                                   batch_size=args.batch_size, workers=args.workers, device=args.device)
        if summary:
            print(json.dumps(summary, indent=2))
        return 0

    from cfcd.train.trainer import train

    metrics = train(cfg, device=args.device, resume=not args.no_resume)
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}, indent=2))
    return 0
