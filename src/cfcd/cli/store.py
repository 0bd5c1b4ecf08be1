"""``cfcd store``: inspect, finalise and merge descriptor stores (format: docs/store-format.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{info,merge,finalize}", required=True)
    info = sub.add_parser("info", help="print the size, dtype, provenance and failures of a store")
    info.add_argument("store", type=Path, help="store directory (complete or still being written) or .npy")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.add_argument("--failures", type=int, default=5, metavar="N", help="list the first N failures (5)")
    info.add_argument("--validate", action="store_true",
                      help="also read every row and check it is finite and non-zero")

    merge = sub.add_parser("merge", help="concatenate stores (e.g. database + R1M distractors)")
    merge.add_argument("stores", type=Path, nargs="+", help="input stores, in output order")
    merge.add_argument("--out", type=Path, required=True, help="output store directory (new)")

    fin = sub.add_parser("finalize", help="finalise the shards of a job by hand (normally done by the job)")
    fin.add_argument("store", type=Path)
    fin.add_argument("--order", type=Path, default=None,
                     help="text file with the expected image ids, one per line (fixes the row order and "
                          "checks that nothing is missing)")


def run(args: argparse.Namespace) -> int:
    return {"info": _info, "merge": _merge, "finalize": _finalize}[args.action](args)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _info(args) -> int:
    from cfcd.store import load_descriptors, open_store, store_summary

    summary = store_summary(args.store)
    failures = []
    if summary.get("complete"):
        store = open_store(args.store)
        failures = store.meta.get("failures", [])
        if args.validate:
            load_descriptors(args.store, dtype=None)  # raises a CfcdError naming the bad rows
            summary["validated"] = True
    if args.json:
        summary["failures_list"] = failures[: args.failures]
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"store:          {summary['path']}")
    if not summary.get("complete") and summary.get("failed"):
        print("status:         FAILED (every image failed; a rerun retries them all: fix the inputs first)")
        for f in summary.get("first_failures", []):
            print(f"  {f.get('id')}: {f.get('reason')}")
        print(f"failures:       {summary['failures']}")
        return 1
    if not summary.get("complete"):
        print("status:         INCOMPLETE (job running or killed; rerun it to resume)")
        print(f"written:        {summary['rows_written']} rows in {summary['shards']} shards, parts: "
              f"{', '.join(summary['parts']) or '-'}")
        print(f"failures:       {summary['failures']}")
        return 0
    print(f"rows:           {summary['count']} x {summary['dim']} {summary['dtype']} ({_fmt_bytes(summary['bytes'])})")
    meta = summary.get("meta", {})
    for key in ("model", "weights_sha256", "preprocess", "scales", "query_crop", "whitening",
                "created", "cfcd_version", "merged_from"):
        if key in meta:
            value = meta[key]
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"{key + ':':<16}{text}")
    if summary.get("first_ids"):
        print(f"ids:            {', '.join(summary['first_ids'])}{', ...' if summary['count'] > 3 else ''}")
    print(f"failures:       {summary['failures']}")
    for f in failures[: args.failures]:
        print(f"  {f.get('id')}: {f.get('reason')}")
    if summary.get("pending_shards"):
        print(f"pending:        {summary['pending_shards']} shards not yet merged (rerun the job or 'cfcd store finalize')")
    if args.validate:
        print("validate:       OK (all rows finite and non-zero)")
    return 0


def _merge(args) -> int:
    from cfcd.store import merge_stores

    out = merge_stores(args.stores, args.out)
    print(f"merged {len(args.stores)} stores -> {out.path}: {len(out)} x {out.dim} {out.descriptors.dtype.name}")
    return 0


def _finalize(args) -> int:
    from cfcd.errors import InputError
    from cfcd.store import finalize_store

    order = None
    if args.order is not None:
        if not args.order.is_file():
            raise InputError(f"{args.order}: image id list not found")
        order = [line.strip() for line in args.order.read_text(encoding="utf-8").splitlines() if line.strip()]
    store = finalize_store(args.store, order=order)
    print(f"finalized {store.path}: {len(store)} x {store.dim} {store.descriptors.dtype.name}, "
          f"{len(store.meta.get('failures', []))} failures")
    return 0
