"""``cfcd convert``: import an official checkpoint into ``model.safetensors`` + ``config.json``.

Afterwards ``cfcd.models.create(NAME, weights=OUT)`` (and every ``--weights OUT``) loads it with no
pickle at all. Extra tensors (the MadaCos/ArcFace classifier ``desc_cls``, ImageNet heads, cirtorch
Lw, dirtorch PCA) go to ``extra.safetensors``.
"""

from __future__ import annotations

import argparse


def _kwarg(text: str) -> tuple[str, object]:
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# == cfcd.models.checkpoints.format_names() (kept here so that --help does not import torch; a test checks it)
FORMATS = ("auto", "cfcd", "cfcd-safetensors", "cirtorch", "dirtorch", "dolg", "efficientnet_lite", "pycls", "timm",
           "torchvision", "vit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="checkpoint: .pyth (pycls/CFCD/DOLG), .pth (cirtorch, torchvision), .pt (dirtorch), ...")
    parser.add_argument("--model", help="registry name (default: inferred from the checkpoint when it says)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="source format (default: auto-detect)")
    parser.add_argument("--non-strict", action="store_true",
                        help="keep only the matching tensors instead of failing on missing/unexpected/mismatched ones")
    parser.add_argument("--backbone-only", action="store_true",
                        help="ImageNet backbone for training (pycls/torchvision): heads stay freshly initialised")
    parser.add_argument("--set", dest="kwargs", action="append", type=_kwarg, default=[], metavar="KEY=VALUE",
                        help="model option, e.g. --set with_bn=true (JSON values); repeatable")


def run(args: argparse.Namespace) -> int:
    from cfcd.models.checkpoints import read_checkpoint
    from cfcd.models.convert import convert_checkpoint
    from cfcd.errors import InputError

    name = args.model
    if name is None:
        name = read_checkpoint(args.input, format=args.format).model_name
        if name is None:
            raise InputError(f"{args.input}: the checkpoint does not say which model it is; pass --model NAME")
    model, report, out = convert_checkpoint(args.input, name, args.out, format=args.format,
                                            strict=not args.non_strict, backbone_only=args.backbone_only,
                                            **dict(args.kwargs))
    print(f"{args.input} -> {out}")
    print(f"  model   {name} {model.model_config['kwargs']}")
    print(f"  weights {report.summary()}")
    for note in report.notes:
        print(f"  note    {note}")
    return 0
