"""Shared test data for the index tests: clustered, L2-normalised descriptors (recall needs structure)."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int, clusters: int, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
