"""One lifecycle for every index type: kill -9 at any phase and resume, relative paths, unique ids,
add/remove on flat and exact, generations that replace each other and free their files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cfcd
from cfcd.cli import main as cli
from cfcd.errors import CfcdError
from cfcd.index import add, build, build_index, exact_search, generation, open_index, remove
from cfcd.index.generations import KILL_ENV, referenced
from cfcd.store import write_store

from _index_helpers import clustered  # noqa: E402

_BUILD = ["--factory", "IVF32,SQ8", "--shard-rows", "3000", "--tune-queries", "50", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("life")
    x = clustered(6600, 16, 40)
    ids = [f"img/{i:05d}.jpg" for i in range(len(x))]
    write_store(root / "db", ids[:6000], x[:6000], meta={"model": "gem_r50"})
    write_store(root / "new", ids[6000:], x[6000:], meta={"model": "gem_r50"})
    # a store whose id list repeats an id (the store writers refuse this; a hand edit does not)
    write_store(root / "dup", ids[:3000], x[:3000], meta={"model": "gem_r50"})
    lines = (root / "dup" / "images.txt").read_text(encoding="utf-8").splitlines()
    lines[7] = lines[8]
    (root / "dup" / "images.txt").write_text("".join(f"{i}\n" for i in lines), encoding="utf-8")
    return root, x, ids


@pytest.fixture(scope="module")
def clean(coll, tmp_path_factory):
    """The same build as _BUILD, never killed."""
    root, _, _ = coll
    out = tmp_path_factory.mktemp("clean") / "ix"
    return build(root / "db", out, factory="IVF32,SQ8", shard_rows=3000, tune_queries=50, seed=3, workers=0)


def _cli(args, cwd: Path, kill_at: str | None = None) -> int:
    """``python -m cfcd ARGS`` in ``cwd``; output to files, not pipes (a killed parent's workers may hold a pipe)."""
    env = dict(os.environ, PYTHONPATH=str(Path(cfcd.__file__).parents[1]))
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    with open(cwd / "out.log", "ab") as log:
        return subprocess.run([sys.executable, "-m", "cfcd", *args], cwd=cwd, env=env, stdout=log, stderr=log,
                              timeout=600).returncode


@pytest.mark.parametrize("phase", ["encode", "merge", "tune", "commit"])
def test_a_build_sigkilled_at_any_phase_resumes_with_the_default_options(coll, clean, tmp_path, phase):
    root, x, _ = coll
    args = ["index", "build", str(root / "db"), "--out", "ix", *_BUILD]  # a relative --out, cwd = tmp_path
    assert _cli(args, tmp_path, kill_at=phase) == -signal.SIGKILL, (tmp_path / "out.log").read_text()
    committed = (tmp_path / "ix" / "index.json").exists()
    assert committed == (phase == "commit")  # index.json is the last thing a build writes
    if not committed:
        with pytest.raises(CfcdError, match="not an index directory"):
            open_index(tmp_path / "ix")
    assert _cli(args, tmp_path) == 0, (tmp_path / "out.log").read_text()
    resumed = open_index(tmp_path / "ix")
    q = x[6000:6040]
    a, b = resumed.search(q, 20, nprobe=8), clean.search(q, 20, nprobe=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.ids == b.ids
    assert resumed.params["search"] == clean.params["search"]
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert {p.name for p in (tmp_path / "ix").iterdir()} == referenced(info) | {"index.json"}


@pytest.mark.parametrize("phase", ["encode", "merge"])
def test_an_add_sigkilled_after_a_shard_or_in_its_merge_resumes_with_the_default_options(coll, tmp_path, phase):
    import shutil

    root, x, _ = coll
    build(root / "db", tmp_path / "ix", factory="IVF16,Flat", shard_rows=400, tune_queries=0, workers=0)
    shutil.copytree(tmp_path / "ix", tmp_path / "ref")
    reference = add(tmp_path / "ref", root / "new", workers=0)
    args = ["index", "add", "ix", str(root / "new"), "--no-progress"]  # 2 shards of 400 and 200 rows
    assert _cli(args, tmp_path, kill_at=phase) == -signal.SIGKILL, (tmp_path / "out.log").read_text()
    assert len(open_index(tmp_path / "ix")) == 6000  # the previous generation, complete
    assert _cli(args, tmp_path) == 0, (tmp_path / "out.log").read_text()
    grown = open_index(tmp_path / "ix")
    a, b = grown.search(x[5900:6100], 10, nprobe=16), reference.search(x[5900:6100], 10, nprobe=16)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.ids == b.ids and len(grown) == 6600


def test_a_relative_out_builds_and_searches_from_its_directory(coll, tmp_path, monkeypatch, capsys):
    root, x, ids = coll
    write_store(tmp_path / "q", ["q0", "q1"], x[6000:6002], meta={"model": "gem_r50"})
    monkeypatch.chdir(tmp_path)
    assert cli(["index", "build", str(root / "db"), "--out", "rel", "--factory", "IVF8,Flat", "--workers", "0",
                "--tune-queries", "20", "--no-progress"]) == 0
    assert cli(["search", "rel", "--queries", "q", "--k", "3", "--nprobe", "8", "--json", "r.json"]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    ref = exact_search(x[6000:6002], x[:6000], 3)
    assert [r["id"] for r in got["queries"][0]["results"]] == [ids[j] for j in ref.indices[0]]


@pytest.mark.parametrize("type_", ["exact", "flat", "ivfpq", "hnsw", "auto", "faiss"])
def test_every_type_refuses_a_duplicated_id(coll, tmp_path, capsys, type_):
    root, _, _ = coll
    args = ["index", "build", str(root / "dup"), "--out", str(tmp_path / "ix"), "--no-progress"]
    args += ["--factory", "IVF8,Flat"] if type_ == "faiss" else ["--type", type_]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "duplicate" in err and "'img/00008.jpg'" in err and "Traceback" not in err
    assert not (tmp_path / "ix" / "index.json").exists()


@pytest.mark.parametrize("type_", ["flat", "exact"])
def test_add_and_remove_on_flat_and_exact(coll, tmp_path, type_):
    root, x, ids = coll
    build_index(root / "db", type_, out=tmp_path / "ix")
    grown = add(tmp_path / "ix", root / "new")
    assert len(grown) == 6600 and grown.ids[6100] == ids[6100]
    q = x[5990:6010]  # old and new images find themselves
    assert [row[0] for row in grown.search(q, 3).ids] == ids[5990:6010]
    gone = ids[5995:6005]
    shrunk = remove(tmp_path / "ix", gone)
    assert len(shrunk) == 6600 - len(gone)
    res = shrunk.search(q, 50)
    assert not {i for row in res.ids for i in row} & set(gone)
    # the k best of the live rows: what exact search over them gives
    live = np.setdiff1d(np.arange(6600), np.arange(5995, 6005))
    ref = exact_search(q, x[live], 50)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-5)
    with pytest.raises(CfcdError, match="already in the index"):
        add(tmp_path / "ix", root / "new")


def test_a_commit_frees_old_generations_without_breaking_an_open_reader(coll, tmp_path):
    root, x, ids = coll
    first = build_index(root / "db", "ivfpq", out=tmp_path / "ix", nlist=32, m=4, rerank=50)
    token = generation(tmp_path / "ix")
    assert first.generation == token
    old_files = referenced(json.loads((tmp_path / "ix" / "index.json").read_text()))
    before = first.search(x[:20], 10)
    add(tmp_path / "ix", root / "new")
    assert generation(tmp_path / "ix") != token  # a server polling generation() sees the change
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert info["generation"] == 1
    names = {p.name for p in (tmp_path / "ix").iterdir()}
    assert names == referenced(info) | {"index.json"}
    assert {"index-g0.faiss", "index-g0.ivfdata", "images-g0.txt"} <= old_files
    assert not {"index-g0.faiss", "index-g0.ivfdata", "images-g0.txt"} & names  # deleted
    # the reader opened before the commit still searches its own generation (its files stay mapped)
    after = first.search(x[:20], 10)
    np.testing.assert_array_equal(before.indices, after.indices)
    assert after.ids == before.ids and len(first) == 6000
    assert len(open_index(tmp_path / "ix")) == 6600


def test_an_index_directory_of_an_older_cfcd_is_refused_with_a_rebuild_hint(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"type": "flat", "dim": 4, "params": {}}))
    with pytest.raises(CfcdError, match="older cfcd.*build it again"):
        open_index(tmp_path / "old")
