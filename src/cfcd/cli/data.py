"""``cfcd data``: download, verify and locate the benchmark datasets.

Usage::

    cfcd data download roxford5k rparis6k --root data/datasets
    cfcd data download revisitop1m --root data/datasets --base-url http://mirror.example.org
    cfcd data download gldv2_train --root data/datasets --parts 0-9,42 --workers 4   # a subset of the 500 tars
    cfcd data download gldv2_retrieval --root data/datasets --workers 8
    cfcd data verify data/datasets [--dataset roxford5k] [--decode] [--checksums] [--json report.json]
    cfcd data layout --root data/datasets
    cfcd data manifest --root data/datasets --out manifest.json    # sizes/sha256 of a finished download

Exit status: 0 on success, 1 when ``verify`` finds something required missing or broken,
2 on a usage or input error (bad manifest, failed download, corrupt archive).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DATASET_NAMES = ("roxford5k", "rparis6k", "revisitop1m", "gldv2_train", "gldv2_retrieval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{download,verify,layout,manifest}", required=True)

    p = sub.add_parser("download", help="download (or complete) datasets into ROOT/<dataset>/",
                       description="Download datasets with resume, retries and checks; safe to rerun.")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help=f"one or more of {', '.join(DATASET_NAMES)}, or 'all'")
    p.add_argument("--root", required=True, type=Path, help="data root (ROOT/<dataset>/jpg/, ROOT/<dataset>/gnd_<dataset>.pkl)")
    p.add_argument("--base-url", default=None,
                   help="mirror that replaces the scheme and host of every official URL (GLDv2: the official base "
                        "https://s3.amazonaws.com/google-landmark) (default: $CFCD_DATA_MIRROR)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="JSON {file name: {size, sha256}} of expected values (null = unknown)")
    p.add_argument("--keep-archives", action="store_true", help="keep the tarballs after extraction")
    p.add_argument("--parts", action="append", default=None, metavar="SPEC",
                   help="GLDv2: the tars to download, e.g. 0-9,42 (every split) or index:0-9 (one split); "
                        "repeatable; default all")
    p.add_argument("--workers", type=int, default=1, help="GLDv2: tars downloaded at once (default 1)")
    p.add_argument("--force", action="store_true",
                   help="GLDv2: start even when the size to download does not fit the free disk")
    p.add_argument("--retries", type=int, default=5, help="retries of a failing download (default 5)")
    p.add_argument("--backoff", type=float, default=2.0, help="base of the exponential retry delay in seconds")
    p.add_argument("--timeout", type=float, default=60.0, help="network read timeout in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("verify", help="check a data root against the ground truth and the download record",
                       description="Check images named in the gnd, unreadable files, distractor counts.")
    p.add_argument("dir", type=Path, metavar="DIR", help="data root (or one dataset's directory)")
    p.add_argument("--dataset", action="append", choices=DATASET_NAMES, default=None,
                   help="dataset(s) to check (default: every dataset directory found under DIR)")
    p.add_argument("--no-images", action="store_true", help="do not open the images (names and sizes only)")
    p.add_argument("--decode", action="store_true", help="decode every image fully (slow; catches truncated JPEGs)")
    p.add_argument("--checksums", action="store_true", help="re-hash every extracted file against the download record")
    p.add_argument("--strict", action="store_true", help="R1M: listed-but-missing or unreadable distractors are errors")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads for image checks")
    p.add_argument("--examples", type=int, default=10, help="how many example names to print per problem")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("layout", help="print where every file is expected and what is there")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--dataset", action="append", choices=DATASET_NAMES, default=None)

    p = sub.add_parser("manifest", help="write the size/sha256 recorded by a finished download as a manifest")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    return {"download": _download, "verify": _verify, "layout": _layout, "manifest": _manifest}[args.action](args)


def _download(args) -> int:
    from cfcd.data.datasets import download_dataset, list_datasets, load_manifest
    from cfcd.errors import InputError

    names: list[str] = []
    for name in args.datasets:
        for item in (list_datasets() if name == "all" else [name.lower()]):
            if item not in list_datasets():
                raise InputError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}, all")
            if item not in names:
                names.append(item)
    if args.retries < 0:
        raise InputError("--retries must be >= 0")
    if args.workers < 1:
        raise InputError("--workers must be >= 1")
    manifest = load_manifest(args.manifest) if args.manifest else None
    for name in names:
        summary = download_dataset(
            name, args.root, base_url=args.base_url, manifest=manifest, keep_archives=args.keep_archives,
            retries=args.retries, backoff=args.backoff, timeout=args.timeout, progress=not args.no_progress,
            log=print, parts=args.parts, workers=args.workers, force=args.force,
        )
        text = f"{name}: {len(summary.downloaded)} downloaded, {len(summary.skipped)} already there"
        if summary.extracted_files:
            text += f", {summary.extracted_files} files extracted"
        if summary.clashes:
            shown = ", ".join(f"{c['member']} -> {c['path']}" for c in summary.clashes[:5])
            text += f"; {len(summary.clashes)} name clashes renamed ({shown})"
        print(text)
    return 0


def _verify_targets(root: Path, requested: list[str] | None) -> tuple[Path, list[str]]:
    """(data root, datasets): DIR may be the root or one dataset's own directory."""
    from cfcd.errors import InputError

    if root.name in DATASET_NAMES and not any((root / n).is_dir() for n in DATASET_NAMES):
        return root.parent, list(dict.fromkeys(requested or [root.name]))
    if requested:
        return root, list(dict.fromkeys(requested))
    found = [n for n in DATASET_NAMES if (root / n).is_dir()]
    if not found:
        raise InputError(f"{root}: no dataset directory ({', '.join(DATASET_NAMES)}) found; "
                         f"run 'cfcd data download <dataset> --root {root}' or pass --dataset")
    return root, found


def _verify(args) -> int:
    from cfcd.data.datasets import verify_dataset
    from cfcd.utils.io import atomic_write_json

    root, names = _verify_targets(args.dir, args.dataset)
    reports = []
    for name in names:
        report = verify_dataset(
            name, root, check_images=not args.no_images, decode=args.decode, checksums=args.checksums,
            strict=args.strict, workers=args.workers, examples=args.examples, progress=not args.no_progress,
        )
        print(report.summary())
        reports.append(report)
    ok = all(r.ok for r in reports)
    if args.json:
        atomic_write_json(args.json, {"ok": ok, "root": str(root), "datasets": [r.to_dict() for r in reports]})
    print("verify: OK" if ok else "verify: FAILED")
    return 0 if ok else 1


def _layout(args) -> int:
    from cfcd.data.datasets import layout_report

    print(layout_report(args.root, args.dataset))
    return 0


def _manifest(args) -> int:
    from cfcd.data.datasets import manifest_from_download
    from cfcd.errors import InputError
    from cfcd.utils.io import atomic_write_json

    manifest = manifest_from_download(args.root)
    if not manifest:
        raise InputError(f"{args.root}: no download record (.cfcd-download.json) found under it")
    atomic_write_json(args.out, manifest)
    print(f"wrote {len(manifest)} entries to {args.out}")
    return 0
