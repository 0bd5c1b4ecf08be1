"""Exact chunked search, FAISS indexes (flat, IVF-PQ, HNSW) and the index/search/store/whiten commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfcd.cli import main as cli
from cfcd.errors import CfcdError
from cfcd.store import open_store, write_store
from cfcd.index import build_index, exact_search, open_index, recall_at_k


def _clustered(n, d, clusters, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d) * 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    db = _clustered(6000, 32, 50, seed=0)
    q = _clustered(40, 32, 50, seed=0)[:40] + 0.0  # same centres: queries near database clusters
    rng = np.random.default_rng(1)
    q = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = [f"db/{i:05d}.jpg" for i in range(len(db))]
    return db, q, ids


def _reference_topk(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("db_chunk, query_chunk", [(65536, 1024), (777, 7), (1, 3)])
def test_exact_search_matches_full_sort(data, db_chunk, query_chunk):
    db, q, _ = data
    x = db[:1500] if db_chunk == 1 else db
    res = exact_search(q[:9] if db_chunk == 1 else q, x, 20, db_chunk=db_chunk, query_chunk=query_chunk, device="cpu")
    ref_s, ref_i = _reference_topk(q[:9] if db_chunk == 1 else q, x, 20)
    np.testing.assert_allclose(res.scores, ref_s, atol=1e-5)
    assert (res.indices == ref_i).mean() > 0.999  # ties aside
    assert np.all(np.diff(res.scores, axis=1) <= 1e-7)


def test_exact_search_accepts_a_tensor_database(data):
    import torch

    db, q, _ = data
    a = exact_search(q, db, 15, db_chunk=1000, device="cpu")
    b = exact_search(q, torch.from_numpy(db).half(), 15, db_chunk=1000, device="cpu")
    c = exact_search(q, db.astype(np.float16), 15, db_chunk=1000, device="cpu")
    np.testing.assert_array_equal(b.indices, c.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-3)


def test_exact_search_memmap_float16_k_clamp_and_exclude_self(tmp_path, data):
    db, q, ids = data
    write_store(tmp_path / "s", ids[:300], db[:300].astype(np.float16))
    mm = open_store(tmp_path / "s").descriptors
    res = exact_search(q, mm, 1000, db_chunk=64)
    assert res.indices.shape == (40, 300)
    ref_s, _ = _reference_topk(q, db[:300].astype(np.float16).astype(np.float32), 300)
    np.testing.assert_allclose(res.scores, ref_s, atol=1e-5)
    self_res = exact_search(db[:50], db[:300], 5, exclude_self=True, db_chunk=37, query_chunk=11)
    assert not np.any(self_res.indices == np.arange(50)[:, None])
    s = db[:50] @ db[:300].T
    s[np.arange(50), np.arange(50)] = -np.inf
    np.testing.assert_allclose(self_res.scores, -np.sort(-s, axis=1)[:, :5], atol=1e-6)
    with pytest.raises(CfcdError, match="queries are 16-D but the database is 32-D"):
        exact_search(np.ones((1, 16), np.float32), db, 5)


def test_exact_and_flat_agree_and_roundtrip(tmp_path, data):
    db, q, ids = data
    write_store(tmp_path / "db", ids, db, meta={"model": "cfcd_r50"})
    for kind in ("exact", "flat"):
        built = build_index(tmp_path / "db", kind, out=tmp_path / kind)
        again = open_index(tmp_path / kind)
        assert again.type == kind and len(again) == len(db) and again.ids == ids
        assert again.source["meta"]["model"] == "cfcd_r50"
        r1, r2 = built.search(q, 50), again.search(q, 50)
        np.testing.assert_array_equal(r1.indices, r2.indices)
    exact = open_index(tmp_path / "exact").search(q, 50)
    flat = open_index(tmp_path / "flat").search(q, 50)
    np.testing.assert_allclose(exact.scores, flat.scores, atol=1e-5)
    assert recall_at_k(flat.indices, exact.indices) > 0.999
    assert exact.ids[0][0] == ids[exact.indices[0, 0]]
    info = json.loads((tmp_path / "flat" / "index.json").read_text())
    assert info["type"] == "flat" and info["dim"] == 32 and info["count"] == len(db)
    # the exact index shares the store's data file (hard link) instead of a second copy
    rows = json.loads((tmp_path / "exact" / "index.json").read_text())["files"]["vectors"]
    assert (tmp_path / "exact" / rows[0]).stat().st_ino == (tmp_path / "db" / "descriptors.npy").stat().st_ino


def test_ivfpq_and_hnsw_recall_against_exact(tmp_path, data):
    db, q, ids = data
    exact = exact_search(q, db, 10)
    ivf = build_index(db, "ivfpq", ids=ids, nlist=32, m=8, nprobe=8, out=tmp_path / "ivf")
    r_ivf = recall_at_k(open_index(tmp_path / "ivf").search(q, 10).indices, exact.indices)
    assert r_ivf > 0.5, r_ivf
    more = recall_at_k(ivf.search(q, 10, nprobe=32).indices, exact.indices)
    assert more >= r_ivf
    # re-ranking the candidates with the exact rows (from the store, hard-linked) lifts recall
    write_store(tmp_path / "db", ids, db)
    build_index(tmp_path / "db", "ivfpq", nlist=32, m=8, nprobe=8, rerank=100, out=tmp_path / "ivfr")
    ivfr = open_index(tmp_path / "ivfr")
    assert ivfr.vectors is not None and ivfr.params["rerank"] == 100
    rr = ivfr.search(q, 10)
    assert recall_at_k(rr.indices, exact.indices) > max(r_ivf, 0.95)
    np.testing.assert_allclose(rr.scores, np.take_along_axis(q @ db.T, rr.indices, 1), atol=1e-5)
    assert recall_at_k(ivfr.search(q, 10, rerank=0).indices, exact.indices) == pytest.approx(r_ivf)
    with pytest.raises(CfcdError, match="re-ranking needs"):
        ivf.search(q, 10, rerank=50)
    hnsw = build_index(db, "hnsw", ids=ids, hnsw_m=16, out=tmp_path / "hnsw")
    assert recall_at_k(open_index(tmp_path / "hnsw").search(q, 10).indices, exact.indices) > 0.95
    params = json.loads((tmp_path / "ivf" / "index.json").read_text())["params"]
    assert params["search"] == {"nprobe": 8} and params["factory"] == "IVF32,PQ8x8"
    del hnsw


def test_ivfpq_tiny_store(data):
    db, _, _ = data
    with pytest.warns(UserWarning, match="nlist=1024 is too large"):
        idx = build_index(db[:1000], "ivfpq", nlist=1024, m=8)
    assert idx.params["nlist"] == 1000 // 39
    with pytest.raises(CfcdError, match="needs at least 256 training vectors"):
        build_index(db[:100], "ivfpq")
    with pytest.raises(CfcdError, match="divisible"):
        build_index(db, "ivfpq", m=5)


def test_index_errors(tmp_path, data):
    db, q, ids = data
    idx = build_index(db[:100], "flat", ids=ids[:100])
    with pytest.raises(CfcdError, match="queries are 16-D but the index holds 32-D"):
        idx.search(np.ones((2, 16), np.float32), 5)
    with pytest.raises(CfcdError, match="unknown index type"):
        build_index(db, "lsh")
    (tmp_path / "half").mkdir()
    with pytest.raises(CfcdError, match="not an index directory"):
        open_index(tmp_path / "half")
    build_index(db[:100], "flat", ids=ids[:100], out=tmp_path / "bad")
    (tmp_path / "bad" / "index-g0.faiss").write_bytes(b"\0" * 10)
    with pytest.raises(CfcdError, match="cannot read the FAISS index"):
        open_index(tmp_path / "bad")


def test_cli_index_search_store_whiten(tmp_path, data, capsys):
    db, q, ids = data
    write_store(tmp_path / "db", ids, db, meta={"model": "gem_r50"})
    write_store(tmp_path / "q", [f"q{i}" for i in range(len(q))], q, meta={"model": "gem_r50"})
    assert cli(["index", "build", str(tmp_path / "db"), "--out", str(tmp_path / "ix"), "--no-progress"]) == 0
    assert cli(["search", str(tmp_path / "ix"), "--queries", str(tmp_path / "q"), "--k", "7",
                "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["k"] == 7 and len(out["queries"]) == len(q) and out["queries"][0]["query"] == "q0"
    ref = exact_search(q, db, 7)
    assert [r["id"] for r in out["queries"][3]["results"]] == [ids[j] for j in ref.indices[3]]
    text = capsys.readouterr().out
    assert "q0" in text and ids[ref.indices[0, 0]] in text
    assert cli(["index", "info", str(tmp_path / "ix")]) == 0
    assert '"type": "flat"' in capsys.readouterr().out

    # a store is searchable directly (exact); a dimension mismatch is one clear error
    np.save(tmp_path / "q16.npy", np.ones((2, 16), np.float32))
    assert cli(["search", str(tmp_path / "db"), "--queries", str(tmp_path / "q16.npy")]) == 2
    assert "16-D but the index" in capsys.readouterr().err
    write_store(tmp_path / "qother", ["a"], q[:1], meta={"model": "dolg_r50"})
    assert cli(["search", str(tmp_path / "ix"), "--queries", str(tmp_path / "qother")]) == 2
    assert "'model'" in capsys.readouterr().err

    # store info / merge
    assert cli(["store", "info", str(tmp_path / "db"), "--validate"]) == 0
    assert "6000 x 32 float32" in capsys.readouterr().out
    assert cli(["store", "merge", str(tmp_path / "db"), str(tmp_path / "q"), "--out", str(tmp_path / "m")]) == 0
    assert len(open_store(tmp_path / "m")) == len(db) + len(q)

    # whiten: learn PCA, apply to both, search the whitened index
    assert cli(["whiten", "--store", str(tmp_path / "db"), "--out", str(tmp_path / "w.safetensors"),
                "--power", "0.25", "--dim", "16"]) == 0
    for name in ("db", "q"):
        assert cli(["whiten", "--apply", str(tmp_path / "w.safetensors"), "--store", str(tmp_path / name),
                    "--out", str(tmp_path / f"{name}_w")]) == 0
    wdb = open_store(tmp_path / "db_w")
    assert wdb.dim == 16 and wdb.meta["whitening"]["kind"] == "pca" and wdb.meta["model"] == "gem_r50"
    assert cli(["search", str(tmp_path / "db_w"), "--queries", str(tmp_path / "q")]) == 2  # unwhitened queries
    assert cli(["search", str(tmp_path / "db_w"), "--queries", str(tmp_path / "q_w"), "--k", "3"]) == 0
    assert cli(["whiten", "--apply", str(tmp_path / "w.safetensors"), "--store", str(tmp_path / "db_w"),
                "--out", str(tmp_path / "x")]) == 2

    # Lw from a pairs file of ids
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{ids[i]} {ids[i + 1]}\n" for i in range(0, 400, 2)))
    assert cli(["whiten", "--store", str(tmp_path / "db"), "--out", str(tmp_path / "lw"), "--kind", "lw",
                "--pairs", str(pairs)]) == 0
    # cirtorch's <set>-whiten.pkl (cids/qidxs/pidxs), read with the restricted unpickler
    import pickle

    with open(tmp_path / "whiten.pkl", "wb") as f:
        pickle.dump({"cids": ids[:400], "qidxs": list(range(0, 400, 2)), "pidxs": list(range(1, 400, 2))}, f)
    assert cli(["whiten", "--store", str(tmp_path / "db"), "--out", str(tmp_path / "lwp"), "--kind", "lw",
                "--pairs", str(tmp_path / "whiten.pkl")]) == 0
    from cfcd.postprocess import load_whitening

    a, b = load_whitening(tmp_path / "lw"), load_whitening(tmp_path / "lwp")
    np.testing.assert_allclose(a.transform(db[:50]), b.transform(db[:50]), atol=1e-5)
    pairs.write_text("nope db/00001.jpg\n")
    assert cli(["whiten", "--store", str(tmp_path / "db"), "--out", str(tmp_path / "lw2"), "--kind", "lw",
                "--pairs", str(pairs)]) == 2
    assert "not in the store: 'nope'" in capsys.readouterr().err


def test_exact_index_on_gpu_matches_cpu(data):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    db, q, ids = data
    index = build_index(db.astype(np.float16), "exact", ids=ids)
    cpu = index.search(q, 20, device="cpu")
    gpu = index.search(q, 20, device="cuda")
    assert index._device_cache[0].dtype == torch.float16  # uploaded once, half stays half
    np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-4)
    assert recall_at_k(gpu.indices, cpu.indices) > 0.99
