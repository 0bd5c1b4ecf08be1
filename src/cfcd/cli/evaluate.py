"""``cfcd evaluate``: the exact revisitop evaluation of descriptor files (mAP, mP@k; Easy/Medium/Hard; +1M).

Example::

    cfcd evaluate --dataset roxford5k --root data/ \\
        --queries out/roxford5k-queries --database out/roxford5k-db \\
        [--distractors out/r1m] [--whiten lw.safetensors] [--qe 2 3] [--dba 2 3] [--json report.json]

Queries and database are descriptor stores (matched to the ground truth's ``qimlist``/``imlist``
by image id) or plain ``.npy`` matrices whose rows follow that order. Distractors (R1M) are
stores or ``.npy`` of the same dimension, streamed from disk. numpy BLAS only: torch is imported
only for query expansion / DBA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfcd.cli.extract import add_whitening_arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


EPILOG = """\
examples:
  cfcd evaluate --dataset roxford5k --root data -q q_store -x db_store --json roxford5k.json
  cfcd evaluate --gnd gnd_rparis6k.pkl -q q.npy -x x.npy --distractors r1m_store --qe 2 3
  cfcd evaluate --dataset gldv2_retrieval --root data -q OUT/queries -x OUT/database --json gldv2.json

Stores are matched to the ground truth by image id (qimlist / imlist); a plain .npy must have
one row per image in that order. The JSON report holds mAP and mP@k per setup (percent), every
query's AP and P@k, and a "protocol" block (ground-truth sha256, database and distractor counts,
query cropping, scales, whitening, query expansion) that says what the numbers depend on.
Equal scores are ranked by database index (lower first); numbers equal revisitop's compute_map.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    gt = parser.add_argument_group("ground truth")
    gt.add_argument("--dataset", default=None,
                    help="roxford5k, rparis6k (or oxford5k/paris6k, or any gnd_<name>.pkl), or gldv2_retrieval "
                         "(with --root: DELF's mAP@100 and mPrecision@100, Public/Private/all); "
                         "default: from the --gnd file name")
    src = gt.add_mutually_exclusive_group(required=True)
    src.add_argument("--gnd", type=Path, help="ground-truth pickle gnd_<dataset>.pkl")
    src.add_argument("--root", type=Path, help="data root holding <dataset>/gnd_<dataset>.pkl")
    d = parser.add_argument_group("descriptors (stores or .npy, one row per image)")
    d.add_argument("--queries", "-q", type=Path, required=True,
                   help="query descriptors (store matched by id, .npy in qimlist order, or .mat: variable Q, D x nq)")
    d.add_argument("--database", "-x", type=Path, required=True,
                   help="database descriptors (store matched by id, .npy in imlist order, or .mat: variable X, D x n)")
    d.add_argument("--distractors", type=Path, nargs="+", default=[], metavar="PATH",
                   help="distractor descriptors (e.g. R1M; several shards allowed), appended as negatives")
    p = parser.add_argument_group("post-processing")
    add_whitening_arguments(p, group=None, beside="the weights the queries were extracted with")  # applied to all
    p.add_argument("--qe", nargs=2, type=float, metavar=("K", "ALPHA"), default=None, help="alpha query expansion")
    p.add_argument("--dba", nargs=2, type=float, metavar=("K", "ALPHA"), default=None, help="database augmentation")
    o = parser.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the JSON report here (atomic)")
    o.add_argument("--kappas", type=_positive_int, nargs="+", default=[1, 5, 10], help="k of mP@k (default 1 5 10)")
    o.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="metrics to report instead: mAP, mP@k, mAP@k (GLDv2 retrieval: mAP@100); "
                        "default: the dataset's, else mAP and mP@k for --kappas")
    o.add_argument("--per-query", action="store_true", help="also print every query's AP (Easy/Medium/Hard)")
    o.add_argument("--threads", type=_positive_int, default=None, help="worker threads (default: all cores)")
    o.add_argument("--chunk-rows", type=_positive_int, default=None, help="database rows scored at a time")


def _whitening(args):
    from cfcd.cli.extract import resolve_whitening_arguments

    weights = None
    if args.whiten is not None and not Path(args.whiten).suffix:
        from cfcd.store import is_store, open_store

        if is_store(args.queries):  # a NAME is looked up beside the weights the stores came from
            weights = open_store(args.queries).meta.get("weights")
    return resolve_whitening_arguments(args, weights)


def _check_qe(value, flag: str):
    from cfcd.errors import InputError

    if value is None:
        return None
    k, alpha = value
    if k < 0 or k != int(k) or alpha < 0:
        raise InputError(f"{flag}: K must be a non-negative integer and ALPHA non-negative, got {k:g} {alpha:g}")
    return int(k), float(alpha)


def run(args: argparse.Namespace) -> int:
    from cfcd.data.datasets import DATASETS
    from cfcd.data.gnd import find_gnd, load_gnd
    from cfcd.errors import InputError
    from cfcd.evaluation import evaluate_files
    from cfcd.utils.io import atomic_write_json

    if args.gnd is None and not args.dataset:
        raise InputError("--root needs --dataset (e.g. --dataset roxford5k)")
    dataset = DATASETS.get(args.dataset) if args.gnd is None and args.dataset in DATASETS else None
    if dataset is not None:  # a registered benchmark reads its own ground truth
        gnd = dataset.ground_truth(args.root)
    else:
        gnd = load_gnd(args.gnd if args.gnd is not None else find_gnd(args.dataset, args.root), args.dataset)
    if args.threads:
        _limit_blas_threads(args.threads)
    result, protocol = evaluate_files(
        gnd=gnd,
        queries=args.queries,
        database=args.database,
        distractors=args.distractors,
        whiten=_whitening(args),
        qe=_check_qe(args.qe, "--qe"),
        dba=_check_qe(args.dba, "--dba"),
        setups=dataset.setups if dataset is not None else None,
        kappas=args.kappas,
        metrics=args.metrics or (dataset.metrics if dataset is not None else None),
        chunk_rows=args.chunk_rows,
        num_threads=args.threads,
    )
    print(result.table(gnd.dataset))
    if args.per_query:
        print()
        print(_per_query_table(result))
    if args.json is not None:
        atomic_write_json(args.json, result.to_dict(protocol))
        print(f"\nreport: {args.json}")
    return 0


def _per_query_table(result) -> str:
    names = list(result.setups)
    ids = result.query_ids or [str(i) for i in range(result.num_queries)]
    width = max(len("query"), *(len(i) for i in ids))
    first = {n: result.setups[n].metrics[0] for n in names}  # AP unless --metrics says otherwise
    cols = {n: max(12, len(first[n].query_name) + len(n) + 2) for n in names}
    lines = [f"{'query':<{width}}" + "".join(f"{first[n].query_name + ' ' + n:>{cols[n]}}" for n in names)]
    for q, qid in enumerate(ids):
        cells = []
        for n in names:
            ap = result.setups[n].per_query[first[n].name][q]
            cells.append(f"{'-':>{cols[n]}}" if ap != ap else f"{ap * 100:>{cols[n]}.2f}")
        lines.append(f"{qid:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _limit_blas_threads(n: int) -> None:
    """Cap OpenBLAS/MKL threads if threadpoolctl is around (numpy reads the env only at import)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n)
