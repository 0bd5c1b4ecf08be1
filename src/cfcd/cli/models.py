"""``cfcd models``: every registered model with its family, output dimension and input convention;
``--formats``: every checkpoint layout that ``--weights``/``cfcd convert`` read."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--formats", action="store_true",
                        help="list the checkpoint formats instead (detection order, aliases, what each reads)")


def _formats(as_json: bool) -> int:
    from cfcd.models.checkpoints import checkpoint_formats

    rows = [{"name": f.name, "aliases": list(f.aliases), "priority": f.priority, "description": f.description}
            for f in checkpoint_formats().values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print("checkpoint formats, in auto-detection order (force one with --format NAME):")
    for r in rows:
        alias = f" (also: {', '.join(r['aliases'])})" if r["aliases"] else ""
        print(f"  {r['name']}{alias}\n    {r['description']}")
    return 0


def _input(row: dict) -> str:
    if row.get("dim") is None:
        return "-"
    mean = "/".join(f"{v:g}" for v in row["mean"])
    std = "/".join(f"{v:g}" for v in row["std"])
    size = f", native {row['input_size']}px" if row.get("input_size") else ""
    return f"{row['channel_order']} mean {mean} std {std}{size}"


def run(args) -> int:
    from cfcd.models.registry import DEFAULT_MODEL, describe_models

    if getattr(args, "formats", False):
        return _formats(args.json)
    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("model", "family", "dim", "weights", "input")
    table = [(r["name"] + (" (default)" if r["name"] == DEFAULT_MODEL else ""), r["family"],
              "-" if r.get("dim") is None else str(r["dim"]), "embedded" if r["embedded_weights"] else "--weights",
              _input(r)) for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head))
    for row, cells in zip(rows, table):
        print(line(cells))
        print(f"    {row['description']}")
    print("\nAlso gem_<any timm model name> (GeM on that backbone). Models marked --weights need a checkpoint "
          "(--weights FILE, see 'cfcd convert') or an explicit --weights random.")
    return 0
