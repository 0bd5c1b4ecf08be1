"""PCA whitening (whitenp), learned whitening Lw, alpha-QE and DBA against plain reference code."""

from __future__ import annotations

import numpy as np
import pytest

from cfcd.errors import CfcdError
from cfcd.store import open_store, write_store
from cfcd.postprocess import (
    alpha_query_expansion,
    cholesky_with_jitter,
    database_augmentation,
    learn_lw,
    learn_pca_whitening,
    load_whitening,
    whitenlearn,
)


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n=400, d=32, clusters=10, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * np.linspace(3, 0.2, d)  # anisotropic
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + noise * rng.standard_normal((n, d))
    return _l2(x).astype(np.float32), labels


# ---- references: straight ports of the original code ---------------------------------------


def dirtorch_whiten_features(x, pca, whitenp, whitenv=None):
    """deep-image-retrieval whiten_features with an sklearn PCA(whiten=True)."""
    x = x - pca.mean_
    x = x @ pca.components_[:whitenv].T
    x = x / (pca.explained_variance_[:whitenv] ** whitenp)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cirtorch_whitenlearn(X, qidxs, pidxs):
    """cirtorch/utils/whiten.py whitenlearn, D x N columns, with np.linalg.eig."""
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = np.dot(df, df.T) / df.shape[1]
    alpha = 0
    while True:
        try:
            L = np.linalg.cholesky(S + alpha * np.eye(*S.shape))
            break
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
    P = np.linalg.inv(L)
    df = np.dot(P, X - m)
    D = np.dot(df, df.T)
    eigval, eigvec = np.linalg.eig(D)
    order = eigval.argsort()[::-1]
    eigvec = eigvec[:, order]
    P = np.dot(eigvec.T, P)
    return m, P.real


def cirtorch_whitenapply(X, m, P, dimensions=None):
    if not dimensions:
        dimensions = P.shape[0]
    X = np.dot(P[:dimensions, :], X - m)
    return X / (np.linalg.norm(X, ord=2, axis=0, keepdims=True) + 1e-6)


def dirtorch_expand_descriptors(descs, db=None, alpha=0, k=0):
    if k == 0:
        return descs
    n = descs.shape[0]
    db_descs = db if db is not None else descs
    sim = descs @ db_descs.T
    if db is None:
        sim[np.diag_indices(n)] = 0
    idx = np.argpartition(sim, int(-k), axis=1)[:, int(-k) :]
    descs_aug = np.zeros_like(descs)
    for i in range(n):
        new_q = np.vstack([db_descs[j, :] * sim[i, j] ** alpha for j in idx[i]])
        new_q = np.vstack([descs[i], new_q])
        new_q = np.mean(new_q, axis=0)
        descs_aug[i] = new_q / np.linalg.norm(new_q)
    return descs_aug


# ---- PCA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitenp, dim", [(0.5, None), (0.25, 16), (0.5, 8)])
def test_pca_whitening_matches_sklearn_and_dirtorch(whitenp, dim):
    from sklearn.decomposition import PCA

    x, _ = _clustered(500, 32)
    test, _ = _clustered(60, 32, seed=1)
    ours = learn_pca_whitening(x, whitenp=whitenp, dim=dim)
    pca = PCA(whiten=True).fit(x.astype(np.float64))
    ref = dirtorch_whiten_features(test.astype(np.float64), pca, whitenp, dim)
    got = ours.transform(test)
    assert got.shape == ref.shape and got.dtype == np.float32
    # eigenvector signs are arbitrary: compare per column up to sign, and the Gram matrices
    signs = np.sign(np.sum(got * ref, axis=0))
    np.testing.assert_allclose(got * signs, ref, atol=2e-4)
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=2e-4)
    np.testing.assert_allclose(ours.info["explained_variance"][:5], pca.explained_variance_[:5], rtol=1e-5)


def test_full_pca_whitening_whitens():
    x, _ = _clustered(2000, 16, noise=0.5)
    w = learn_pca_whitening(x, whitenp=0.5)
    y = w.transform(x, normalize=False)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-3)


def test_pca_rank_deficient_and_bad_input():
    x, _ = _clustered(10, 32)  # 10 rows: rank <= 9
    w = learn_pca_whitening(x)
    assert w.dim == 9
    assert np.isfinite(w.transform(x)).all()
    with pytest.raises(CfcdError, match="only 9 components"):
        learn_pca_whitening(x, dim=20)
    with pytest.raises(CfcdError, match="expects 32-D"):
        w.transform(np.ones((2, 31), np.float32))
    with pytest.raises(CfcdError, match="zero variance"):
        learn_pca_whitening(np.ones((5, 4), np.float32))


def test_pca_on_memmapped_store(tmp_path):
    x, _ = _clustered(300, 16)
    write_store(tmp_path / "s", [str(i) for i in range(300)], x)
    mm = open_store(tmp_path / "s").descriptors
    a = learn_pca_whitening(mm, whitenp=0.25)
    b = learn_pca_whitening(np.asarray(x, dtype=np.float64), whitenp=0.25)
    ya, yb = a.transform(x), b.transform(x)
    np.testing.assert_allclose(ya @ ya.T, yb @ yb.T, atol=1e-5)


# ---- Lw ---------------------------------------------------------------------------------------


def _pairs_data(seed=0, n_obj=60, d=24):
    """Objects seen twice: the two views differ by a large nuisance in a few directions."""
    rng = np.random.default_rng(seed)
    obj = rng.standard_normal((n_obj, d))
    nuisance = np.zeros(d)
    nuisance[:4] = 4.0
    views = []
    for o in obj:
        for _ in range(2):
            views.append(o + nuisance * rng.standard_normal(d) + 0.05 * rng.standard_normal(d))
    x = _l2(np.asarray(views)).astype(np.float32)
    q = np.arange(0, 2 * n_obj, 2)
    p = q + 1
    return x, q, p


@pytest.mark.parametrize("dims", [None, 12])
def test_lw_matches_cirtorch(dims):
    x, q, p = _pairs_data()
    m_ref, p_ref = cirtorch_whitenlearn(x.T.astype(np.float64), q, p)
    ref = cirtorch_whitenapply(x.T.astype(np.float64), m_ref, p_ref, dims).T
    m, proj = whitenlearn(x, q, p)
    np.testing.assert_allclose(m, m_ref[:, 0], atol=1e-7)
    w = learn_lw(x, q, p, dim=dims)
    got = w.transform(x)
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-4)


def test_lw_brings_matching_pairs_closer():
    x, q, p = _pairs_data(seed=1)
    w = learn_lw(x[:80], q[:40], p[:40])  # learn on 40 objects, test on the 20 others
    xt, qt, pt = x[80:], q[:20], p[:20]

    def pair_rank_1(y):
        s = y[qt] @ y.T
        s[np.arange(len(qt)), qt] = -np.inf
        return np.mean(np.argmax(s, axis=1) == pt)

    before, after = pair_rank_1(xt), pair_rank_1(w.transform(xt))
    assert after > before + 0.3, (before, after)
    assert after >= 0.9


def test_cholesky_retry_ladder():
    s = np.zeros((3, 3))
    s[0, 0] = 1.0  # singular: needs the jitter
    L = cholesky_with_jitter(s)
    assert np.isfinite(L).all() and L[1, 1] > 0


def test_lw_bad_pairs():
    x, q, p = _pairs_data()
    with pytest.raises(CfcdError, match="out of range"):
        learn_lw(x, q, p + 1000)
    with pytest.raises(CfcdError, match="equally long"):
        learn_lw(x, q, p[:3])


# ---- save / load ------------------------------------------------------------------------------


def test_whitening_save_load_roundtrip(tmp_path):
    x, _ = _clustered(200, 16)
    w = learn_pca_whitening(x, whitenp=0.25, dim=8)
    w.info["fitted_on"] = {"path": "db", "count": 200}
    st = w.save(tmp_path / "pca")
    assert st.name == "pca.safetensors" and (tmp_path / "pca.json").is_file()
    for name in ("pca", "pca.safetensors", "pca.json"):
        back = load_whitening(tmp_path / name)
        assert back.kind == "pca" and back.dim == 8 and back.info["whitenp"] == 0.25
        np.testing.assert_allclose(back.transform(x), w.transform(x), atol=1e-6)
    assert back.summary()["fitted_on"] == {"path": "db", "count": 200}
    assert not list(tmp_path.glob("*.tmp"))


def test_load_cirtorch_npz_and_errors(tmp_path):
    x, q, p = _pairs_data()
    m, P = cirtorch_whitenlearn(x.T.astype(np.float64), q, p)
    np.savez(tmp_path / "lw.npz", m=m, P=P)
    w = load_whitening(tmp_path / "lw.npz")
    ref = cirtorch_whitenapply(x.T.astype(np.float64), m, P).T
    np.testing.assert_allclose(w.transform(x), ref, atol=1e-5)
    with pytest.raises(CfcdError, match="not found"):
        load_whitening(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    (tmp_path / "bad.json").write_text('{"kind": "pca"}')
    with pytest.raises(CfcdError, match="bad.safetensors"):
        load_whitening(tmp_path / "bad")


# ---- alpha-QE / DBA ---------------------------------------------------------------------------


@pytest.mark.parametrize("k, alpha", [(1, 3), (5, 3), (10, 0), (7, 1)])
def test_aqe_matches_dirtorch(k, alpha):
    db, _ = _clustered(300, 16, seed=2)
    q, _ = _clustered(25, 16, seed=3)
    ref = dirtorch_expand_descriptors(q.astype(np.float64), db.astype(np.float64), alpha, k)
    got = alpha_query_expansion(q, db, k, alpha)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("k, alpha", [(1, 3), (4, 3), (6, 0)])
def test_dba_matches_dirtorch(k, alpha):
    db, _ = _clustered(250, 16, seed=4)
    ref = dirtorch_expand_descriptors(db.astype(np.float64), None, alpha, k)
    got = database_augmentation(db, k, alpha, chunk=64)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_dba_self_with_zero_similarity_like_dirtorch():
    # every other row is negatively similar: dirtorch's zeroed diagonal makes the row pick itself
    db = _l2(np.array([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1]])).astype(np.float32)
    ref = dirtorch_expand_descriptors(db.astype(np.float64), None, 1, 1)
    np.testing.assert_allclose(database_augmentation(db, 1, 1), ref, atol=1e-6)


def test_qe_noop_and_improves_recall():
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((12, 32)) / np.sqrt(32)
    labels = rng.integers(0, 12, 600)
    db = _l2(centers[labels] + 0.3 * rng.standard_normal((600, 32))).astype(np.float32)
    assert np.array_equal(alpha_query_expansion(db[:5], db, 0, 3), db[:5])
    assert np.array_equal(database_augmentation(db, 0, 3), db)
    q_idx = np.arange(0, 600, 10)

    def precision_at_10(qv, dbv):
        s = qv @ dbv.T
        s[np.arange(len(q_idx)), q_idx] = -np.inf
        top = np.argsort(-s, axis=1)[:, :10]
        return np.mean(labels[top] == labels[q_idx][:, None])

    base = precision_at_10(db[q_idx], db)
    dba = database_augmentation(db, 3, 3)
    qe = alpha_query_expansion(dba[q_idx], dba, 3, 3)
    assert precision_at_10(qe, dba) > base + 0.05
    assert precision_at_10(alpha_query_expansion(db[q_idx], db, 3, 3), db) > base
    with pytest.raises(CfcdError, match="non-negative"):
        alpha_query_expansion(db[:2], db, -1, 3)
