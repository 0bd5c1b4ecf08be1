"""Helpers for the evaluation tests (ground truth, descriptors, the CLI)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from cfcd.cli import main as cli_main


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_gnd(path: Path, imlist, qimlist, gnd, protocol: int = 3) -> Path:
    path.write_bytes(pickle.dumps({"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd}, protocol=protocol))
    return path


def tiny_gnd(tmp_path: Path, n_db: int = 40, name: str = "gnd_tiny.pkl") -> Path:
    """4 queries over ``n_db`` images; query 3 has no easy positives."""
    imlist = [f"img{i:03d}" for i in range(n_db)]
    gnd = [
        {"bbx": [0, 0, 10, 10], "easy": [0, 1, 2], "hard": [3, 4], "junk": [5]},
        {"bbx": [1.5, 2, 30, 40.5], "easy": [6, 7], "hard": [8], "junk": [9, 10]},
        {"bbx": [0, 0, 5, 5], "easy": [11], "hard": [12, 13, 14], "junk": []},
        {"bbx": [0, 0, 5, 5], "easy": [], "hard": [15, 16], "junk": [17]},
    ]
    return write_gnd(tmp_path / name, imlist, [f"q{i}" for i in range(4)], gnd)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def reference_setups(gt, ranks, kappas=(1, 5, 10)) -> dict:
    from cfcd.evaluation import reference_compute_map, setup_gnd

    return {s: reference_compute_map(ranks, setup_gnd(gt, s), list(kappas)) for s in ("easy", "medium", "hard")}
