"""The ``cfcd`` command line: a thin layer over the Python API.

Each command lives in its own module ``cfcd.cli.<name>`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the command
being run is imported, so ``cfcd --help`` and light commands never import torch.
Modules must keep their top-level imports light and import heavy code inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cfcd import __version__
from cfcd.errors import CfcdError

# name -> (module, one-line help). Order is the order shown by ``cfcd --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cfcd.cli.demo", "offline end-to-end demo on the embedded pretrained backbone"),
    "selfcheck": ("cfcd.cli.selfcheck", "tiny generated benchmark: evaluate it and print the table"),
    "data": ("cfcd.cli.data", "download and verify datasets (roxford5k, rparis6k, revisitop1m, gldv2_train, gldv2_retrieval)"),
    "extract": ("cfcd.cli.extract", "extract multi-scale global descriptors into a descriptor store"),
    "evaluate": ("cfcd.cli.evaluate", "evaluate stores: revisitop (mAP, mP@k, E/M/H, +1M) or GLDv2 (mAP@100)"),
    "benchmark": ("cfcd.cli.benchmark", "one paper row: extract queries and database, evaluate, print"),
    "index": ("cfcd.cli.index", "build (budgeted, sharded, on-disk), grow and shrink FAISS or exact indexes"),
    "search": ("cfcd.cli.search", "top-k search of query descriptors or photos in an index"),
    "serve": ("cfcd.cli.serve", "web page and JSON API: search by photo, browse an index, explore a benchmark"),
    "whiten": ("cfcd.cli.whiten", "learn PCA whitening (whitenp) or supervised Lw on a descriptor store"),
    "store": ("cfcd.cli.store", "inspect, merge and finalize descriptor stores"),
    "models": ("cfcd.cli.models", "list the registered models: family, output dimension, input, embedded weights"),
    "convert": ("cfcd.cli.convert", "import an official checkpoint into safetensors + JSON config"),
    "export": ("cfcd.cli.export", "export a model to ONNX"),
    "train": ("cfcd.cli.train", "train CFCD, DOLG or a GeM baseline from a YAML recipe"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"usage: cfcd <command> [options]      (cfcd {__version__})",
        "",
        "Single-stage image retrieval: CFCD, DOLG and GeM baselines, revisitop evaluation, FAISS search.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'cfcd <command> --help' for the options of a command."]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"cfcd {name}", description=text)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"cfcd {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"cfcd: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    parser = build_parser(name)
    args = parser.parse_args(argv[1:])
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `cfcd store info X --json | head`: the reader left; stop quietly like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except CfcdError as exc:
        print(f"cfcd {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cfcd {name}: interrupted", file=sys.stderr)
        return 130
