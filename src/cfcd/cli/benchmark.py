"""``cfcd benchmark``: one paper row. Extract the queries (cropped) and the database, evaluate, print.

GLDv2 (``--dataset gldv2_retrieval``, ``docs/gldv2.md``): the scored test images, whole, and the
index images; mAP@100 and mPrecision@100 for the Public, Private and all queries, as DELF.

Example::

    cfcd benchmark --model cfcd_r50 --weights cfcd_r50.safetensors --dataset roxford5k --root data/ \\
        [--distractors stores/r1m] [--out runs/bench/cfcd_r50-roxf]

prints, in the papers' format (mAP, Medium and Hard, with and without the 1M distractors)::

    | model    | ROxf-M | +1M   | ROxf-H | +1M   |
    | cfcd_r50 | 82.37  | 73.63 | 64.93  | 51.57 |

The stores go under ``--out`` (``queries/``, ``database/``) and are resumed when the command is
rerun; the full report (metrics, per query, protocol: dataset hash, query crop rule, scales, model
and weights hash, distractor count) is written to ``--out/benchmark.json``. The distractors are a
store made beforehand with ``cfcd extract`` (e.g. under ``torchrun``), with the same model and
settings: a mismatch is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfcd.cli.extract import (
    add_model_arguments,
    add_procedure_arguments,
    add_runtime_arguments,
    add_whitening_arguments,
)

SHORT_NAMES = {"roxford5k": "ROxf", "rparis6k": "RPar", "oxford5k": "Oxf", "paris6k": "Par", "gldv2_retrieval": "GLDv2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--dataset", required=True,
                   help="roxford5k, rparis6k (any ROOT/<name>/gnd_<name>.pkl works) or gldv2_retrieval")
    g.add_argument("--root", required=True,
                   help="data root: ROOT/<dataset>/gnd_<dataset>.pkl and ROOT/<dataset>/jpg/ (the layout of cfcd data download)")
    g.add_argument("--distractors", nargs="+", default=[], metavar="STORE", help="R1M distractor store(s) from cfcd extract")
    g.add_argument("--out", default=None, help="directory for the stores and benchmark.json (default runs/benchmark/<model>-<dataset>)")
    add_procedure_arguments(parser)
    add_whitening_arguments(parser)
    add_runtime_arguments(parser)


def format_row(model: str, dataset: str, plain, with_distractors) -> str:
    from cfcd.evaluation import format_percent

    short = SHORT_NAMES.get(dataset, dataset)

    def cell(result, setup: str) -> str:
        # the evaluation table's placeholder for a missing value, here too
        value = result.setups[setup].mAP if result is not None and setup in result.setups else float("nan")
        return format_percent(value).strip()

    head = ["model", f"{short}-M", "+1M", f"{short}-H", "+1M"]
    row = [model, cell(plain, "medium"), cell(with_distractors, "medium"), cell(plain, "hard"), cell(with_distractors, "hard")]
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", fmt(row)])


def format_dataset_row(model: str, dataset: str, result) -> str:
    """One row of a benchmark with its own metrics: every setup's first metric (GLDv2: mAP@100)."""
    from cfcd.evaluation import format_percent

    short = SHORT_NAMES.get(dataset, dataset)
    first = next(iter(result.setups.values())).metrics[0].name
    head = ["model"] + [f"{short} {name} {first}" for name in result.setups]
    row = [model] + [format_percent(s.values[first]).strip() for s in result.setups.values()]
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", fmt(row)])


def run(args) -> int:
    from cfcd.cli.extract import build_options, create_model, resolve_device, resolve_whitening_arguments
    from cfcd.data.datasets import DATASETS
    from cfcd.data.gnd import find_gnd, load_gnd
    from cfcd.evaluation.benchmark import run_benchmark
    from cfcd.utils.io import atomic_write_json

    dataset = DATASETS.get(args.dataset) if args.dataset in DATASETS else None  # a registered benchmark: its images, setups and metrics
    gnd = dataset.ground_truth(args.root) if dataset is not None else load_gnd(find_gnd(args.dataset, args.root),
                                                                                args.dataset)
    device = resolve_device(args.device)
    options = build_options(args, device=device)
    out = Path(args.out) if args.out else Path("runs") / "benchmark" / f"{args.model}-{gnd.dataset}"
    whitening = resolve_whitening_arguments(args, args.weights)
    model = create_model(args.model, args.weights)

    def say(part, summary):
        print(f"{part}: {len(summary.store.descriptors)} descriptors in {out / part}"
              + (f" ({summary.count} new, {summary.images_per_second:.1f} img/s)" if summary.count else " (already complete)"))

    result = run_benchmark(model, gnd, args.root, out, options, weights=args.weights,
                           distractors=args.distractors or (), whiten=whitening, overwrite=args.overwrite,
                           on_part=say, dataset=dataset)
    if result.stopped:
        return 3
    plain, with_distractors = result.plain, result.with_distractors
    report = {"model": args.model, "weights": args.weights, "dataset": gnd.dataset, **result.to_dict()}
    row = (format_row(args.model, gnd.dataset, plain, with_distractors) if "medium" in plain.setups
           else format_dataset_row(args.model, gnd.dataset, plain))
    report["row"] = row
    atomic_write_json(out / "benchmark.json", report)
    print()
    print(plain.table(gnd.dataset))
    if with_distractors is not None:
        print()
        print(with_distractors.table(f"{gnd.dataset}+{with_distractors.num_distractors // 1000}k distractors"))
    print()
    print(row)
    print(f"\nreport: {out / 'benchmark.json'}")
    return 0
