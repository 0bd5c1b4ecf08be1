"""``cfcd selfcheck``: a tiny generated revisitop benchmark, evaluated end to end in a few seconds.

It writes a ``gnd_selfcheck.pkl`` (easy/hard/junk lists, a query without easy positives, boxes),
query and database descriptor stores (ids shuffled, so they must be matched by id) and a plain
``.npy`` of distractors, with a planted structure: each landmark has a centre; its easy images
lie close to it, its hard images further, junk images in between, and duplicated rows create
exact score ties. Descriptors are small integers, so every score is exact in float32 and all
code paths must agree to the last bit.

Then it runs ``cfcd evaluate`` on those files (the same code path as the command), and checks:
the numbers equal revisitop's ``compute_map`` (``cfcd.evaluation.reference_compute_map`` on the
stable ``argsort(-X @ Q.T)``) per query and on average; the planted structure is found; and the
restricted ground-truth unpickler refuses a malicious pickle without running it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the generated benchmark into DIR and keep it (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated data (default 0)")
    parser.add_argument("--distractors", type=int, default=2000, help="number of distractor rows (default 2000)")


def make_benchmark(root: str | os.PathLike, *, seed: int = 0, num_distractors: int = 2000,
                   landmarks: int = 6, queries_per_landmark: int = 2, dim: int = 32) -> dict:
    """Write a tiny revisitop-style benchmark into ``root``; return its paths and arrays.

    Returns ``{"gnd": Path, "queries": Path, "database": Path, "distractors": Path,
    "Q": nq x D, "X": N x D, "D": M x D (float32, in qimlist/imlist order)}``.
    """
    import numpy as np

    from cfcd.store import write_store
    from cfcd.utils.io import atomic_open, atomic_save_npy

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    centres = rng.integers(-6, 7, size=(landmarks, dim))
    imlist: list[str] = []
    rows: list = []
    groups: list[dict[str, list[int]]] = []

    def add(name: str, vec) -> int:
        imlist.append(name)
        rows.append(np.asarray(vec, dtype=np.float32))
        return len(imlist) - 1

    for lm in range(landmarks):
        g: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for j in range(8):
            g["easy"].append(add(f"lm{lm}_easy_{j:02d}", centres[lm] + rng.integers(-1, 2, size=dim)))
        for j in range(6):
            g["hard"].append(add(f"lm{lm}_hard_{j:02d}", centres[lm] // 2 + rng.integers(-4, 5, size=dim)))
        for j in range(3):
            g["junk"].append(add(f"lm{lm}_junk_{j:02d}", centres[lm] // 3 + rng.integers(-3, 4, size=dim)))
        groups.append(g)
    for j in range(60):
        add(f"neg_{j:03d}", rng.integers(-6, 7, size=dim))
    # exact ties: duplicates of a few positives, hard images and negatives, as unrelated images
    for j, src in enumerate(rng.choice(len(rows), size=12, replace=False)):
        add(f"dup_{j:02d}", rows[int(src)])
    X = np.stack(rows)
    X[~np.any(X != 0, axis=1), 0] = 1  # no all-zero row

    qimlist, gnd, Q = [], [], []
    for lm in range(landmarks):
        for k in range(queries_per_landmark):
            qimlist.append(f"query_lm{lm}_{k}")
            Q.append(centres[lm] + rng.integers(-1, 2, size=dim))
            g = groups[lm]
            easy = [] if (lm, k) == (landmarks - 1, 1) else g["easy"]  # one query without easy positives
            hard = g["hard"] if easy else g["hard"] + g["easy"]
            gnd.append({"bbx": [float(k), 0.0, 100.5, 80.0], "easy": list(easy), "hard": sorted(hard),
                        "junk": list(g["junk"])})
    Q = np.stack(Q).astype(np.float32)
    Q[~np.any(Q != 0, axis=1), 0] = 1
    D = rng.integers(-6, 7, size=(num_distractors, dim)).astype(np.float32)
    D[~np.any(D != 0, axis=1), 0] = 1

    gnd_path = root / "gnd_selfcheck.pkl"
    with atomic_open(gnd_path, "wb") as handle:  # builtin types only, protocol 3, like revisitop's files
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=3)
    qperm = rng.permutation(len(qimlist))
    xperm = rng.permutation(len(imlist))
    meta = {"model": "selfcheck", "extract": {"scales": [1.0], "query_crop": "none (generated)"}}
    write_store(root / "queries", [qimlist[i] for i in qperm], Q[qperm], meta=meta)
    write_store(root / "database", [imlist[i] for i in xperm], X[xperm], meta=meta)
    atomic_save_npy(root / "distractors.npy", D)
    return {"gnd": gnd_path, "queries": root / "queries", "database": root / "database",
            "distractors": root / "distractors.npy", "Q": Q, "X": X, "D": D}


class _Boom:
    """A pickle payload whose unpickling would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _check_unsafe_pickle(root: Path) -> str | None:
    from cfcd.data.gnd import UnsafePickleError, safe_load_pickle

    marker = root / "pwned"
    evil = root / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Boom(marker)]}))
    try:
        safe_load_pickle(evil)
    except UnsafePickleError:
        pass
    else:
        return "the restricted unpickler accepted a pickle calling os.system"
    if marker.exists():
        return "the malicious pickle ran"
    return None


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from cfcd.cli import main as cli_main
    from cfcd.data.gnd import load_gnd
    from cfcd.evaluation import reference_compute_map, setup_gnd

    start = time.perf_counter()
    ties = 0
    with tempfile.TemporaryDirectory(prefix="cfcd-selfcheck-") as tmp:
        root = Path(args.keep) if args.keep is not None else Path(tmp)
        bench = make_benchmark(root, seed=args.seed, num_distractors=args.distractors)
        report = root / "report.json"
        kept = args.keep is not None
        print(f"selfcheck: generated benchmark in {root}" + ("" if kept else " (deleted at the end; --keep DIR keeps it)"))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = cli_main([
                "evaluate", "--gnd", str(bench["gnd"]), "--queries", str(bench["queries"]),
                "--database", str(bench["database"]), "--distractors", str(bench["distractors"]),
                "--json", str(report),
            ])
        # the report line names a file that is deleted with the temporary directory
        print(buffer.getvalue().replace(f"\nreport: {report}\n", "\n") if not kept else buffer.getvalue(), end="")
        problems: list[str] = []
        if code != 0:
            problems.append(f"cfcd evaluate exited with {code}")
        else:
            got = json.loads(report.read_text())
            gt = load_gnd(bench["gnd"])
            full = np.concatenate([bench["X"], bench["D"]])
            scores = full @ bench["Q"].T
            ranks = np.argsort(-scores, axis=0, kind="stable")
            ties = 0  # labelled images whose score equals another image's: the tie policy is exercised
            for i, entry in enumerate(gt.gnd):
                lab = np.unique(np.concatenate([entry[k] for k in ("easy", "hard", "junk")])).astype(int)
                _, counts = np.unique(scores[:, i], return_counts=True)
                values = np.unique(scores[:, i])
                ties += int(np.count_nonzero(counts[np.searchsorted(values, scores[lab, i])] > 1))
            if ties == 0:
                problems.append("the generated benchmark has no exact ties (it should)")
            for setup in ("easy", "medium", "hard"):
                m_ap, aps, m_p, prs = reference_compute_map(ranks, setup_gnd(gt, setup), [1, 5, 10])
                ref = [m_ap, *m_p]
                ours = [got[setup][k] / 100 for k in ("mAP", "mP@1", "mP@5", "mP@10")]
                if not np.allclose(ours, ref, rtol=0, atol=1e-9):
                    problems.append(f"{setup}: fast path {ours} != reference compute_map {ref}")
                per_q = np.array([np.nan if v[setup]["AP"] is None else v[setup]["AP"] / 100
                                  for v in got["per_query"].values()])
                if not np.allclose(per_q, aps, rtol=0, atol=1e-9, equal_nan=True):
                    problems.append(f"{setup}: per-query APs differ from the reference")
            if got["medium"]["mAP"] is None or got["medium"]["mAP"] < 50:
                problems.append(f"planted structure not found: medium mAP {got['medium']['mAP']}")
            if got["easy"]["mP@1"] != 100.0:
                problems.append(f"planted structure not found: easy mP@1 {got['easy']['mP@1']} (expected 100)")
        unsafe = _check_unsafe_pickle(root)
        if unsafe:
            problems.append(unsafe)
    seconds = time.perf_counter() - start
    print()
    if problems:
        for p in problems:
            print(f"selfcheck FAILED: {p}")
        return 1
    print(f"selfcheck OK ({seconds:.2f} s): fast evaluation == revisitop compute_map (per query, E/M/H, "
          f"mAP and mP@1/5/10; {args.distractors} distractors; {ties} labelled images in exact score ties); "
          "unsafe pickle refused")
    return 0
