"""Budgeted, shard-by-shard, on-disk FAISS indexes that grow and shrink (cfcd.index build/grow, cfcd index)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfcd.cli import main as cli
from cfcd.errors import CfcdError
from cfcd.index import IdTable, add, build, choose_index, exact_search, open_index, parse_size, remove
from cfcd.index import train as train_mod
from cfcd.index.generations import referenced
from cfcd.index.rows import RowReader
from cfcd.index.tune import exact_topk
from cfcd.store import write_store

from _index_helpers import clustered  # noqa: E402


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    x = clustered(7000, 16, 40)
    ids = [f"photos/{i:05d} é.jpg" for i in range(len(x))]  # ids are strings, spaces and non-ASCII welcome
    write_store(root / "db", ids[:6000], x[:6000], meta={"model": "gem_r50"})
    write_store(root / "new", ids[6000:], x[6000:], meta={"model": "gem_r50"})
    write_store(root / "other", ["o1", "o2"], x[:2], meta={"model": "dolg_r50"})
    return root, x, ids


def _lists(index):
    """Every (list, id, code) of an IVF index, sorted: equal when the codes are the same."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index if hasattr(index, "index") else index)
    inv = ivf.invlists
    out = []
    for li in range(ivf.nlist):
        n = inv.list_size(li)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(li), n).copy()
        codes = faiss.rev_swig_ptr(inv.get_codes(li), n * ivf.code_size).copy().reshape(n, -1)
        order = np.argsort(ids)
        out.append((li, ids[order], codes[order]))
    return out


def test_sizes_and_the_budgeted_choice():
    assert parse_size("4GB") == 4 << 30 and parse_size("512 MiB") == 512 << 20
    assert parse_size(1234) == 1234
    with pytest.raises(CfcdError, match="cannot read the size"):
        parse_size("lots")
    assert choose_index(1000, 512, max_memory="4GB")["factory"] == "Flat"
    big = choose_index(5_000_000, 512, max_memory="4GB")
    assert big["kind"] == "ivf-pq" and big["factory"].startswith("IVF8192_HNSW32,PQ")
    assert 3 * big["bytes"] <= 4 << 30
    assert choose_index(100_000_000, 512, max_memory="8GB")["kind"] == "opq-ivf-pq"
    assert choose_index(1_000_000, 128, max_memory="1GB")["kind"] == "hnsw"
    with pytest.raises(CfcdError, match="no index of"):
        choose_index(100_000_000, 512, max_memory="1GB")


def test_auto_picks_flat_for_a_tiny_set_and_ivf_under_a_small_budget(coll, tmp_path):
    root, x, ids = coll
    write_store(tmp_path / "tiny", ids[:300], x[:300], meta={"model": "gem_r50"})
    tiny = build(tmp_path / "tiny", tmp_path / "ix_tiny", max_memory="4GB", workers=0, tune_queries=0)
    assert tiny.params["kind"] == "flat" and tiny.type == "faiss"
    ref = exact_search(x[:5], x[:300], 10)
    got = tiny.search(x[:5], 10)
    np.testing.assert_array_equal(got.indices, ref.indices)
    assert got.ids[0][0] == ids[0]

    ivf = build(root / "db", tmp_path / "ix", max_memory="700KB", max_query_ms=0.01, workers=0, tune_queries=100, shard_rows=2500)
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert ivf.params["kind"].startswith("ivf") and ivf.params["ondisk"] and info["build"]["shards"] == 3
    t = info["tuning"]
    assert t["queries"] == 100 and set(t["chosen"]) >= {"search", "recall@10", "recall@100", "ms_per_query"}
    assert ivf.params["search"] == t["chosen"]["search"]
    recalls = [p["recall@10"] for p in t["curve"]]
    assert all(0 <= r <= 1 for r in recalls) and recalls[-1] >= recalls[0]
    # the searching process maps the lists: FAISS's OnDiskInvertedLists, not an in-memory copy
    import faiss

    lists = faiss.extract_index_ivf(ivf.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert isinstance(ivf.ids, IdTable) and ivf.ids[5999] == ids[5999] and len(ivf.ids) == 6000


def test_sharded_ondisk_build_equals_a_one_shot_in_memory_build(coll, tmp_path):
    import faiss

    root, x, ids = coll
    factory = "IVF32,SQ8"
    sharded = build(root / "db", tmp_path / "sharded", factory=factory, shard_rows=1700, workers=2,
                           tune_queries=0)
    assert json.loads((tmp_path / "sharded" / "index.json").read_text())["build"]["shards"] == 4
    files = json.loads((tmp_path / "sharded" / "index.json").read_text())["files"]
    trained = faiss.read_index(str(tmp_path / "sharded" / files["trained"]))
    trained.add_with_ids(x[:6000], np.arange(6000, dtype=np.int64))  # one shot, in memory, same training
    a, b = _lists(sharded), _lists(trained)
    assert len(a) == len(b) and sum(len(i) for _, i, _ in a) == 6000
    for (la, ia, ca), (lb, ib, cb) in zip(a, b):
        assert la == lb
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ca, cb)
    faiss.extract_index_ivf(trained).nprobe = 8
    _, ref = trained.search(x[6000:6050], 20)
    got = sharded.search(x[6000:6050], 20, nprobe=8)
    np.testing.assert_array_equal(got.indices, ref)
    # the same shards merged in memory instead of on disk: the same index
    mem = build(root / "db", tmp_path / "mem", factory=factory, shard_rows=1700, workers=0, ondisk=False,
                       tune_queries=0)
    assert not mem.params["ondisk"]
    np.testing.assert_array_equal(mem.search(x[6000:6050], 20, nprobe=8).indices, ref)


def test_a_killed_sharded_build_resumes_to_the_same_index(coll, tmp_path):
    root, x, _ = coll
    kw = dict(factory="IVF32,SQ8", shard_rows=1500, workers=0, tune_queries=50, seed=3)
    done = []

    def die_after_two(i):
        done.append(i)
        if len(done) == 2:
            raise KeyboardInterrupt  # what a kill leaves: two shards written, no index.json

    with pytest.raises(KeyboardInterrupt):
        build(root / "db", tmp_path / "ix", on_shard=die_after_two, **kw)
    assert not (tmp_path / "ix" / "index.json").exists()
    with pytest.raises(CfcdError, match="not an index directory"):
        open_index(tmp_path / "ix")
    first = (tmp_path / "ix" / ".build" / "shard-00000.faiss").stat()
    resumed_shards = []
    resumed = build(root / "db", tmp_path / "ix", on_shard=resumed_shards.append, **kw)
    assert resumed_shards == [2, 3]  # only the shards that were not written
    assert not (tmp_path / "ix" / ".build").exists()
    fresh = build(root / "db", tmp_path / "fresh", **kw)
    assert first.st_size > 0
    for (la, ia, ca), (lb, ib, cb) in zip(_lists(resumed), _lists(fresh)):
        assert la == lb
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ca, cb)
    assert resumed.params["search"] == fresh.params["search"]


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16,Flat", "Flat"])
def test_add_then_search_finds_the_new_images_and_remove_hides_them(coll, tmp_path, factory):
    root, x, ids = coll
    build(root / "db", tmp_path / "ix", factory=factory, workers=0, tune_queries=0, shard_rows=4000, rerank=50)
    grown = add(tmp_path / "ix", root / "new")
    assert len(grown) == 7000 and grown.ids[6500] == ids[6500]
    new_q = x[6000:6020]
    res = grown.search(new_q, 5, nprobe=32)
    assert [row[0] for row in res.ids] == ids[6000:6020]  # each new image finds itself first
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-5)  # exact re-ranking over both stores' rows
    # reopen from disk: the same
    again = open_index(tmp_path / "ix")
    assert [row[0] for row in again.search(new_q, 5, nprobe=32).ids] == ids[6000:6020]

    gone = ids[6000:6010] + [ids[0]]
    (tmp_path / "gone.txt").write_text("".join(f"{i}\n" for i in gone), encoding="utf-8")
    assert cli(["index", "remove", str(tmp_path / "ix"), "--ids", str(tmp_path / "gone.txt")]) == 0
    shrunk = open_index(tmp_path / "ix")
    assert len(shrunk) == 7000 - len(gone)
    res = shrunk.search(np.concatenate([new_q, x[:1]]), 50, nprobe=32)
    found = {i for row in res.ids for i in row if i is not None}
    assert not found & set(gone)
    assert [row[0] for row in res.ids[10:20]] == ids[6010:6020]
    with pytest.raises(CfcdError, match="not in the index: 'nope'"):
        remove(tmp_path / "ix", ["nope"])
    # a removed image may come back; a live one may not be added twice
    write_store(tmp_path / "back", [ids[0]], x[:1], meta={"model": "gem_r50"})
    back = add(tmp_path / "ix", tmp_path / "back")
    assert back.search(x[:1], 1, nprobe=32).ids[0][0] == ids[0]
    with pytest.raises(CfcdError, match="already in the index"):
        add(tmp_path / "ix", tmp_path / "back")
    # nothing of the old generations is left behind
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    names = {p.name for p in (tmp_path / "ix").iterdir()}
    assert names == referenced(info) | {"index.json"}


def test_a_mismatched_store_is_refused_on_add(coll, tmp_path, capsys):
    root, x, _ = coll
    build(root / "db", tmp_path / "ix", factory="IVF16,Flat", workers=0, tune_queries=0)
    before = (tmp_path / "ix" / "index.json").read_text()
    assert cli(["index", "add", str(tmp_path / "ix"), str(root / "other")]) == 2
    assert "'model'" in capsys.readouterr().err
    np.save(tmp_path / "d8.npy", x[:3, :8])
    with pytest.raises(CfcdError, match="8-D descriptors cannot be added to the 16-D index"):
        add(tmp_path / "ix", tmp_path / "d8.npy")
    np.save(tmp_path / "plain.npy", x[:3])
    with pytest.raises(CfcdError, match="has image ids but these rows have none"):
        add(tmp_path / "ix", tmp_path / "plain.npy")
    assert (tmp_path / "ix" / "index.json").read_text() == before  # refused before anything was written


def test_plain_npy_rows_are_their_ids_and_bad_rows_are_named(coll, tmp_path):
    root, x, _ = coll
    np.save(tmp_path / "a.npy", x[:3000])
    np.save(tmp_path / "b.npy", x[3000:3100])
    ix = build(tmp_path / "a.npy", tmp_path / "ix", factory="IVF16,Flat", workers=0, tune_queries=0)
    assert ix.ids is None
    grown = add(tmp_path / "ix", tmp_path / "b.npy")
    assert grown.search(x[3050:3051], 1, nprobe=16).indices[0, 0] == 3050
    shrunk = remove(tmp_path / "ix", ["3050"])
    assert shrunk.search(x[3050:3051], 1, nprobe=16).indices[0, 0] != 3050
    bad = x[:2000].copy()
    bad[1234] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(CfcdError, match="rows 1234"):
        build(tmp_path / "bad.npy", tmp_path / "ixbad", factory="IVF8,Flat", workers=0, tune_queries=0)


def test_cli_auto_build_search_info(coll, tmp_path, capsys):
    root, x, ids = coll
    write_store(tmp_path / "q", ["q0", "q1"], x[6000:6002], meta={"model": "gem_r50"})
    assert cli(["index", "build", str(root / "db"), "--out", str(tmp_path / "ix"), "--type", "auto",
                "--max-memory", "700KB", "--max-query-ms", "0.01", "--tune-queries", "50", "--workers", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "on-disk lists" in text and "tuned on 50 held-out rows" in text
    assert cli(["index", "add", str(tmp_path / "ix"), str(root / "new"), "--workers", "0", "--no-progress"]) == 0
    assert cli(["search", str(tmp_path / "ix"), "--queries", str(tmp_path / "q"), "--k", "3", "--nprobe", "64",
                "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["queries"][0]["results"][0]["id"] == ids[6000] and out["index_type"] == "faiss"
    assert cli(["index", "info", str(tmp_path / "ix")]) == 0
    assert '"op": "add"' in capsys.readouterr().out
    assert cli(["index", "build", str(root / "db"), "--out", str(tmp_path / "bad"), "--factory", "IVFxx"]) == 2
    assert "invalid FAISS index-factory string" in capsys.readouterr().err


def test_the_ivfpq_preset_grows_and_shrinks(coll, tmp_path):
    from cfcd.index import build_index

    root, x, ids = coll
    build_index(root / "db", "ivfpq", out=tmp_path / "ix", nlist=16, m=8, nbits=8, nprobe=16)
    grown = add(tmp_path / "ix", root / "new")
    assert len(grown) == 7000 and grown.type == "ivfpq"
    res = grown.search(x[6000:6010], 10)
    assert sum(ids[6000 + i] in row for i, row in enumerate(res.ids)) >= 8
    shrunk = remove(tmp_path / "ix", ids[6000:6010])
    assert not {i for row in shrunk.search(x[6000:6010], 10).ids for i in row} & set(ids[6000:6010])


def test_two_level_training_of_many_lists_with_a_tiny_cluster(coll, tmp_path, monkeypatch):
    # the path a large collection takes (two-level k-means from _TWO_LEVEL_FROM lists), on a small one
    # with one cluster of 5 rows: it gets its own centroids, and probing every list is exact search
    root, x, ids = coll
    rng = np.random.default_rng(7)
    far = rng.standard_normal((5, 16)).astype(np.float32) * 0.01 + 3.0
    data = np.concatenate([x[:3000], far / np.linalg.norm(far, axis=1, keepdims=True)])
    write_store(tmp_path / "db", [f"r{i}" for i in range(len(data))], data, meta={})
    monkeypatch.setattr(train_mod, "_TWO_LEVEL_FROM", 16)
    ix = build(tmp_path / "db", tmp_path / "ix", factory="IVF64,Flat", workers=0, tune_queries=0)
    import faiss

    assert faiss.extract_index_ivf(ix.index).nlist == 64
    got = ix.search(data[::50], 10, nprobe=64)
    ref = exact_search(data[::50], data, 10)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)
    # the 5 far rows are found from their own list alone
    assert set(ix.search(data[-1:], 5, nprobe=1).ids[0]) == {f"r{i}" for i in range(3000, 3005)}


def test_exact_topk_of_the_tuning_equals_exact_search(coll):
    _, x, _ = coll
    got = exact_topk(x[:30], RowReader(x), 25, block_rows=1000)
    ref = exact_search(x[:30], x, 25, device="cpu")
    assert (got == ref.indices).mean() > 0.999  # ties aside
    s = np.take_along_axis(x[:30] @ x.T, got, axis=1)
    np.testing.assert_allclose(s, ref.scores, atol=1e-5)


def test_reranking_an_ondisk_index_reads_rows_without_a_memory_map(coll, tmp_path):
    root, x, _ = coll
    # the tuning searches with re-ranking from the directory the build commits afterwards
    build(root / "db", tmp_path / "ix", factory="IVF32,PQ4", workers=0, tune_queries=40, shard_rows=2500,
                 rerank=200)
    index = open_index(tmp_path / "ix")
    assert index.params["ondisk"] and index.params["rerank"] == 200
    # a map would keep every re-ranked page in the process's resident memory
    assert isinstance(index.vectors, RowReader) and not isinstance(index.vectors, np.memmap)
    q = x[6000:6040]
    res = index.search(q, 10, nprobe=32)
    exact = q @ x[:6000].T
    np.testing.assert_allclose(res.scores, np.take_along_axis(exact, res.indices, axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(res.scores, axis=1) <= 0)
    coarse = index.search(q, 10, nprobe=32, rerank=0)
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    hits = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])  # noqa: E731
    assert hits(res.indices) >= hits(coarse.indices)
