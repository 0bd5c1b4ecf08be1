"""The descriptor store: sharded resumable writes, finalize, merge, and validated loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cfcd.errors import CfcdError
from cfcd.store import DescriptorStore, StoreWriter, finalize_store, load_descriptors, merge_stores, open_store, store_summary, transform_store, write_store


def _data(n: int = 50, d: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"img_{i:04d}" for i in range(n)], x


def test_sharded_write_two_ranks_then_finalize_in_order(tmp_path):
    ids, x = _data(50)
    store = tmp_path / "db"
    # two ranks, interleaved ids, small shards
    for rank in range(2):
        w = StoreWriter(store, dim=8, part=f"rank{rank}", shard_size=7)
        mine = list(range(rank, 50, 2))
        for s in range(0, len(mine), 5):
            rows = mine[s : s + 5]
            w.append([ids[i] for i in rows], x[rows])
        w.flush()
    assert not (store / "meta.json").exists()
    with pytest.raises(CfcdError, match="incomplete descriptor store"):
        open_store(store)
    result = finalize_store(store, order=ids, meta={"model": "cfcd_r50"})
    assert result.ids == ids
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)
    assert isinstance(result.descriptors, np.memmap)
    assert result.meta["count"] == 50 and result.meta["dim"] == 8 and result.meta["dtype"] == "float32"
    assert result.meta["model"] == "cfcd_r50" and result.meta["format"] == "cfcd-descriptor-store"
    assert not (store / ".partial").exists()


def test_resume_sees_every_part_and_other_rank_count(tmp_path):
    ids, x = _data(40)
    store = tmp_path / "db"
    # first run: 4 ranks, each writes one shard of 5 and is "killed" with rows still buffered
    for rank in range(4):
        w = StoreWriter(store, dim=8, part=f"rank{rank}", shard_size=5)
        mine = list(range(rank, 40, 4))[:7]
        w.append([ids[i] for i in mine], x[mine])  # 5 written as a shard, 2 lost in the buffer
    # resumed with 1 rank: it must see the 20 rows of the 4 parts
    w = StoreWriter(store, dim=8, part="rank0", shard_size=64)
    done = w.done_ids()
    assert len(done) == 20
    todo = [i for i in range(40) if ids[i] not in done]
    w.append([ids[i] for i in todo], x[todo])
    w.flush()
    result = finalize_store(store, order=ids)
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)


def test_interrupted_shard_is_invisible(tmp_path):
    ids, x = _data(12)
    store = tmp_path / "db"
    w = StoreWriter(store, dim=8, shard_size=4)
    w.append(ids[:8], x[:8])  # two complete shards
    part = store / ".partial" / "main"
    # a kill between the .npy rename and the .txt rename: shard 2 has only its .npy
    np.save(part / "shard-00002.npy", x[8:12])
    # a kill that left a .txt whose row count disagrees with its .npy
    np.save(part / "shard-00003.npy", x[8:10])
    (part / "shard-00003.txt").write_text("img_0008\n")
    w2 = StoreWriter(store, dim=8, shard_size=4)
    assert w2.done_ids() == set(ids[:8])
    w2.append(ids[8:], x[8:])
    w2.flush()
    result = finalize_store(store, order=ids)
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)


def test_finalize_errors_missing_and_unexpected_ids(tmp_path):
    ids, x = _data(10)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids[:6], x[:6])
    with pytest.raises(CfcdError, match=r"4 ids of the image list have no descriptor.*img_0006"):
        finalize_store(store, order=ids)
    with pytest.raises(CfcdError, match=r"2 ids in the shards are not in the image list.*img_0004"):
        finalize_store(store, order=ids[:4])
    with pytest.raises(CfcdError, match="duplicate"):
        finalize_store(store, order=ids[:6] + ids[:1])
    # the failed finalizes left the shards alone
    assert finalize_store(store, order=ids[:6]).ids == ids[:6]


def test_failures_bad_rows_and_retry(tmp_path):
    ids, x = _data(6)
    bad = x.copy()
    bad[1] = np.nan
    bad[2] = 0.0
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids, bad)
        w.add_failure("broken.jpg", "cannot identify image file")
    assert w.done_ids() == {ids[0], ids[3], ids[4], ids[5]}
    result = finalize_store(store, order=ids + ["broken.jpg"])
    assert result.ids == [ids[0], ids[3], ids[4], ids[5]]
    reasons = {f["id"]: f["reason"] for f in result.meta["failures"]}
    assert set(reasons) == {ids[1], ids[2], "broken.jpg"}
    assert "not finite" in reasons[ids[1]] and "zero" in reasons[ids[2]]


def test_failed_id_retried_later_is_not_a_failure(tmp_path):
    ids, x = _data(3)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids[:2], x[:2])
        w.add_failure(ids[2], "timeout")
    with StoreWriter(store, dim=8, part="retry") as w:
        assert ids[2] not in w.done_ids()
        w.append(ids[2:], x[2:])
    result = finalize_store(store, order=ids)
    assert result.ids == ids and result.meta["failures"] == []


def test_float16_store_and_overflow_is_a_failure(tmp_path):
    ids, x = _data(5)
    x16 = x.copy()
    x16[3] = 1e6  # overflows float16 -> inf
    store = tmp_path / "db"
    with StoreWriter(store, dim=8, dtype="float16") as w:
        w.append(ids, x16)
    result = finalize_store(store)
    assert result.descriptors.dtype == np.float16
    assert result.ids == [ids[0], ids[1], ids[2], ids[4]]
    loaded = load_descriptors(store)
    assert loaded.descriptors.dtype == np.float32
    np.testing.assert_allclose(loaded.descriptors, x[[0, 1, 2, 4]], atol=1e-3)


def test_writer_refuses_other_dim_or_dtype(tmp_path):
    store = tmp_path / "db"
    StoreWriter(store, dim=8)
    with pytest.raises(CfcdError, match="unfinished job"):
        StoreWriter(store, dim=16)
    with pytest.raises(CfcdError, match="append expects"):
        StoreWriter(store, dim=8).append(["a"], np.ones((1, 4), np.float32))


def test_duplicates_last_wins(tmp_path):
    ids, x = _data(4)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8, part="a") as w:
        w.append(ids, x)
    with StoreWriter(store, dim=8, part="b") as w:
        w.append(ids[1:2], x[3:4])
    result = finalize_store(store, order=ids)
    np.testing.assert_array_equal(result.descriptors[1], x[3])
    assert result.meta["duplicates_resolved"] == 1


def test_add_shards_to_a_finalised_store(tmp_path):
    ids, x = _data(20)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids[:12], x[:12])
    first = finalize_store(store, meta={"model": "gem_r50"})
    del first
    with StoreWriter(store, dim=8) as w:
        assert w.done_ids() == set(ids[:12])
        w.append(ids[12:], x[12:])
    result = finalize_store(store, order=ids)
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)
    assert result.meta["model"] == "gem_r50"


def test_old_failures_survive_and_are_retried(tmp_path):
    ids, x = _data(6)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids[:4], x[:4])
        w.add_failure(ids[4], "decode error")
        w.add_failure(ids[5], "decode error")
    first = finalize_store(store, order=ids)
    assert [f["id"] for f in first.meta["failures"]] == ids[4:]
    with StoreWriter(store, dim=8) as w:  # a later run fixes one of the two images
        assert w.done_ids() == set(ids[:4])
        w.append(ids[4:5], x[4:5])
    result = finalize_store(store, order=ids)
    assert result.ids == ids[:5]
    assert result.meta["failures"] == [{"id": ids[5], "reason": "decode error"}]


def test_write_store_and_plain_npy(tmp_path):
    ids, x = _data(5)
    s = write_store(tmp_path / "s", ids, x.astype(np.float64), meta={"model": "m"})
    assert s.descriptors.dtype == np.float32 and s.meta["count"] == 5
    np.save(tmp_path / "plain.npy", x)
    p = open_store(tmp_path / "plain.npy")
    assert p.ids is None and p.meta == {}
    # the descriptors.npy inside a store opens the store
    assert open_store(tmp_path / "s" / "descriptors.npy").ids == ids
    with pytest.raises(CfcdError, match="duplicate"):
        write_store(tmp_path / "t", ["a", "a"], x[:2])


def test_load_descriptors_matches_by_id(tmp_path):
    ids, x = _data(10)
    write_store(tmp_path / "s", ids, x)
    wanted = ids[::-1]
    loaded = load_descriptors(tmp_path / "s", expected_ids=wanted, expected_dim=8, role="database")
    assert loaded.ids == wanted
    np.testing.assert_array_equal(loaded.descriptors, x[::-1])
    # same order: the memory map is kept
    assert isinstance(load_descriptors(tmp_path / "s", expected_ids=ids).descriptors, np.memmap)
    with pytest.raises(CfcdError, match=r"1 expected ids are missing: 'nope'.*1 ids are not expected: 'img_0009'"):
        load_descriptors(tmp_path / "s", expected_ids=ids[:9] + ["nope"], role="database")
    np.save(tmp_path / "plain.npy", x)
    assert load_descriptors(tmp_path / "plain.npy", expected_ids=ids).ids == ids
    with pytest.raises(CfcdError, match="plain .npy matrix has 10 rows but 9"):
        load_descriptors(tmp_path / "plain.npy", expected_ids=ids[:9])


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", "not found"),
        ("truncated", "truncated or corrupt"),
        ("onedim", "expected an N x D matrix"),
        ("empty", "0 rows"),
        ("dim", "8-D but 16-D are expected"),
        ("nan", r"2 of 5 rows contain NaN or inf, first: rows 1, 3"),
        ("zero", r"1 of 5 rows are all zero, first: rows 2"),
        ("incomplete", "still running or was killed; rerun it to resume"),
        ("ints", "floating point"),
    ],
)
def test_load_descriptors_errors_name_the_file(tmp_path, case, pattern):
    _, x = _data(5)
    f = tmp_path / "q.npy"
    if case == "truncated":
        np.save(f, x)
        f.write_bytes(f.read_bytes()[:100])
    elif case == "onedim":
        np.save(f, x[0])
    elif case == "empty":
        np.save(f, np.zeros((0, 8), np.float32))
    elif case in ("dim", "nan", "zero"):
        y = x.copy()
        if case == "nan":
            y[1, 2], y[3, 0] = np.nan, np.inf
        if case == "zero":
            y[2] = 0
        np.save(f, y)
    elif case == "incomplete":
        f = tmp_path / "store"
        StoreWriter(f, dim=8).append(["a"], x[:1])
    elif case == "ints":
        np.save(f, np.ones((3, 8), np.int64))
    with pytest.raises(CfcdError) as info:
        load_descriptors(f, expected_dim=16 if case == "dim" else None, role="query descriptors")
    assert str(f) in str(info.value)
    assert info.match(pattern)


def test_corrupt_images_txt(tmp_path):
    ids, x = _data(4)
    write_store(tmp_path / "s", ids, x)
    (tmp_path / "s" / "images.txt").write_text("a\nb\na\nc\n")
    with pytest.raises(CfcdError, match="duplicate ids: 'a'"):
        load_descriptors(tmp_path / "s")
    (tmp_path / "s" / "images.txt").write_text("a\nb\n")
    with pytest.raises(CfcdError, match="has 2 ids but descriptors.npy has 4 rows"):
        load_descriptors(tmp_path / "s")


def test_nan_rows_named_by_id(tmp_path):
    ids, x = _data(5)
    x[4] = np.nan
    write_store(tmp_path / "s", ids, x)
    with pytest.raises(CfcdError, match=r"row 4 \('img_0004'\)"):
        load_descriptors(tmp_path / "s")


def test_merge_stores(tmp_path):
    ids, x = _data(30)
    write_store(tmp_path / "a", ids[:10], x[:10], meta={"model": "cfcd_r50"})
    write_store(tmp_path / "b", ids[10:], x[10:].astype(np.float16), meta={"model": "cfcd_r50"})
    merged = merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "c")
    assert merged.ids == ids and merged.descriptors.dtype == np.float32
    np.testing.assert_allclose(merged.descriptors, x, atol=1e-3)
    assert [m["count"] for m in merged.meta["merged_from"]] == [10, 20]
    with pytest.raises(CfcdError, match="more than one input store"):
        merge_stores([tmp_path / "a", tmp_path / "a"], tmp_path / "d")
    write_store(tmp_path / "e", ["z"], x[:1], meta={"model": "dolg_r50"})
    with pytest.raises(CfcdError, match="'model'"):
        merge_stores([tmp_path / "a", tmp_path / "e"], tmp_path / "f")


def test_store_summary_running_and_complete(tmp_path):
    ids, x = _data(6)
    w = StoreWriter(tmp_path / "s", dim=8, shard_size=2)
    w.append(ids[:4], x[:4])
    info = store_summary(tmp_path / "s")
    assert info["complete"] is False and info["rows_written"] == 4 and info["parts"] == ["main"]
    w.append(ids[4:], x[4:])
    w.flush()
    finalize_store(tmp_path / "s")
    info = store_summary(tmp_path / "s")
    assert info["complete"] and info["count"] == 6 and info["dim"] == 8


def test_large_store_streams_through_memmap(tmp_path):
    """finalize copies shard by shard: the result is a memmap equal to the input, in order."""
    rng = np.random.default_rng(1)
    n, d = 20000, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"{i}" for i in range(n)]
    perm = rng.permutation(n)
    with StoreWriter(tmp_path / "s", dim=d, shard_size=3000) as w:
        for s in range(0, n, 2500):
            rows = perm[s : s + 2500]
            w.append([ids[i] for i in rows], x[rows])
    result = finalize_store(tmp_path / "s", order=ids)
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)
    assert isinstance(result, DescriptorStore)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["count"] == n
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "s"))
    assert sorted(Path(tmp_path / "s").iterdir()) == sorted(
        tmp_path / "s" / f for f in ("descriptors.npy", "images.txt", "meta.json")
    )


def test_finalize_killed_midway_is_recovered(tmp_path):
    """State of a finalize killed after the new descriptors.npy replaced the old one but before
    images.txt and meta.json: the store reads as incomplete, and finalizing again restores it."""
    ids, x = _data(16)
    store = tmp_path / "db"
    with StoreWriter(store, dim=8) as w:
        w.append(ids[:10], x[:10])
    finalize_store(store, order=ids[:10])
    with StoreWriter(store, dim=8, part="more") as w:
        w.append(ids[10:], x[10:])
    base = store / ".partial" / "_base"
    base.mkdir()
    os.link(store / "descriptors.npy", base / "shard-00000.npy")
    os.link(store / "images.txt", base / "shard-00000.txt")
    (store / "meta.json").unlink()
    np.save(tmp_path / "new.npy", np.zeros((3, 8), np.float32))
    os.replace(tmp_path / "new.npy", store / "descriptors.npy")  # the half-done merge (renamed over)
    with pytest.raises(CfcdError, match="incomplete"):
        load_descriptors(store)
    assert StoreWriter(store, dim=8, part="more").done_ids() == set(ids)
    result = finalize_store(store, order=ids)
    np.testing.assert_array_equal(np.asarray(result.descriptors), x)


def test_store_cli(tmp_path, capsys):
    from cfcd.cli import main as cli

    ids, x = _data(12)
    w = StoreWriter(tmp_path / "s", dim=8, shard_size=4)
    w.append(ids[:8], x[:8])
    w.add_failure("bad.jpg", "truncated file")
    assert cli(["store", "info", str(tmp_path / "s")]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
    order = tmp_path / "order.txt"
    order.write_text("\n".join(ids[:8] + ["bad.jpg"]) + "\n")
    assert cli(["store", "finalize", str(tmp_path / "s"), "--order", str(order)]) == 0
    assert cli(["store", "info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["count"] == 8 and info["failures"] == 1 and info["failures_list"][0]["id"] == "bad.jpg"
    assert cli(["store", "info", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_transform_store_streams_blocks(tmp_path):
    ids, x = _data(3000, 8)
    src = write_store(tmp_path / "a", ids, x.astype(np.float16), meta={"model": "m"})
    proj = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    calls = []

    def fn(block):
        calls.append(len(block))
        return block @ proj

    out = transform_store(src, tmp_path / "b", fn, out_dim=3, dtype="float32", meta={"model": "m", "note": 1})
    assert out.ids == ids and out.descriptors.dtype == np.float32 and out.meta["dim"] == 3
    np.testing.assert_allclose(out.descriptors, x.astype(np.float16).astype(np.float32) @ proj, atol=1e-5)
    assert sum(calls) == 3000 and out.meta["note"] == 1
    with pytest.raises(CfcdError, match="must differ"):
        transform_store(src, tmp_path / "a", fn, out_dim=3)


def test_writer_flushes_by_time_as_well_as_by_count(tmp_path):
    from cfcd.store import StoreWriter, store_summary

    now = [0.0]
    writer = StoreWriter(tmp_path / "s", dim=4, shard_size=1024, flush_seconds=30.0, clock=lambda: now[0])
    rows = np.ones((1, 4), np.float32)
    writer.append(["a"], rows)
    now[0] = 29.0
    writer.append(["b"], rows)
    assert store_summary(tmp_path / "s")["rows_written"] == 0  # under 30 s: still buffered
    now[0] = 31.0
    writer.append(["c"], rows)  # 31 s since the writer started: a shard, far below shard_size
    assert store_summary(tmp_path / "s")["rows_written"] == 3
    now[0] = 40.0
    writer.append(["d"], rows)
    assert store_summary(tmp_path / "s")["rows_written"] == 3  # the clock restarts at each write
    never = StoreWriter(tmp_path / "n", dim=4, shard_size=1024, flush_seconds=None, clock=lambda: 1e9)
    never.append(["a"], rows)
    assert store_summary(tmp_path / "n")["rows_written"] == 0


def test_all_images_failed_marks_the_store_failed(tmp_path, capsys):
    from cfcd.cli import main
    from cfcd.store import StoreWriter, store_summary

    writer = StoreWriter(tmp_path / "s", dim=4)
    writer.add_failure("a", "not an image")
    writer.add_failure("b", "empty file")
    with pytest.raises(CfcdError, match=r"FAILED.*every one of the 2 image\(s\) failed.*a: not an image"):
        finalize_store(tmp_path / "s", order=["a", "b"])
    summary = store_summary(tmp_path / "s")
    assert summary["failed"] and not summary["complete"]
    assert main(["store", "info", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "INCOMPLETE" not in out and "a: not an image" in out
    StoreWriter(tmp_path / "s", dim=4)  # a new attempt clears the mark
    assert not store_summary(tmp_path / "s")["failed"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_respect_the_umask(tmp_path, umask):
    from cfcd.utils.io import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
        write_store(tmp_path / "s", ["a"], np.ones((1, 4), np.float32))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for path in (tmp_path / "x.json", tmp_path / "s" / "descriptors.npy", tmp_path / "s" / "meta.json",
                 tmp_path / "s" / "images.txt"):
        assert path.stat().st_mode & 0o777 == expected, path
