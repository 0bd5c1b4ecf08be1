"""``cfcd export``: export a model to ONNX at one scale and check it against PyTorch."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registry name, e.g. cfcd_r50, gem_efficientnet_lite2")
    parser.add_argument("--weights", help="checkpoint file or converted directory (default: embedded weights if any)")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="output file")
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size (default: the model's native size, else 512 512)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    parser.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX opset version of the exported graph (default 17; onnxruntime >= 1.14 runs it)")
    parser.add_argument("--format", default="auto", help="force the checkpoint format (default: auto-detect)")
    parser.add_argument("--non-strict", action="store_true", help="load only the matching tensors of --weights")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed by the check")


def run(args: argparse.Namespace) -> int:
    import torch

    from cfcd.errors import CfcdError
    from cfcd.models import create
    from cfcd.models.export import export_onnx, onnx_max_abs_diff

    model = create(args.model, weights=args.weights, strict=not args.non_strict, format=args.format)
    size = tuple(args.size) if args.size else (model.preprocess.input_size or 512,) * 2
    if min(size) < 32:
        raise CfcdError(f"--size {size[0]} {size[1]}: at least 32 pixels per side (stride-32 backbones)")
    out = export_onnx(model, args.onnx, size=size, batch=args.batch, dynamic=args.dynamic, opset=args.opset)
    print(f"wrote {out} ({args.model}, input {args.batch}x3x{size[0]}x{size[1]}{' dynamic' if args.dynamic else ''}, "
          f"D={model.embedding_dim}, preprocess {model.preprocess.channel_order} mean={list(model.preprocess.mean)} "
          f"std={list(model.preprocess.std)})")
    if not args.no_check:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, *size, generator=generator)
        diff = onnx_max_abs_diff(model, out, x)
        print(f"onnxruntime vs PyTorch: max abs diff {diff:.2e}")
        if diff > args.tolerance:
            raise CfcdError(f"{out}: onnxruntime differs from PyTorch by {diff:.2e} > {args.tolerance:g}")
    return 0
