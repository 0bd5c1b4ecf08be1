"""``cfcd train``: train from a YAML recipe, and the training-data tools as subcommands.

    cfcd train --config cfcd_r50_s1 data.root=/data/gldv2 [key=value ...]
    torchrun --nproc_per_node=8 -m cfcd train --config cfcd_r50_s1 data.root=/data/gldv2
    cfcd train make-list --csv train_clean.csv --root /data/gldv2 --out lists/
    cfcd train confusions --config cfcd_r50_s1 --weights runs/cfcd_r50_s1/final \\
        --list lists/train_list.txt --root /data/gldv2 --out lists/landmark_scores.txt
    cfcd train print-config --config cfcd_r50_s2 [key=value ...]
    cfcd train recipes

Overrides are recipe keys with YAML values: optim.lr=0.01 data.root=/x model.kwargs.learnable_p=false.
"""

from __future__ import annotations

import argparse
import json
import sys

SUBCOMMANDS = {
    "make-list": "GLDv2 csv -> train/val lists of the images present under --root",
    "confusions": "score the training list with a stage-1 model: hard negatives for stage 2",
    "print-config": "print the resolved recipe (defaults <- recipe <- overrides) as YAML",
    "recipes": "list the packaged recipes",
}

_OVERRIDES_HELP = "recipe overrides, e.g. optim.lr=0.01 data.root=/x (YAML values; see print-config for every key)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = ("cfcd train --config RECIPE [key=value ...] [--device DEVICE] [--no-resume]\n"
                    f"       cfcd train {{{','.join(SUBCOMMANDS)}}} [options]")
    parser.description = (parser.description or "") + "\n\nsubcommands (cfcd train SUBCOMMAND --help):\n" + "".join(
        f"  {name:<13} {text}\n" for name, text in SUBCOMMANDS.items())
    parser.epilog = "examples:\n" + __doc__.split("\n", 2)[2]
    _training_options(parser)
    # REMAINDER: a subcommand and its options, or overrides mixed with options; run() parses them
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="key=value", help=_OVERRIDES_HELP)


def _config_option(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--config", required=required,
                        help="recipe: a YAML path or a packaged name (cfcd train recipes)")


def _training_options(parser: argparse.ArgumentParser) -> None:
    _config_option(parser, required=False)
    parser.add_argument("--device", default=None, help="cuda, cpu or cuda:N (default: the local GPU if any)")
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore checkpoints already in the output directory (default: continue from the newest)")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of plain training (key "") and of each subcommand."""
    def new(name: str) -> argparse.ArgumentParser:
        prog = "cfcd train" + (f" {name}" if name else "")
        return argparse.ArgumentParser(prog=prog, description=SUBCOMMANDS.get(name, "train from a YAML recipe"))

    out = {}
    p = out[""] = new("")
    _training_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)

    p = out["make-list"] = new("make-list")
    p.add_argument("--csv", required=True,
                   help="GLDv2 train_clean.csv (landmark_id,images) or train.csv (id,url,landmark_id)")
    p.add_argument("--root", default=None,
                   help="image root: only images present as ROOT/PREFIX/a/b/c/<id>.jpg are listed (a partial "
                        "download trains on what is there); without it every image of the csv is listed")
    p.add_argument("--out", required=True, help="output directory for train_list.txt, val_list.txt, "
                                                "label_map.tsv/.json and split.json")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of the listed images held out for validation, from the training classes (0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (0)")
    p.add_argument("--min-images", type=int, default=2,
                   help="landmarks with fewer listed images are dropped; every class keeps this many "
                        "training images (2)")
    p.add_argument("--prefix", default="train",
                   help="directory of the images under the root, first part of each list path (default train; "
                        "'' for none)")

    p = out["confusions"] = new("confusions")
    _config_option(p, required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    p.add_argument("--weights", required=True,
                   help="stage-1 model with its classifier: our final/ directory or checkpoint, or the official .pyth")
    p.add_argument("--list", dest="list_path", default=None,
                   help="the training list to score (default: the recipe's data.train_list)")
    p.add_argument("--root", default=None, help="image root of the list (default: the recipe's data.root)")
    p.add_argument("--out", required=True, help="output file, e.g. lists/landmark_scores.txt (path gt pred score)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (4; 0: in this process)")
    p.add_argument("--device", default=None, help="cuda, cpu or cuda:N (default: the local GPU if any)")

    p = out["print-config"] = new("print-config")
    _config_option(p, required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)

    out["recipes"] = new("recipes")
    return out


def run(args: argparse.Namespace) -> int:
    import logging

    from cfcd.errors import InputError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    words = list(args.words)
    name = words.pop(0) if words and words[0] in SUBCOMMANDS else ""
    if not name and words and "=" not in words[0] and not words[0].startswith("-"):
        raise InputError(f"unknown subcommand {words[0]!r}: expected one of {', '.join(SUBCOMMANDS)}, "
                         "or key=value overrides")
    # options given before the subcommand (cfcd train --config X print-config) are kept
    seed = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                 if k in ("config", "device", "no_resume") and v not in (None, False)})
    args = _parsers()[name].parse_intermixed_args(words, namespace=seed)

    if name == "recipes":
        return _recipes()
    if name == "make-list":
        from cfcd.train.data import make_gldv2_lists

        info = make_gldv2_lists(args.csv, args.out, root=args.root, val_fraction=args.val_fraction, seed=args.seed,
                                min_images=args.min_images, prefix=args.prefix)
        print(json.dumps(info, indent=2))
        if info.get("missing_images"):
            print(f"{info['missing_images']} of the csv's {info['csv_images']} images are not under {args.root}: "
                  f"listed the {info['csv_images'] - info['missing_images']} present", file=sys.stderr)
        return 0

    from cfcd.train.config import dump_config, load_config

    if not args.config:
        raise InputError("missing --config (a recipe: cfcd train recipes lists the packaged ones)")
    cfg = load_config(args.config, args.overrides)
    if name == "print-config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if name == "confusions":
        from cfcd.train.builders import data_file
        from cfcd.train.confusions import write_confusions

        list_path = args.list_path or data_file(cfg, "train_list")
        summary = write_confusions(cfg, args.weights, list_path, args.root or cfg.data.root, args.out,
                                   batch_size=args.batch_size, workers=args.workers, device=args.device)
        if summary:
            print(json.dumps(summary, indent=2))
        return 0

    from cfcd.train.trainer import train

    metrics = train(cfg, device=args.device, resume=not getattr(args, "no_resume", False))
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}, indent=2))
    return 0


def _recipes() -> int:
    import textwrap

    from cfcd.train.config import CONFIGS_DIR, recipe_summary

    for p in sorted(CONFIGS_DIR.glob("*.yaml")):
        lines = textwrap.wrap(recipe_summary(p), width=100) or [""]
        print(f"{p.stem:<26} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<26} {line}")
    return 0
