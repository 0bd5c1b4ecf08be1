"""``cfcd whiten``: learn PCA whitening (dirtorch whitenp) or supervised Lw (cirtorch), or apply one.

Learn:  cfcd whiten --store DB --out pca.safetensors [--kind pca] [--power 0.5] [--dim D]
        cfcd whiten --store TRAIN --out lw.safetensors --kind lw --pairs PAIRS.txt [--dim D]
Apply:  cfcd whiten --apply pca.safetensors --store DB --out DB_WHITENED
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="descriptor store (or .npy) to learn on / apply to")
    parser.add_argument("--out", type=Path, required=True,
                        help="learn: whitening file (NAME.safetensors + NAME.json); apply: output store directory")
    parser.add_argument("--kind", choices=("pca", "lw"), default="pca",
                        help="pca: unsupervised PCA whitening with eigenvalue power; lw: cirtorch learned "
                             "whitening from matching pairs (default pca)")
    parser.add_argument("--power", type=float, default=0.5, metavar="P",
                        help="PCA eigenvalue power whitenp: 0.5 full whitening, 0.25 dirtorch's README "
                             "setting, 0 plain PCA (default 0.5)")
    parser.add_argument("--dim", type=int, default=None, help="output dimension (default: all components)")
    parser.add_argument("--pairs", type=Path, default=None,
                        help="lw: matching pairs, a text file 'QUERY_ID POSITIVE_ID' per line (ids of the "
                             "store), or cirtorch's <set>-whiten.pkl (cids/qidxs/pidxs)")
    parser.add_argument("--apply", type=Path, default=None, metavar="WHITENING",
                        help="apply this whitening file to --store and write the whitened store to --out")


def run(args: argparse.Namespace) -> int:
    return _apply(args) if args.apply is not None else _learn(args)


def _read_pairs(path: Path, ids: list[str] | None) -> tuple[list[int], list[int]]:
    from cfcd.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: pairs file not found")
    if ids is None:
        raise InputError("learned whitening needs a store with image ids (a plain .npy has none)")
    row = {image_id: i for i, image_id in enumerate(ids)}
    pairs: list[tuple[str, str]] = []
    if path.suffix == ".pkl":
        from cfcd.data.gnd import safe_load_pickle

        data = safe_load_pickle(path)
        try:
            cids, qidxs, pidxs = list(data["cids"]), list(data["qidxs"]), list(data["pidxs"])
        except (KeyError, TypeError):
            raise InputError(f"{path}: expected a dict with keys cids, qidxs, pidxs (cirtorch whiten.pkl)") from None
        if len(qidxs) != len(pidxs):
            raise InputError(f"{path}: qidxs and pidxs have different lengths")
        try:
            pairs = [(str(cids[int(q)]), str(cids[int(p)])) for q, p in zip(qidxs, pidxs)]
        except (IndexError, ValueError):
            raise InputError(f"{path}: qidxs/pidxs index outside cids") from None
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise InputError(f"{path}:{n}: expected 'QUERY_ID POSITIVE_ID', got {line!r}")
            pairs.append((fields[0], fields[1]))
    if not pairs:
        raise InputError(f"{path}: no pairs")
    missing = sorted({i for pair in pairs for i in pair if i not in row})
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise InputError(f"{path}: {len(missing)} ids of the pairs are not in the store: {shown}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return [row[q] for q, _ in pairs], [row[p] for _, p in pairs]


def _learn(args) -> int:
    from cfcd.errors import InputError
    from cfcd.store import StoreMeta, load_descriptors
    from cfcd.postprocess import DegenerateWhiteningWarning, learn_lw, learn_pca_whitening
    from cfcd.utils.io import sha256_file

    store = load_descriptors(args.store, role="whitening training descriptors", dtype=None)
    if args.kind == "pca":
        if args.pairs is not None:
            raise InputError("--pairs is only used with --kind lw")
        w = learn_pca_whitening(store.descriptors, whitenp=args.power, dim=args.dim)
    else:
        if args.pairs is None:
            raise InputError("--kind lw needs --pairs (matching image pairs)")
        q, p = _read_pairs(args.pairs, store.ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateWhiteningWarning)
            w = learn_lw(store.descriptors, q, p, dim=args.dim)
        for warning in caught:
            print(f"cfcd whiten: warning: {warning.message}", file=sys.stderr)
    data_file = store.path / "descriptors.npy" if store.path.is_dir() else store.path
    meta = StoreMeta.of(store)
    w.info["fitted_on"] = {
        "path": str(store.path),
        "count": len(store),
        "dim": store.dim,
        "descriptors_sha256": sha256_file(data_file),
        "model": meta.model,
        "weights_sha256": meta.weights_sha256,
        "state_sha256": meta.state_sha256,
    }
    if args.pairs is not None:
        w.info["pairs_file"] = str(args.pairs)
    out = w.save(args.out)
    extra = f", whitenp {args.power}" if args.kind == "pca" else f", {w.info['pairs']} pairs"
    print(f"learned {args.kind} whitening on {len(store)} x {store.dim} descriptors{extra}: "
          f"{w.input_dim} -> {w.dim} dims, saved to {out} (+ {out.with_suffix('.json').name})")
    return 0


def _apply(args) -> int:
    from cfcd.postprocess import load_whitening, whiten_store

    w = load_whitening(args.apply)
    out = whiten_store(args.store, args.out, w)
    print(f"whitened {len(out)} descriptors ({w.kind}, {w.input_dim} -> {out.dim}) -> {out.path}")
    return 0
