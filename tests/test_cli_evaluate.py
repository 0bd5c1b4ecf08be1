"""`cfcd evaluate` and `cfcd selfcheck` end to end, and one clear error per bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfcd.data.gnd import load_gnd
from cfcd.store import write_store

from _eval_helpers import reference_setups, run_cli, tiny_gnd, unit_rows

DIM = 24


@pytest.fixture(scope="module")
def bench(tmp_path_factory, revisitop_gnd_dir):
    """roxford5k ground truth with random descriptors: .npy files and stores (ids shuffled)."""
    root = tmp_path_factory.mktemp("evalbench")
    gt = load_gnd(revisitop_gnd_dir / "gnd_roxford5k.pkl")
    rng = np.random.default_rng(0)
    q, x, d = unit_rows(rng, 70, DIM), unit_rows(rng, gt.num_database, DIM), unit_rows(rng, 4000, DIM)
    np.save(root / "q.npy", q)
    np.save(root / "x.npy", x)
    np.save(root / "d.npy", d)
    meta = {"model": "cfcd_r50", "extract": {"scales": [0.7071, 1.0, 1.4142], "query_crop": "int() of the bbx"}}
    qp, xp = rng.permutation(70), rng.permutation(gt.num_database)
    write_store(root / "qstore", [gt.qimlist[i] for i in qp], q[qp], meta=meta)
    write_store(root / "xstore", [gt.imlist[i] for i in xp], x[xp], meta=meta)
    write_store(root / "dstore", [f"r1m_{i}" for i in range(4000)], d, meta={"model": "cfcd_r50"})
    ranks = np.argsort(-(np.concatenate([x, d]) @ q.T), axis=0)
    return {"root": root, "gt": gt, "gnd": gt.path, "q": q, "x": x, "d": d, "ref": reference_setups(gt, ranks)}


def _check_numbers(report: dict, ref: dict, atol=1e-4):
    for setup, (m_ap, aps, m_p, _) in ref.items():
        assert report[setup]["mAP"] == pytest.approx(m_ap * 100, abs=atol)
        assert [report[setup][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx(m_p * 100, abs=atol)
        got = [v[setup]["AP"] for v in report["per_query"].values()]
        np.testing.assert_allclose([np.nan if a is None else a for a in got], aps * 100, atol=atol, equal_nan=True)


def test_npy_and_stores_give_the_reference_numbers(bench, capsys, tmp_path):
    r = bench["root"]
    out_npy, out_store = tmp_path / "npy.json", tmp_path / "store.json"
    code, out, err = run_cli(capsys, "evaluate", "--dataset", "roxford5k", "--gnd", bench["gnd"],
                             "--queries", r / "q.npy", "--database", r / "x.npy", "--distractors", r / "d.npy",
                             "--json", out_npy)
    assert code == 0, err
    assert "roxford5k: 70 queries, 4993 database images +4000 distractors" in out
    assert ">> roxford5k: mAP E: " in out and ">> roxford5k: mP@k[1, 5, 10] E: " in out
    code, out2, err = run_cli(capsys, "evaluate", "--root", bench["gnd"].parent, "--dataset", "roxford5k",
                              "-q", r / "qstore", "-x", r / "xstore", "--distractors", r / "dstore",
                              "--json", out_store, "--per-query")
    assert code == 0, err
    a, b = json.loads(out_npy.read_text()), json.loads(out_store.read_text())
    _check_numbers(a, bench["ref"])
    for setup in ("easy", "medium", "hard"):
        assert a[setup] == b[setup]
    assert b["per_query"] == a["per_query"]
    assert "all_souls_000013" in out2  # --per-query table
    p = b["protocol"]
    assert p["dataset"] == "roxford5k" and p["gnd_official"] is True
    assert p["gnd_sha256"] == bench["gt"].sha256
    assert (p["num_queries"], p["num_database"], p["num_distractors"]) == (70, 4993, 4000)
    assert p["scales"]["queries"] == [0.7071, 1.0, 1.4142] and p["query_crop"] == "int() of the bbx"
    assert p["whitening"] is None and p["query_expansion"] is None
    assert p["inputs"]["database"]["kind"] == "store" and a["protocol"]["inputs"]["database"]["kind"] == "npy"
    assert "tie_policy" in p


def test_whitening_and_query_expansion(bench, capsys, tmp_path):
    postprocess = pytest.importorskip("cfcd.postprocess")
    from cfcd.evaluation import evaluate

    r, gt = bench["root"], bench["gt"]
    rng = np.random.default_rng(1)
    w = postprocess.Whitening(mean=rng.standard_normal(DIM) * 0.01, projection=np.linalg.qr(rng.standard_normal((DIM, DIM)))[0],
                              kind="pca", dim=16)
    wpath = w.save(tmp_path / "white")
    out = tmp_path / "w.json"
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", r / "q.npy", "-x", r / "x.npy",
                           "--distractors", r / "d.npy", "--whiten", wpath, "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    expected = evaluate(w.transform(bench["q"]), w.transform(bench["x"]), gt, distractors=w.transform(bench["d"]))
    assert report["medium"]["mAP"] == pytest.approx(expected.setups["medium"].mAP * 100, abs=1e-4)
    assert report["protocol"]["whitening"]["path"] == str(wpath)
    # alpha-QE over database + distractors
    out = tmp_path / "qe.json"
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", r / "q.npy", "-x", r / "x.npy",
                           "--distractors", r / "d.npy", "--qe", "2", "3", "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    full = np.concatenate([bench["x"], bench["d"]])
    q2 = postprocess.alpha_query_expansion(bench["q"], full, 2, 3.0)
    expected = evaluate(q2, bench["x"], gt, distractors=bench["d"])
    assert report["medium"]["mAP"] == pytest.approx(expected.setups["medium"].mAP * 100, abs=1e-4)
    assert report["protocol"]["query_expansion"] == {"method": "alpha-QE (dirtorch)", "k": 2, "alpha": 3.0}


def _bad_inputs(bench, tmp: Path) -> dict:
    """name -> (argv overrides, the file the error must name, a phrase of the message)."""
    r, gt = bench["root"], bench["gt"]
    cases = {}
    cases["missing gnd"] = ({"--gnd": tmp / "gnd_roxford5k.pkl"}, tmp / "gnd_roxford5k.pkl", "file not found")
    bad = tmp / "gnd_broken.pkl"
    bad.write_bytes(bench["gnd"].read_bytes()[:5000])
    cases["truncated gnd"] = ({"--gnd": bad}, bad, "not a valid pickle")
    evil = tmp / "gnd_evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp / "pwned").encode() + b"'\ntR.")
    cases["malicious gnd"] = ({"--gnd": evil}, evil, "refusing to unpickle os.system")
    rows = tmp / "x_rows.npy"
    np.save(rows, bench["x"][:-1])
    cases["row count"] = ({"--database": rows}, rows, "4992 rows but 4993 images are expected")
    dim = tmp / "x_dim.npy"
    np.save(dim, unit_rows(np.random.default_rng(0), 4993, DIM + 1))
    cases["dimension"] = ({"--database": dim}, dim, f"{DIM + 1}-D but {DIM}-D are expected")
    nan = tmp / "q_nan.npy"
    q = bench["q"].copy()
    q[5, 0] = np.nan
    np.save(nan, q)
    cases["NaN"] = ({"--queries": nan}, nan, "contain NaN")
    zero = tmp / "x_zero.npy"
    x = bench["x"].copy()
    x[17] = 0
    np.save(zero, x)
    cases["zero norm"] = ({"--database": zero}, zero, "all zero")
    empty = tmp / "empty_store"  # written by hand: write_store refuses to write an empty store
    empty.mkdir()
    np.save(empty / "descriptors.npy", np.zeros((0, DIM), np.float32))
    (empty / "images.txt").write_text("")
    (empty / "meta.json").write_text("{}")
    cases["empty store"] = ({"--distractors": empty}, empty, "no descriptors")
    trunc = tmp / "x_trunc.npy"
    trunc.write_bytes((r / "x.npy").read_bytes()[:-1000])
    cases["truncated npy"] = ({"--database": trunc}, trunc, "truncated or corrupt")
    ids = tmp / "x_ids"
    names = list(gt.imlist)
    names[42] = "not_in_roxford"
    write_store(ids, names, bench["x"])
    cases["store ids"] = ({"--database": ids}, ids, "'not_in_roxford'")
    dnan = tmp / "d_nan.npy"
    d = bench["d"].copy()
    d[1234, 2] = np.inf
    np.save(dnan, d)
    cases["distractor NaN"] = ({"--distractors": dnan}, dnan, "row(s) 1234 contain NaN or inf")
    ddim = tmp / "d_dim.npy"
    np.save(ddim, bench["d"][:, :10])
    cases["distractor dim"] = ({"--distractors": ddim}, ddim, f"10-D but the queries are {DIM}-D")
    cases["incomplete store"] = ({"--queries": tmp}, tmp, "descriptor store")
    return cases


def test_every_bad_input_gets_one_clear_error(bench, capsys, tmp_path):
    r = bench["root"]
    for name, (override, path, phrase) in _bad_inputs(bench, tmp_path).items():
        args = {"--gnd": bench["gnd"], "--queries": r / "q.npy", "--database": r / "x.npy"}
        args.update(override)
        argv = ["evaluate"] + [str(v) for kv in args.items() for v in kv]
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (name, out, err)
        assert str(path) in err and phrase in err, (name, err)
        assert "Traceback" not in err and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "pwned").exists()


def test_argument_errors(bench, capsys, tmp_path):
    r = bench["root"]
    code, _, err = run_cli(capsys, "evaluate", "--root", tmp_path, "-q", r / "q.npy", "-x", r / "x.npy")
    assert code == 2 and "--root needs --dataset" in err
    code, _, err = run_cli(capsys, "evaluate", "--root", tmp_path, "--dataset", "rparis6k", "-q", r / "q.npy",
                           "-x", r / "x.npy")
    assert code == 2 and "no ground truth for rparis6k" in err and str(tmp_path) in err
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", r / "q.npy", "-x", r / "x.npy",
                           "--qe", "1.5", "3")
    assert code == 2 and "--qe" in err


def test_revisitop_mat_features(bench, capsys, tmp_path):
    """revisitop's example features are .mat files with Q (D x nq) and X (D x n); CFCD's R1M shards
    hold X as a list of (1, D) rows (N x 1 x D)."""
    scipy_io = pytest.importorskip("scipy.io")
    r = bench["root"]
    feats = tmp_path / "roxford5k_resnet_rsfm120k_gem.mat"
    scipy_io.savemat(feats, {"Q": bench["q"].T, "X": bench["x"].T})
    shard = tmp_path / "r1m_1.mat"
    scipy_io.savemat(shard, {"X": [row[None, :] for row in bench["d"]]})
    out_mat, out_npy = tmp_path / "mat.json", tmp_path / "npy.json"
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", feats, "-x", feats,
                           "--distractors", shard, "--json", out_mat)
    assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", r / "q.npy", "-x", r / "x.npy",
                           "--distractors", r / "d.npy", "--json", out_npy)
    assert code == 0, err
    a, b = json.loads(out_mat.read_text()), json.loads(out_npy.read_text())
    assert a["per_query"] == b["per_query"] and a["medium"] == b["medium"]
    assert a["protocol"]["inputs"]["queries"]["kind"] == "mat"
    # too few columns: one clear error naming the file
    short = tmp_path / "short.mat"
    scipy_io.savemat(short, {"Q": bench["q"].T, "X": bench["x"][:-3].T})
    code, _, err = run_cli(capsys, "evaluate", "--gnd", bench["gnd"], "-q", short, "-x", short)
    assert code == 2 and str(short) in err and "4990 descriptors (columns of 'X') but 4993" in err


def test_tiny_gnd_end_to_end(tmp_path, capsys):
    gnd = tiny_gnd(tmp_path)
    rng = np.random.default_rng(3)
    q, x = unit_rows(rng, 4, 8), unit_rows(rng, 40, 8)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli(capsys, "evaluate", "--gnd", gnd, "-q", tmp_path / "q.npy", "-x", tmp_path / "x.npy",
                             "--kappas", "1", "3", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    ranks = np.argsort(-(x @ q.T), axis=0)
    gt = load_gnd(gnd)
    for setup, (m_ap, _, m_p, _) in reference_setups(gt, ranks, kappas=(1, 3)).items():
        assert report[setup]["mAP"] == pytest.approx(m_ap * 100, abs=1e-9)
        assert [report[setup]["mP@1"], report[setup]["mP@3"]] == pytest.approx(m_p * 100, abs=1e-9)
    assert report["protocol"]["dataset"] == "tiny" and report["protocol"]["gnd_official"] is False


def test_selfcheck(capsys):
    code, out, err = run_cli(capsys, "selfcheck")
    assert code == 0, out + err
    assert "selfcheck OK" in out and ">> selfcheck: mAP E: " in out


def test_evaluate_does_not_import_torch(bench, tmp_path):
    r = bench["root"]
    code = (
        "import sys; from cfcd.cli import main; "
        f"rc = main(['evaluate', '--gnd', {str(bench['gnd'])!r}, '-q', {str(r / 'q.npy')!r}, "
        f"'-x', {str(r / 'xstore')!r}, '--distractors', {str(r / 'd.npy')!r}]); "
        "assert rc == 0, rc; heavy = [m for m in ('torch', 'faiss', 'cv2') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the JSON report is written atomically: no temporary file is left behind
    out = tmp_path / "sub" / "report.json"
    proc = subprocess.run([sys.executable, "-m", "cfcd", "evaluate", "--gnd", str(bench["gnd"]), "-q",
                           str(r / "q.npy"), "-x", str(r / "x.npy"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]
    assert pickle.dumps(json.loads(out.read_text()))  # plain JSON data
