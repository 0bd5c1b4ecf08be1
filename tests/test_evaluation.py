"""The revisitop protocol: fast path against revisitop's compute_map, ties, edge cases, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cfcd.data.gnd import load_gnd
from cfcd.errors import InputError
from cfcd.evaluation import SETUPS, compute_ap, evaluate, evaluate_ranking, evaluate_scores, labelled_indices, reference_compute_ap, reference_compute_map, setup_gnd

from _eval_helpers import reference_setups, unit_rows

KAPPAS = [1, 5, 10]


def _assert_same(result, ref: dict, atol: float = 1e-12):
    for setup, (m_ap, aps, m_p, prs) in ref.items():
        got = result.setups[setup]
        assert got.mAP == pytest.approx(m_ap, abs=atol), setup
        np.testing.assert_allclose(got.aps, aps, rtol=0, atol=atol, equal_nan=True)
        np.testing.assert_allclose(got.mP, m_p, rtol=0, atol=atol)
        np.testing.assert_allclose(got.prs, prs, rtol=0, atol=atol, equal_nan=True)


@pytest.fixture(scope="module")
def roxford(revisitop_gnd_dir):
    return load_gnd(revisitop_gnd_dir / "gnd_roxford5k.pkl")


@pytest.fixture(scope="module")
def rparis(revisitop_gnd_dir):
    return load_gnd(revisitop_gnd_dir / "gnd_rparis6k.pkl")


# --------------------------------------------------------------------------- a hand-computed vector


def test_spec_test_vector():
    ranks = np.array([2, 3, 0, 5, 1, 7, 4, 6, 8, 9])[:, None]
    gnd = [{"ok": [2, 5, 7], "junk": [3]}]
    m_ap, aps, m_p, prs = reference_compute_map(ranks, gnd, KAPPAS)
    assert m_ap == pytest.approx(0.711111, abs=1e-6)
    np.testing.assert_allclose(m_p, [1.0, 0.6, 0.6])
    fast = evaluate_ranking(ranks, gnd, num_database=10).setups["classic"]
    assert fast.mAP == pytest.approx(0.711111, abs=1e-6)
    np.testing.assert_allclose(fast.mP, [1.0, 0.6, 0.6])
    # an absent positive (11) counts in nres but is never retrieved
    gnd_absent = [{"ok": [2, 5, 7, 11], "junk": [3]}]
    assert reference_compute_map(ranks, gnd_absent)[0] == pytest.approx(0.533333, abs=1e-6)
    assert evaluate_ranking(ranks, gnd_absent).setups["classic"].mAP == pytest.approx(0.533333, abs=1e-6)
    # the same through scores: item at position p gets score -p
    scores = np.empty((10, 1), dtype=np.float32)
    scores[ranks[:, 0], 0] = -np.arange(10)
    assert evaluate_scores(scores, gnd).setups["classic"].mAP == pytest.approx(0.711111, abs=1e-6)


def test_compute_ap_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 30))
        ranks = np.sort(rng.choice(100, size=n, replace=False))
        nres = n + int(rng.integers(0, 5)) or 1
        assert compute_ap(ranks, nres) == pytest.approx(reference_compute_ap(ranks, nres), abs=1e-12)


def test_setups_follow_revisitop(roxford):
    g = roxford.gnd[0]
    easy, medium, hard = (setup_gnd(roxford, s)[0] for s in ("easy", "medium", "hard"))
    assert list(easy["ok"]) == g["easy"] and list(easy["junk"]) == g["junk"] + g["hard"]
    assert list(medium["ok"]) == g["easy"] + g["hard"] and list(medium["junk"]) == g["junk"]
    assert list(hard["ok"]) == g["hard"] and list(hard["junk"]) == g["junk"] + g["easy"]
    assert list(SETUPS) == ["easy", "medium", "hard"]


# --------------------------------------------------------------------------- exact equality on the real ground truth


@pytest.mark.parametrize("dataset", ["roxford", "rparis"])
def test_scores_equal_reference_exactly(request, dataset):
    gt = request.getfixturevalue(dataset)
    rng = np.random.default_rng(1)
    x = unit_rows(rng, gt.num_database + 3000, 32)  # + 3000 distractor rows
    q = unit_rows(rng, gt.num_queries, 32)
    scores = x @ q.T
    ranks = np.argsort(-scores, axis=0, kind="stable")
    result = evaluate_scores(scores, gt, chunk_rows=2500)
    _assert_same(result, reference_setups(gt, ranks))
    assert result.num_distractors == 3000 and result.num_database == gt.num_database


def test_descriptors_match_reference_with_distractors(roxford):
    rng = np.random.default_rng(2)
    x = unit_rows(rng, roxford.num_database, 48)
    d = unit_rows(rng, 20000, 48)
    # a planted signal so that the metrics are not all near zero
    q = unit_rows(rng, 70, 48)
    for i, g in enumerate(roxford.gnd):
        x[g["easy"]] = q[i] + 0.6 * x[g["easy"]]
        x[g["hard"]] = q[i] + 1.5 * x[g["hard"]]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ranks = np.argsort(-(np.concatenate([x, d]) @ q.T), axis=0)  # revisitop's exact call
    ref = reference_setups(roxford, ranks)
    assert ref["medium"][0] > 0.15  # far from the ~0.01 of random descriptors
    for threads, chunk in ((1, 3000), (2, 7919), (None, None)):
        result = evaluate(q, x, roxford, distractors=[d[:8000], d[8000:]], chunk_rows=chunk, num_threads=threads)
        # chunked BLAS may round a score differently in the last bit: agree to 1e-6
        _assert_same(result, ref, atol=1e-6)
        assert result.num_distractors == 20000
        assert {"scores", "ranking", "metrics", "ranking_cpu"} <= set(result.timings)


def test_float16_and_transform(roxford):
    rng = np.random.default_rng(3)
    x = unit_rows(rng, roxford.num_database, 16).astype(np.float16)
    q = unit_rows(rng, 70, 16)
    base = evaluate(q, x.astype(np.float32), roxford)
    half = evaluate(q, x, roxford)
    for s in SETUPS:
        np.testing.assert_array_equal(half.setups[s].aps, base.setups[s].aps)
    # a streamed transform equals transforming first
    proj = rng.standard_normal((16, 8)).astype(np.float32)

    def transform(rows):
        y = rows @ proj
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    streamed = evaluate(transform(q), x.astype(np.float32), roxford, transform=transform, chunk_rows=1000)
    direct = evaluate(transform(q), transform(x.astype(np.float32)), roxford, chunk_rows=1000)
    for s in SETUPS:
        np.testing.assert_allclose(streamed.setups[s].aps, direct.setups[s].aps, atol=1e-12)


# --------------------------------------------------------------------------- ties


def test_ties_follow_stable_order_exactly(roxford):
    """Coarsely quantised descriptors: a few dozen distinct scores for 10k images, ties everywhere."""
    rng = np.random.default_rng(4)
    x = np.round(rng.standard_normal((roxford.num_database + 5000, 8)) * 0.7).astype(np.float32)
    x[~np.any(x != 0, axis=1), 0] = 1
    q = np.round(rng.standard_normal((70, 8))).astype(np.float32)
    q[~np.any(q != 0, axis=1), 0] = 1
    scores = x @ q.T  # small integers: exact in float32, whatever the summation order
    assert len(np.unique(scores[:, 0])) < 60
    stable = np.argsort(-scores, axis=0, kind="stable")
    ref = reference_setups(roxford, stable)
    for chunk in (None, 997):  # ties across chunk boundaries
        _assert_same(evaluate_scores(scores, roxford, chunk_rows=chunk), ref)
        _assert_same(evaluate(q, x[: roxford.num_database], roxford, distractors=x[roxford.num_database:],
                              chunk_rows=chunk), ref)
    # any other tie order may legitimately differ: the policy is what makes the result deterministic
    reverse = np.argsort(-scores[::-1], axis=0, kind="stable")
    reverse = scores.shape[0] - 1 - reverse
    other = reference_setups(roxford, reverse)
    assert any(abs(other[s][0] - ref[s][0]) > 1e-6 for s in SETUPS)


def test_tie_policy_small_example():
    # items 0..4; item 3 (positive) ties with items 1 (negative) and 4 (junk): lower index first
    scores = np.array([[0.9], [0.5], [0.1], [0.5], [0.5]], dtype=np.float32)
    gnd = [{"ok": [0, 3], "junk": [4]}]
    # stable order: 0, 1, 3, 4, 2 -> positives at 0 and 2 (junk 4 is after 3)
    result = evaluate_scores(scores, gnd).setups["classic"]
    expected = reference_compute_map(np.argsort(-scores, axis=0, kind="stable"), gnd)[0]
    assert result.mAP == pytest.approx(expected, abs=1e-15)
    assert result.mAP == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)


# --------------------------------------------------------------------------- edge cases


def test_queries_without_positives_are_skipped(roxford):
    rng = np.random.default_rng(5)
    result = evaluate(unit_rows(rng, 70, 8), unit_rows(rng, roxford.num_database, 8), roxford)
    easy = result.setups["easy"]
    assert easy.num_evaluated == 68 and math.isnan(easy.aps[11]) and math.isnan(easy.aps[66])
    assert easy.mAP == pytest.approx(np.nanmean(easy.aps))
    report = result.to_dict({"dataset": "roxford5k"})
    assert report["per_query"][roxford.qimlist[11]]["easy"]["AP"] is None
    assert report["per_query"][roxford.qimlist[11]]["medium"]["AP"] is not None
    # no query with positives at all: NaN instead of revisitop's ZeroDivisionError
    empty = [{"easy": [], "hard": [], "junk": [0]}]
    res = evaluate(unit_rows(rng, 1, 8), unit_rows(rng, 5, 8), empty)
    assert math.isnan(res.setups["medium"].mAP) and res.metrics()["medium"]["mAP"] is None


def test_truncated_ranking(roxford):
    rng = np.random.default_rng(6)
    q, x = unit_rows(rng, 70, 16), unit_rows(rng, roxford.num_database, 16)
    top = np.argsort(-(x @ q.T), axis=0, kind="stable")[:1500]
    result = evaluate_ranking(top, roxford)
    for setup in SETUPS:
        sg = setup_gnd(roxford, setup)
        for i in range(70):
            if not len(sg[i]["ok"]) or not np.isin(top[:, i], sg[i]["ok"]).any():
                continue  # revisitop raises when a query retrieves none of its positives
            ap = reference_compute_map(top[:, i : i + 1], sg[i : i + 1], KAPPAS)[1][0]
            assert result.setups[setup].aps[i] == pytest.approx(ap, abs=1e-12)


def test_bad_descriptors_are_named(roxford):
    rng = np.random.default_rng(7)
    q, x, d = unit_rows(rng, 70, 8), unit_rows(rng, roxford.num_database, 8), unit_rows(rng, 3000, 8)
    d[2345, 3] = np.nan
    with pytest.raises(InputError, match=r"r1m\.npy: descriptor row\(s\) 2345 contain NaN"):
        evaluate(q, x, roxford, distractors=d, sources=["db.npy", "r1m.npy"], chunk_rows=1000)
    d[2345] = 0
    with pytest.raises(InputError, match=r"r1m\.npy: descriptor row\(s\) 2345 are all zero"):
        evaluate(q, x, roxford, distractors=d, sources=["db.npy", "r1m.npy"])
    with pytest.raises(InputError, match="71 rows but the ground truth has 70 queries"):
        evaluate(unit_rows(rng, 71, 8), x, roxford)
    with pytest.raises(InputError, match="16-D but the queries are 8-D"):
        evaluate(q, x, roxford, distractors=unit_rows(rng, 10, 16))


def test_labelled_union_is_shared_by_setups(roxford):
    lab = labelled_indices(roxford)
    for i, g in enumerate(roxford.gnd):
        assert list(lab[i]) == sorted(g["easy"] + g["hard"] + g["junk"])


def test_report_and_table(roxford):
    rng = np.random.default_rng(8)
    result = evaluate(unit_rows(rng, 70, 8), unit_rows(rng, roxford.num_database, 8), roxford)
    report = json.loads(json.dumps(result.to_dict({"dataset": "roxford5k"})))
    assert list(report) == ["easy", "medium", "hard", "per_query", "protocol"]
    assert set(report["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    assert report["medium"]["mAP"] == pytest.approx(result.setups["medium"].mAP * 100)
    assert list(report["per_query"]) == roxford.qimlist
    table = result.table("roxford5k")
    m = np.around(result.setups["medium"].mAP * 100, decimals=2)
    assert f">> roxford5k: mAP E: {np.around(result.setups['easy'].mAP * 100, decimals=2)}, M: {m}," in table
    assert ">> roxford5k: mP@k[1, 5, 10] E: [" in table
    assert "(2 queries without positives)" in table
