"""``cfcd extract``: multi-scale global descriptors of an image list into a descriptor store.

Examples::

    cfcd extract --images photos/ --out stores/photos --max-size 1024   # embedded gem_efficientnet_lite2
    cfcd extract --model cfcd_r50 --weights cfcd_r50.safetensors --images photos/ --out stores/photos
    cfcd extract --model cfcd_r50 --weights W --gnd data/roxford5k/gnd_roxford5k.pkl --queries \\
        --root data/roxford5k --out stores/roxf-q            # the 70 queries, cropped, in qimlist order
    torchrun --nproc_per_node 8 -m cfcd extract --model cfcd_r101 --weights W \\
        --images revisitop1m.txt --root data/revisitop1m/jpg --out stores/r1m --device cuda --precision bf16

A killed job rerun with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# = cfcd.models.registry.DEFAULT_MODEL, written out: importing cfcd.models loads torch (seconds of start-up)
DEFAULT_MODEL = "gem_efficientnet_lite2"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name (cfcd_r50, cfcd_r101, dolg_r50, gem_r101, ...; 'cfcd models' lists them); "
                   f"gem_efficientnet_lite0/1/2 have embedded ImageNet weights (default {DEFAULT_MODEL})")
    g.add_argument("--weights", default=None,
                   help="weights file or 'cfcd convert' directory (safetensors, or an official .pyth/.pt checkpoint); "
                   "required unless the model has embedded weights; 'random' for a random initialisation")


def add_procedure_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that change the descriptors (shared with ``cfcd benchmark``)."""
    g = parser.add_argument_group("multi-scale procedure")
    g.add_argument(
        "--scales",
        default="cfcd",
        help="preset (cfcd: 0.3535 0.5 0.7071 1 1.4142, mean; cirtorch: 1 0.7071 0.5; dirtorch: longer side 1024 and "
        "724 with Pillow, sympow 3; dirtorch_relative; single) or numbers such as '1 0.7071 0.5' (default: cfcd; "
        "docs/peers.md says what each reproduces)",
    )
    g.add_argument("--flip", action="store_true", help="also describe every scale horizontally flipped (averaged)")
    g.add_argument("--power", type=float, default=None, help="combine scales with the generalised mean of this power (cirtorch msp)")
    g.add_argument(
        "--size-rule",
        choices=["round", "half_up", "scale_factor", "largest"],
        default=None,
        help="target size of a scale: round(h*s) (cfcd), int(0.5+h*s) (dirtorch), floor via scale_factor (cirtorch)",
    )
    g.add_argument("--max-size", type=int, default=None,
                   help="cap the longer side (Lanczos thumbnail) before the scales; default: none. On a CPU, photos at "
                        "full resolution and 5 scales take 10-16 s each: --max-size 1024 is several times faster")
    g.add_argument(
        "--crop-rule",
        choices=["truncate", "round"],
        default=None,
        help="query box to pixels: int() like the CFCD/DOLG reference (default for cfcd_/dolg_ models) "
        "or round like PIL crop / revisitop (default for the others)",
    )
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision (default fp32)")
    g.add_argument("--naive", action="store_true", help="reference path: batch 1, fp32, cv2 resizing and normalisation on the CPU, one image at a time")
    g.add_argument("--alpha", choices=["drop", "white"], default="drop", help="transparent images: drop alpha (like cv2.imread) or composite on white")
    g.add_argument("--truncated", choices=["warn", "fail"], default="warn", help="truncated JPEGs: decode what is there (warning) or fail")
    g.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels, before decoding (default 100M; 0: no cap)")


def add_whitening_arguments(parser, *, group: str | None = "whitening", beside: str = "--weights") -> None:
    """``--whiten`` and ``--whiten-power``, in a new group (or in ``parser`` itself, a group, with ``group=None``)."""
    g = parser.add_argument_group(group) if group else parser
    g.add_argument("--whiten", default=None, metavar="FILE_OR_NAME",
                   help="apply a whitening: a file from `cfcd whiten`, or the NAME of one that `cfcd convert` "
                        f"stored beside {beside} (dirtorch: Landmarks_clean)")
    g.add_argument("--whiten-power", type=float, default=None, metavar="P",
                   help="PCA eigenvalue power (dirtorch --whitenp; its README rows use 0.25; default: the file's)")


def resolve_whitening_arguments(args, weights=None):
    """The Whitening that --whiten/--whiten-power ask for, or None."""
    from cfcd.errors import InputError

    if args.whiten is None:
        if args.whiten_power is not None:
            raise InputError("--whiten-power needs --whiten FILE_OR_NAME")
        return None
    from cfcd.postprocess import resolve_whitening

    return resolve_whitening(args.whiten, power=args.whiten_power, weights=weights)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (same-size images are batched); default 16 on CUDA, 1 on the CPU")
    g.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=f"decoding processes (default {DEFAULT_WORKERS})")
    add_runtime_choice(g)
    g.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="descriptor dtype in the store")
    g.add_argument("--shard-size", type=int, default=1024, help="rows per resumable shard (default 1024)")
    g.add_argument("--flush-seconds", type=float, default=30.0,
                   help="also write a shard at least this often, so a killed job loses at most this much "
                   "work (default 30; 0: after every batch)")
    g.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: no cuDNN autotuning (for collections where every image has its own size)")
    g.add_argument("--overwrite", action="store_true", help="replace a complete store with other settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # debug: stop like a kill


def add_runtime_choice(group) -> None:
    group.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                       help="what runs the network: auto (default) is onnxruntime on the CPU (the graph is exported "
                       "once and cached) and torch on a GPU; results equal within cosine 0.9999")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("images")
    g.add_argument("--images", default=None, help="a text list of paths (relative to --root) or a directory scanned recursively")
    g.add_argument("--root", default=None, help="root of the paths in --images, or of the revisitop jpgs with --gnd")
    g.add_argument("--gnd", default=None, help="revisitop ground truth gnd_<ds>.pkl: extract its imlist (database)")
    g.add_argument("--queries", action="store_true", help="with --gnd: extract qimlist cropped to the boxes, in order")
    g.add_argument("--id-rule", choices=["stem", "path"], default="stem", help="ids: relative path without (stem) or with extension")
    parser.add_argument("--out", required=True, help="output descriptor store directory")
    add_procedure_arguments(parser)
    add_whitening_arguments(parser)
    add_runtime_arguments(parser)


def default_crop_rule(model_name: str) -> str:
    """The query-crop rule the model's family registered (the reference code's own rule)."""
    from cfcd.models import get_entry

    return get_entry(model_name).crop_rule


def build_options(args, *, device: str):
    from cfcd.data.images import DEFAULT_MAX_PIXELS
    from cfcd.extract import ExtractOptions, parse_scales

    recipe = parse_scales(args.scales, power=args.power, size_rule=args.size_rule, flip=getattr(args, "flip", False))
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (None if args.max_pixels <= 0 else args.max_pixels)
    return ExtractOptions(
        scales=recipe,
        max_size=args.max_size,
        crop_rule=args.crop_rule or default_crop_rule(args.model),
        alpha=args.alpha,
        truncated=args.truncated,
        max_pixels=max_pixels,
        mode="naive" if args.naive else "fast",
        device=device,
        precision=args.precision,
        batch_size=1 if args.naive else args.batch_size,
        workers=args.workers,
        dtype=args.dtype,
        shard_size=args.shard_size,
        flush_seconds=args.flush_seconds,
        stop_after=args.stop_after,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        progress=not args.no_progress,
        runtime=getattr(args, "runtime", "auto"),
    )


def resolve_device(requested: str | None) -> str:
    from cfcd.runtime import resolve_device as resolve

    return str(resolve(requested))


def create_model(name: str, weights: str | None):
    import cfcd.models
    from cfcd.errors import InputError

    cfcd.models.get_entry(name)  # unknown names fail here, before any weights are read; gem_<timm name> works
    if weights == cfcd.models.RANDOM_WEIGHTS:
        import sys

        print(f"warning: {name} with RANDOM weights (--weights random): the descriptors are not meaningful "
              "for retrieval", file=sys.stderr)
    elif weights is not None and not os.path.exists(weights):
        raise InputError(f"{weights}: weights file or converted weights directory not found")
    return cfcd.models.create(name, weights=weights)


def format_summary(summary, out) -> str:
    lines = []
    store = summary.store
    if store is not None:
        rate = f"{summary.images_per_second:.1f} img/s" if summary.count else "nothing new to extract"
        lines.append(
            f"{out}: {len(store.descriptors)} descriptors ({store.descriptors.shape[1]}-D {store.descriptors.dtype}); "
            f"this run {summary.count} in {summary.seconds:.1f} s ({rate}); "
            f"{len(summary.failures)} failed, {len(summary.warnings)} warning(s)"
        )
    for failure in summary.failures[:10]:
        lines.append(f"  failed  {failure['id']}: {failure['reason']}")
    if len(summary.failures) > 10:
        lines.append(f"  ... and {len(summary.failures) - 10} more failures (meta.json)")
    for warning in summary.warnings[:5]:
        lines.append(f"  warning {warning['id']}: {warning['warning']}")
    return "\n".join(lines)


def run(args) -> int:
    from cfcd.data.lists import gnd_image_list, read_image_list
    from cfcd.errors import InputError
    from cfcd.extract import extract_to_store

    if (args.images is None) == (args.gnd is None):
        raise InputError("give exactly one of --images LIST_OR_DIR and --gnd FILE")
    if args.queries and args.gnd is None:
        raise InputError("--queries needs --gnd FILE")
    device = resolve_device(args.device)
    options = build_options(args, device=device)
    if args.gnd is not None:
        from pathlib import Path

        from cfcd.data.gnd import load_gnd

        gnd = load_gnd(args.gnd)
        root = args.root if args.root is not None else Path(args.gnd).parent
        image_list = gnd_image_list(gnd, root=root, queries=args.queries)
        extra = {"gnd": {"dataset": gnd.dataset, "path": str(gnd.path), "sha256": gnd.sha256, "part": "queries" if args.queries else "database"}}
    else:
        image_list = read_image_list(args.images, root=args.root, id_rule=args.id_rule)
        extra = None
    whitening = resolve_whitening_arguments(args, args.weights)  # fails before any extraction
    model = create_model(args.model, args.weights)
    # with --whiten the raw descriptors go to OUT.unwhitened (resumable), the whitened ones to OUT
    raw_out = args.out if whitening is None else str(args.out).rstrip("/\\") + ".unwhitened"
    summary = extract_to_store(
        model,
        image_list,
        raw_out,
        options,
        weights=args.weights,
        queries=args.queries,
        extra_meta=extra,
        overwrite=args.overwrite,
    )
    if summary.stopped:
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary, raw_out))
        if whitening is not None:
            from cfcd.postprocess import whiten_store

            out = whiten_store(raw_out, args.out, whitening)
            print(f"{args.out}: whitened ({whitening.kind}, power {whitening.info.get('whitenp', '-')}, "
                  f"{whitening.input_dim} -> {out.dim}) from {raw_out}")
    return 0
