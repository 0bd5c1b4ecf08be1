"""Ground truth to protocol setups: which images are positives and junk for Easy, Medium and Hard."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cfcd.errors import InputError

# setup -> (keys joined into the positives, keys joined into the junk), in revisitop's order
SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
CLASSIC_SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"classic": (("ok",), ("junk",))}
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
TIE_POLICY = "equal scores: lower database index first (stable argsort of -score); distractors after the database"


def _entries(gnd: Any) -> list[Mapping]:
    """The per-query dicts of a :class:`cfcd.data.gnd.GroundTruth` or of a plain list."""
    entries = getattr(gnd, "gnd", gnd)
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"expected a GroundTruth or a list of per-query dicts, got {type(gnd).__name__}")
    return list(entries)


def protocol_setups(gnd: Any) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """:data:`SETUPS` for revisitop ground truth (easy/hard/junk), :data:`CLASSIC_SETUPS` for ok/junk."""
    entries = _entries(gnd)
    if entries and "easy" in entries[0]:
        return dict(SETUPS)
    if entries and "ok" in entries[0]:
        return dict(CLASSIC_SETUPS)
    raise InputError("ground truth: per-query dicts need 'easy'/'hard'/'junk' (revisited) or 'ok'/'junk' (classic)")


def _join(entry: Mapping, keys: Sequence[str]) -> np.ndarray:
    parts = [np.asarray(entry.get(k, []), dtype=np.int64).reshape(-1) for k in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def setup_gnd(gnd: Any, setup: str) -> list[dict[str, np.ndarray]]:
    """``[{"ok": ..., "junk": ...}]`` per query for one setup, exactly as revisitop's example builds it."""
    setups = {**SETUPS, **CLASSIC_SETUPS}
    if setup not in setups:
        raise ValueError(f"unknown setup {setup!r}; choose from {', '.join(setups)}")
    ok_keys, junk_keys = setups[setup]
    return [{"ok": _join(e, ok_keys), "junk": _join(e, junk_keys)} for e in _entries(gnd)]


def labelled_indices(gnd: Any, setups: Mapping[str, tuple] | None = None) -> list[np.ndarray]:
    """Per query, the sorted unique database indices that any setup labels (positive or junk)."""
    setups = protocol_setups(gnd) if setups is None else setups
    keys = sorted({k for ok, junk in setups.values() for k in (*ok, *junk)})
    return [np.unique(_join(e, keys)) for e in _entries(gnd)]


# --------------------------------------------------------------------------- metrics from positions
