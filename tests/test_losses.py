"""cfcd.losses against straightforward transcriptions of the reference code (float64 where it matters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cfcd.losses as L
from cfcd.errors import InputError

ALPHA = 0.02


# ----------------------------------------------------------------------------------------------
# MadaCos
# ----------------------------------------------------------------------------------------------
def ref_madacos(cos: torch.Tensor, labels: torch.Tensor, alpha: float = ALPHA, training: bool = True,
                k: float = 9_999_999, dtype=torch.float64):
    """CFCD's formulas (core/model/madacos.py lines 16-62), naively: exp-sum for B (no logsumexp), lower median by sorting."""
    cos = cos.detach().to(dtype)
    n = cos.shape[0]
    t = cos[torch.arange(n), labels]
    order = sorted(range(n), key=lambda i: float(t[i]))
    med_i = order[(n - 1) // 2]  # lower median for an even count
    med = t[med_i]
    s = math.log(k * (1 - alpha) / alpha) / (1 - med)
    s = torch.clamp(s, min=32.0)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    b = torch.where(onehot, torch.zeros_like(cos), torch.exp(cos * s)).sum(dim=1)
    raw = med - torch.log(b[med_i] * alpha / (1 - alpha)) / s
    m = torch.zeros_like(raw) if not training or raw < 0 else raw
    logits = s * (cos - m * onehot.to(dtype))
    return logits, float(s), float(m), float(med), med_i, float(raw)


def near_class_embeddings(weight: torch.Tensor, labels: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(weight.detach(), dim=1)[labels]
    return w + noise * torch.randn(w.shape, generator=g)


@pytest.mark.parametrize(
    "median, expected", [(0.0, 32.0), (0.3, 32.0), (0.4, 33.35), (0.5, 40.02), (0.6, 50.02), (0.7, 66.70), (0.8, 100.05)]
)
def test_madacos_scale_table(median, expected):
    s = L.madacos_scale(median, alpha=ALPHA)
    assert float(s) == pytest.approx(expected, abs=0.006)


def test_madacos_scale_constant_variants():
    code = L.MadaCos(8, 81313)
    paper = L.MadaCos(8, 81313, scale_constant="classes")
    assert code.k == 9_999_999 and paper.k == 81312
    assert float(L.madacos_scale(0.6, alpha=ALPHA, k=paper.k)) == pytest.approx(math.log(81312 * 49) / 0.4)
    assert float(L.madacos_scale(0.6, alpha=ALPHA, k=paper.k)) == pytest.approx(37.99, abs=0.01)
    assert float(L.madacos_scale(0.5, alpha=ALPHA, k=paper.k)) == 32.0  # 30.4, floored
    assert L.MadaCos(8, 10, scale_constant=1000).k == 1000
    for bad in ("paper", -1, True):
        with pytest.raises(ValueError):
            L.MadaCos(8, 10, scale_constant=bad)
    with pytest.raises(ValueError):
        L.MadaCos(8, 10, alpha=1.0)


def test_madacos_init_and_repr():
    head = L.MadaCos(64, 100)
    assert head.weight.shape == (100, 64)
    assert head.weight.abs().max() <= 1 / 8 and head.weight.abs().max() > 0.1
    assert "alpha=0.02" in repr(head) and "num_classes=100" in repr(head)
    assert list(head.state_dict()) == ["weight"]  # loads CFCD's desc_cls.weight as-is


@pytest.mark.parametrize("batch", [16, 15])
def test_madacos_matches_naive_reference(batch):
    torch.manual_seed(0)
    head = L.MadaCos(32, 50)
    labels = torch.randint(0, 50, (batch,))
    emb = near_class_embeddings(head.weight, labels, noise=0.08, seed=1)
    logits = head.logits(emb, labels)
    cos = head.cosine(emb)
    ref_logits, s, m, med, med_i, _ = ref_madacos(cos, labels)
    st = head.last_stats
    assert st["scale"] == pytest.approx(s, rel=1e-6)
    assert st["median_cos"] == pytest.approx(med, abs=1e-7)
    assert m > 0.05  # the case exercises the margin
    assert st["margin"] == pytest.approx(m, abs=1e-6)
    torch.testing.assert_close(logits.double(), ref_logits, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(head(emb, labels).double(), F.cross_entropy(ref_logits, labels), atol=1e-4, rtol=1e-5)


def test_madacos_even_count_takes_lower_median():
    cos = torch.tensor([[0.1, 0.0], [0.4, 0.0], [0.2, 0.0], [0.3, 0.0]])
    st = L.madacos_statistics(cos, torch.zeros(4, dtype=torch.long), alpha=ALPHA)
    assert float(st.median_cos) == pytest.approx(0.2)
    assert int(st.median_index) == 2


def test_madacos_median_sample_target_probability_is_alpha():
    torch.manual_seed(3)
    head = L.MadaCos(24, 40)
    labels = torch.randint(0, 40, (12,))
    emb = near_class_embeddings(head.weight, labels, noise=0.1, seed=4)
    logits = head.logits(emb, labels)
    st = L.madacos_statistics(head.cosine(emb), labels, alpha=ALPHA)
    assert float(st.margin) > 0
    i = int(st.median_index)
    p = torch.softmax(logits[i].detach().double(), dim=0)[labels[i]]
    assert float(p) == pytest.approx(ALPHA, rel=1e-4)


def test_madacos_margin_zero_when_negative_and_at_init():
    torch.manual_seed(5)
    head = L.MadaCos(64, 1000)
    labels = torch.randint(0, 1000, (32,))
    head.logits(torch.randn(32, 64), labels)  # random init: med ~ 0, so m < 0 (clamped to 0)
    st = head.last_stats
    assert st["scale"] == 32.0
    assert st["raw_margin"] < 0 and st["margin"] == 0.0


def _overflow_case(target_range, non_target, spread=0.3, n=9, c=30):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % c
    cos = torch.full((n, c), spread) + 0.01 * torch.rand(n, c, generator=g)
    cos[:, -1] = non_target
    cos[torch.arange(n), labels] = torch.linspace(*target_range, n)
    return cos, labels


def test_madacos_overflow_is_handled_in_log_space():
    # median target cosine 0.8 -> s = 100.05; a non-target cosine 0.95 -> exp(95) overflows fp32.
    cos, labels = _overflow_case((0.75, 0.85), 0.95)
    naive_b = torch.where(F.one_hot(labels, 30).bool(), 0.0, torch.exp(cos * 100.05)).sum(1)
    assert torch.isinf(naive_b).all()  # the fp32 reference: B = inf, m = -inf, silently 0
    st = L.madacos_statistics(cos, labels, alpha=ALPHA)
    _, s, m, med, med_i, raw = ref_madacos(cos, labels)  # float64: exp(95) fits
    assert float(st.scale) == pytest.approx(100.05, abs=0.01) and float(st.scale) == pytest.approx(s, rel=1e-6)
    assert int(st.median_index) == med_i
    assert math.isfinite(float(st.log_b_median)) and float(st.log_b_median) > 88.7
    assert float(st.raw_margin) == pytest.approx(raw, abs=1e-9)
    assert float(st.margin) == m == 0.0  # a non-target beats the target: clamped legitimately


def test_madacos_overflow_with_positive_margin():
    # median 0.95 -> s = 400; non-targets at 0.3 give s cos = 120: fp32 B overflows, yet the true
    # margin is ~0.65. The naive fp32 code would train this batch with m = 0.
    cos, labels = _overflow_case((0.9, 0.99), 0.35)
    s32 = float(L.madacos_scale(float(cos[torch.arange(9), labels].median()), alpha=ALPHA))
    naive_b = torch.where(F.one_hot(labels, 30).bool(), 0.0, torch.exp(cos * s32)).sum(1)
    assert s32 > 300 and torch.isinf(naive_b).all()
    st = L.madacos_statistics(cos, labels, alpha=ALPHA)
    _, s, m, med, med_i, _ = ref_madacos(cos, labels)
    assert m > 0.5
    assert float(st.margin) == pytest.approx(m, abs=1e-9) and float(st.scale) == pytest.approx(s, rel=1e-9)
    # and the margin does its job: the median sample's target probability is alpha
    logits = float(st.scale) * (cos.double() - float(st.margin) * F.one_hot(labels, 30).double())
    assert float(torch.softmax(logits[med_i], 0)[labels[med_i]]) == pytest.approx(ALPHA, rel=1e-6)


def test_madacos_gradients_equal_ce_on_fixed_logits():
    torch.manual_seed(6)
    head = L.MadaCos(16, 20)
    labels = torch.randint(0, 20, (10,))
    emb = near_class_embeddings(head.weight, labels, noise=0.1, seed=7).requires_grad_()
    head(emb, labels).backward()
    st = head.last_stats
    assert st["margin"] > 0
    g_emb, g_w = emb.grad.clone(), head.weight.grad.clone()

    emb2 = emb.detach().clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    cos = F.linear(F.normalize(emb2), F.normalize(w2))
    fixed = st["scale"] * (cos - st["margin"] * F.one_hot(labels, 20))
    F.cross_entropy(fixed, labels).backward()
    torch.testing.assert_close(g_emb, emb2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_w, w2.grad, atol=1e-5, rtol=1e-4)


def test_madacos_eval_mode_keeps_adaptive_scale_and_zero_margin():
    torch.manual_seed(8)
    head = L.MadaCos(16, 20)
    labels = torch.randint(0, 20, (10,))
    emb = near_class_embeddings(head.weight, labels, noise=0.1, seed=9)
    head.train()
    head.logits(emb, labels)
    train = head.last_stats
    head.eval()
    logits = head.logits(emb, labels)
    ev = head.last_stats
    assert train["margin"] > 0 and ev["margin"] == 0.0
    assert ev["scale"] == pytest.approx(train["scale"]) and ev["scale"] > 32
    torch.testing.assert_close(logits, ev["scale"] * head.cosine(emb))


def test_madacos_bf16_autocast_matches_fp32():
    torch.manual_seed(10)
    embedder = torch.nn.Linear(32, 16)
    head = L.MadaCos(16, 30)
    x = torch.randn(24, 32)
    labels = torch.randint(0, 30, (24,))
    with torch.no_grad():  # make the embeddings land near their class weights
        head.weight[labels] = F.normalize(embedder(x), dim=1) + 0.05 * torch.randn(24, 16)
    loss32 = head(embedder(x), labels)
    st32 = head.last_stats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb16 = embedder(x)
        loss16 = head(emb16, labels)
    st16 = head.last_stats
    assert emb16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert st32["margin"] > 0
    assert st16["scale"] == pytest.approx(st32["scale"], rel=2e-2)
    assert st16["margin"] == pytest.approx(st32["margin"], abs=1e-2)
    assert st16["median_cos"] == pytest.approx(st32["median_cos"], abs=1e-2)
    assert loss16.item() == pytest.approx(loss32.item(), rel=5e-2)
    loss16.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_madacos_rejects_bad_shapes():
    head = L.MadaCos(8, 10)
    with pytest.raises(ValueError, match="B x 8"):
        head(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        head(torch.randn(4, 8), torch.zeros(4))


# ----------------------------------------------------------------------------------------------
# ArcFace, CosFace, CurricularFace
# ----------------------------------------------------------------------------------------------
def ref_curricular_step(cos: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, s: float, m: float):
    """CFCD core/model/arcface.py forward (training branch), transcribed."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    threshold, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    cos = cos.clone().clamp(-1, 1)
    target_logit = cos[torch.arange(0, cos.size(0)), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * cos_m - sin_theta * sin_m
    mask = cos > cos_theta_m
    final_target_logit = torch.where(target_logit > threshold, cos_theta_m, target_logit - mm)
    hard_example = cos[mask]
    t = target_logit.mean() * 0.01 + (1 - 0.01) * t
    cos[mask] = hard_example * (t + hard_example)
    cos.scatter_(1, labels.view(-1, 1).long(), final_target_logit)
    return cos * s, t


def test_curricularface_matches_reference_over_steps():
    torch.manual_seed(11)
    head = L.CurricularFace(16, 12)
    t_ref = torch.zeros(1)
    for step in range(3):
        labels = torch.randint(0, 12, (9,))
        emb = near_class_embeddings(head.weight, labels, noise=0.3, seed=step)
        logits = head.logits(emb, labels)
        ref, t_ref = ref_curricular_step(head.cosine(emb), labels, t_ref, 30.0, 0.15)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.t, t_ref.view(1), atol=1e-7, rtol=1e-6)
    assert 0 < head.last_stats["hard_fraction"] < 1 and float(head.t) > 0


def test_curricularface_eval_state_dict_and_dolg_keys():
    head = L.CurricularFace(8, 5)
    assert set(head.state_dict()) == {"weight", "t"}
    dolg = {"weight": torch.randn(5, 8), "t": torch.tensor([0.37])}
    head.load_state_dict(dolg)
    assert float(head.t) == pytest.approx(0.37)
    head.eval()
    emb = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(head.logits(emb, labels), 30.0 * head.cosine(emb))
    assert float(head.t) == pytest.approx(0.37)  # untouched in eval (CFCD copy)
    dolg_eval = L.CurricularFace(8, 5, margin_in_eval=True)
    dolg_eval.load_state_dict(dolg)
    dolg_eval.eval()
    out = dolg_eval.logits(emb, labels)
    assert not torch.allclose(out, 30.0 * dolg_eval.cosine(emb)) and float(dolg_eval.t) != pytest.approx(0.37)


def test_arcface_target_logits():
    m, s = 0.5, 10.0
    head = L.ArcFace(2, 3, scale=s, margin=m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    angles = torch.tensor([0.3, 1.2, 3.0])  # the last one is past pi - m: linear fallback
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.zeros(3, dtype=torch.long)
    logits = head.logits(emb, labels)
    cos = torch.cos(angles)
    expected = torch.where(angles < math.pi - m, torch.cos(angles + m), cos - math.sin(math.pi - m) * m)
    torch.testing.assert_close(logits[:, 0], s * expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 1:], s * head.cosine(emb)[:, 1:])
    easy = L.ArcFace(2, 3, scale=s, margin=m, easy_margin=True)
    easy.load_state_dict(head.state_dict())
    expected_easy = torch.where(cos > 0, torch.cos(angles + m), cos)
    torch.testing.assert_close(easy.logits(emb, labels)[:, 0], s * expected_easy, atol=1e-5, rtol=1e-5)


def test_cosface_and_heads_under_autocast():
    torch.manual_seed(12)
    emb = torch.randn(6, 8)
    labels = torch.randint(0, 5, (6,))
    cf = L.CosFace(8, 5)
    ref = 30.0 * (cf.cosine(emb) - 0.35 * F.one_hot(labels, 5))
    torch.testing.assert_close(cf.logits(emb, labels), ref)
    for name in ("arcface", "cosface", "curricularface", "madacos"):
        head = L.create(name, embedding_dim=8, num_classes=5)
        x = torch.randn(6, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(x.to(torch.bfloat16), labels)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_registry():
    assert {"madacos", "arcface", "cosface", "curricularface", "local_triplet", "ap", "tap", "contrastive",
            "triplet"} <= set(L.list_losses())
    head = L.create("madacos", embedding_dim=512, num_classes=7, alpha=0.1)
    assert isinstance(head, L.MadaCos) and head.alpha == 0.1 and L.is_classification_head(head)
    assert isinstance(L.create("dolg_arcface", embedding_dim=4, num_classes=3), L.CurricularFace)
    with pytest.raises(InputError, match="unknown loss 'madacoss'"):
        L.create("madacoss")
    with pytest.raises(InputError, match="local_triplet"):
        L.create("local_triplet", marginn=0.1)
    with pytest.raises(InputError, match="alpha"):
        L.create("madacos", embedding_dim=8, num_classes=3, alpha=2.0)


# ----------------------------------------------------------------------------------------------
# Local triplet loss (CFCD stage 2)
# ----------------------------------------------------------------------------------------------
def ref_match_attn(query_feat, pos_feat, attention, ratio=0.9, top_fraction=0.5):
    """CFCD core/losses/super_loss.py match_attn, transcribed (top_fraction=0.5 is K//2)."""
    dist = torch.cdist(query_feat, pos_feat)
    best1 = torch.argmin(dist, dim=1)
    best2 = torch.argmin(dist, dim=0)
    arange = torch.arange(best2.size(0))
    reciprocal = best1[best2] == arange
    dist2 = dist.clone()
    dist2[best2, arange] = float("inf")
    dist2_second2 = torch.argmin(dist2, dim=0)
    ratio1to2 = dist[best2, arange] / dist2[dist2_second2, arange]
    valid = torch.logical_and(reciprocal, ratio1to2 <= ratio)
    _, i = attention.topk(int(attention.size(0) * top_fraction))
    mask = torch.zeros(attention.size(0)).scatter_(0, i, 1)
    valid = torch.logical_and(valid, mask)
    pindices = torch.where(valid)[0]
    return best2[pindices], pindices


def ref_local_triplet(features, tuple_size, margin=0.1, ratio=0.9, top_fraction=0.5, weight=1.0):
    """Per-tuple Python loop over SuperfeatureTripletLoss, as CFCD's TripletLoss does."""
    b, c, h, w = features.shape
    res = features.reshape(b // tuple_size, tuple_size, c, h * w).transpose(2, 3)
    att = features.abs().sum(dim=1).reshape(b // tuple_size, tuple_size, h * w)
    total = features.sum() * 0.0
    n_matches = 0
    for tup, a in zip(res, att):
        q = F.normalize(tup[0], dim=1)
        p = F.normalize(tup[1], dim=1)
        negs = [F.normalize(n, dim=1) for n in tup[2:]]
        qi, pi = ref_match_attn(q, p, a[1], ratio, top_fraction)
        if qi.numel() == 0:
            total = total + q[0, 0] * 0.0
            continue
        n_matches += qi.numel()
        qs, ps = q[qi], p[pi]
        for n in negs:
            ns = n[torch.cdist(qs.detach(), n.detach()).argmin(dim=1)]
            d_pos = (qs - ps).pow(2).sum(1)
            d_neg = (qs - ns).pow(2).sum(1)
            total = total + (d_pos - d_neg + margin).clamp(min=0).sum() * weight
    return total, n_matches


def planted_tuples(n_tuples=3, tuple_size=5, c=12, h=5, w=5, seed=0, noise=0.15, planted=0.6):
    """Part of each positive's positions are noisy copies of anchor positions (true matches),
    the rest random, so the reciprocity, ratio and prominence tests all reject something."""
    g = torch.Generator().manual_seed(seed)
    k = h * w
    out = torch.rand(n_tuples, tuple_size, c, k, generator=g)
    n_planted = int(k * planted)
    for t in range(n_tuples):
        perm = torch.randperm(k, generator=g)
        src, twins = perm[:n_planted], perm[n_planted : n_planted + 4]
        # near-twins of some matched anchor descriptors: reciprocal matches that fail the ratio test
        out[t, 0][:, twins] = out[t, 0][:, src[:4]] + 0.01 * torch.rand(c, 4, generator=g)
        dst = torch.randperm(k, generator=g)[:n_planted]
        out[t, 1][:, dst] = out[t, 0][:, src] + noise * torch.rand(c, n_planted, generator=g)
        out[t, 2] = 0.5 * out[t, 0] + 0.5 * out[t, 2]  # a hard negative: near the anchor
    return out.reshape(n_tuples * tuple_size, c, h, w).relu()


def test_planted_tuples_exercise_every_filter():
    feats = planted_tuples()
    desc = F.normalize(feats.reshape(3, 5, 12, 25).transpose(2, 3), dim=3)
    att = feats.abs().sum(1).reshape(3, 5, 25)[:, 1]
    valid, _, _ = L.match_local_descriptors(desc[:, 0], desc[:, 1], att)
    n = int(valid.sum())
    for kw in ({"ratio": 10.0}, {"top_fraction": 1.0}):
        assert int(L.match_local_descriptors(desc[:, 0], desc[:, 1], att, **kw)[0].sum()) > n, kw


def test_local_triplet_vectorised_equals_per_tuple_reference():
    feats = planted_tuples()
    x1 = feats.clone().requires_grad_()
    x2 = feats.clone().requires_grad_()
    loss_fn = L.LocalTripletLoss(margin=0.1)
    loss = loss_fn(x1, tuple_size=5)
    ref, n_matches = ref_local_triplet(x2, 5)
    assert n_matches >= 10 and loss_fn.last_stats["matches"] == n_matches
    assert loss_fn.last_stats["active"] > 0 and ref.item() > 0
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.backward()
    assert x1.grad.abs().sum() > 0
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ratio, top_fraction, margin", [(0.8, 1.0, 0.5), (0.95, 0.25, 0.2)])
def test_local_triplet_hyperparameters_follow_reference(ratio, top_fraction, margin):
    feats = planted_tuples(n_tuples=2, tuple_size=4, seed=3)
    loss_fn = L.LocalTripletLoss(margin=margin, ratio=ratio, top_fraction=top_fraction, weight=0.05)
    ref, n = ref_local_triplet(feats, 4, margin, ratio, top_fraction, weight=0.05)
    assert n > 0
    torch.testing.assert_close(loss_fn(feats, tuple_size=4), ref, atol=1e-6, rtol=1e-5)
    assert "weight=0.05" in repr(loss_fn)


def test_local_triplet_no_match_gives_connected_zero():
    feats = planted_tuples(n_tuples=1, tuple_size=3).requires_grad_()
    loss_fn = L.LocalTripletLoss(top_fraction=0.0)  # nothing is prominent -> no match
    loss = loss_fn(feats, tuple_size=3)
    assert loss.item() == 0.0 and loss.requires_grad and loss_fn.last_stats["matches"] == 0
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() == 0


def test_local_triplet_explicit_attention_and_bad_batches():
    feats = planted_tuples(n_tuples=2, tuple_size=4, seed=5)
    loss_fn = L.LocalTripletLoss()
    default = loss_fn(feats, tuple_size=4)
    same = loss_fn(feats, tuple_size=4, attention=L.local_attention(feats))
    torch.testing.assert_close(default, same)
    with pytest.raises(ValueError, match="not a whole number of tuples of 3"):
        loss_fn(feats, tuple_size=3)
    with pytest.raises(ValueError, match="B x C x h x w"):
        loss_fn(feats.flatten(2), tuple_size=4)
    with pytest.raises(ValueError, match="attention"):
        loss_fn(feats, tuple_size=4, attention=torch.ones(8, 3, 3))


def test_local_triplet_bf16_autocast_matches_fp32():
    feats = planted_tuples(seed=7)
    loss_fn = L.LocalTripletLoss()
    ref = loss_fn(feats, tuple_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(feats, tuple_size=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------------------------
# AP losses (deep-image-retrieval)
# ----------------------------------------------------------------------------------------------
def brute_force_quantised_ap(x: np.ndarray, label: np.ndarray, nq: int, lo: float, hi: float) -> np.ndarray:
    """The quantised AP formula with explicit triangular bins, in float64 loops."""
    a = (nq - 1) / (hi - lo)
    centres = [hi - i / a for i in range(nq)]
    aps = []
    for row, lab in zip(x, label):
        q = np.zeros((nq, len(row)))
        for i, c in enumerate(centres):
            for m, v in enumerate(row):
                if i == 0 and v >= hi or i == nq - 1 and v <= lo:
                    q[i, m] = 1.0
                else:
                    q[i, m] = max(0.0, 1.0 - a * abs(v - c))
        nbs = q.sum(1)
        rec = (q * lab).sum(1)
        prec = np.cumsum(rec) / (1e-16 + np.cumsum(nbs))
        aps.append(float((prec * rec / rec.sum()).sum()))
    return np.array(aps)


def test_ap_quantizer_bins_sum_to_one():
    for nq, lo, hi in [(25, 0.0, 1.0), (10, -1.0, 1.0)]:
        quant = L.APQuantizer(nq, lo, hi)
        x = torch.linspace(lo, hi, 1001)[None]
        q = quant(x)[0]
        torch.testing.assert_close(q.sum(0), torch.ones(1001), atol=1e-5, rtol=0)
        outside = quant(torch.tensor([[hi + 0.3, lo - 0.3]]))[0]
        assert float(outside[0, 0]) == 1.0 and float(outside[-1, 1]) == 1.0
        assert float(outside[:, 0].sum()) == 1.0 and float(outside[:, 1].sum()) == 1.0
    assert set(L.APLoss().state_dict()) == {"quantizer.weight", "quantizer.bias"}
    assert L.APLoss().state_dict()["quantizer.weight"].shape == (50, 1, 1)
    with pytest.raises(ValueError):
        L.APLoss(nq=1)
    with pytest.raises(ValueError):
        L.APLoss(min=1, max=0)


def test_ap_perfect_ranking_and_brute_force():
    loss_fn = L.APLoss(nq=20)
    x = torch.tensor([[0.95, 0.9, 0.2, 0.1, 0.05]])
    label = torch.tensor([[1, 1, 0, 0, 0]])
    assert float(loss_fn(x, label)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 40, generator=g)
    label = (torch.rand(6, 40, generator=g) < 0.3).float()
    label[:, 0] = 1
    ap = loss_fn.ap(x, label)
    expected = brute_force_quantised_ap(x.double().numpy(), label.numpy(), 20, 0.0, 1.0)
    np.testing.assert_allclose(ap.numpy(), expected, atol=1e-5)
    assert float(loss_fn(x, label)) == pytest.approx(1 - expected.mean(), abs=1e-5)


def test_ap_gradients_finite_and_empty_rows_skipped():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 30, generator=g).requires_grad_()
    label = (torch.rand(4, 30, generator=g) < 0.3).float()
    label[0] = 0  # a query without positives: NaN in the reference
    label[1:, 0] = 1
    for loss_fn in (L.APLoss(), L.TAPLoss(), L.TAPLoss(simplified=True)):
        x.grad = None
        ap = loss_fn.ap(x, label)
        assert torch.isnan(ap[0]) and torch.isfinite(ap[1:]).all()
        loss = loss_fn(x, label)
        assert loss.item() == pytest.approx(1 - ap[1:].mean().item(), abs=1e-6)
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad[1:].abs().sum() > 0
        assert x.grad[0].abs().sum() == 0
    qw = torch.tensor([1.0, 2.0, 0.5, 1.0])
    ap = L.APLoss().ap(x, label)
    assert L.APLoss()(x, label, qw).item() == pytest.approx(1 - (ap[1:] * qw[1:]).mean().item(), abs=1e-6)
    none = L.APLoss()(x, torch.zeros_like(label))
    assert none.item() == 0.0 and none.requires_grad


def test_tap_matches_transcription():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 25, generator=g)
    label = (torch.rand(3, 25, generator=g) < 0.4).float()
    label[:, 0] = 1
    q = L.APQuantizer(25)(x).double()
    c = q.sum(-1)
    cp = (q * label[:, None].double()).sum(-1)
    cc, ccp = c.cumsum(-1), cp.cumsum(-1)
    c1 = torch.cat([torch.zeros(3, 1, dtype=torch.float64), cc[:, :-1]], -1)
    cp1 = torch.cat([torch.zeros(3, 1, dtype=torch.float64), ccp[:, :-1]], -1)
    npos = label.double().sum(-1, keepdim=True)
    simple = (cp * (cp1 + ccp + 1) / (c1 + cc + 1) / npos).sum(-1)
    r = (cp - 1).clamp(min=0) / ((c - 1).clamp(min=0) + 1e-8)
    full = (cp * (c * r + (cp1 + 1 - r * (c1 + 1)) * torch.log((cc + 1) / (c1 + 1))) / (c + 1e-8) / npos).sum(-1)
    torch.testing.assert_close(L.TAPLoss(simplified=True).ap(x, label).double(), simple, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.TAPLoss().ap(x, label).double(), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# cirtorch contrastive / triplet
# ----------------------------------------------------------------------------------------------
def cirtorch_contrastive(x, label, margin=0.7, eps=1e-6):
    """cirtorch.layers.functional.contrastive_loss (x: D x N), transcribed."""
    dim = x.size(0)
    nq = int(torch.sum(label == -1))
    S = x.size(1) // nq
    x1 = x[:, ::S].permute(1, 0).repeat(1, S - 1).view((S - 1) * nq, dim).permute(1, 0)
    idx = [i for i in range(len(label)) if label[i] != -1]
    x2 = x[:, idx]
    lbl = label[label != -1]
    D = torch.pow(x1 - x2 + eps, 2).sum(dim=0).sqrt()
    y = 0.5 * lbl * torch.pow(D, 2) + 0.5 * (1 - lbl) * torch.pow(torch.clamp(margin - D, min=0), 2)
    return torch.sum(y)


def cirtorch_triplet(x, label, margin=0.1):
    dim = x.size(0)
    nq = int(torch.sum(label == -1))
    S = x.size(1) // nq
    xa = x[:, label == -1].permute(1, 0).repeat(1, S - 2).view((S - 2) * nq, dim).permute(1, 0)
    xp = x[:, label == 1].permute(1, 0).repeat(1, S - 2).view((S - 2) * nq, dim).permute(1, 0)
    xn = x[:, label == 0]
    return torch.sum(torch.clamp((xa - xp).pow(2).sum(0) - (xa - xn).pow(2).sum(0) + margin, min=0))


def test_contrastive_and_triplet_match_cirtorch():
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(3 * 6, 8, generator=g), dim=1).requires_grad_()
    label = torch.tensor([-1, 1, 0, 0, 0, 0] * 3)
    cols = rows.detach().t().clone().requires_grad_()
    for ours, theirs, margin in ((L.ContrastiveLoss, cirtorch_contrastive, 1.3), (L.TripletLoss, cirtorch_triplet, 0.5)):
        rows.grad = None
        cols.grad = None
        a = ours(margin=margin)(rows, tuple_size=6)
        b = theirs(cols, label, margin=margin)
        assert b.item() > 0
        torch.testing.assert_close(a, b)
        a.backward()
        b.backward()
        torch.testing.assert_close(rows.grad, cols.grad.t())
    converted, size = L.tuples_from_cirtorch(cols.detach(), label)
    assert size == 6 and torch.equal(converted, rows.detach())
    with pytest.raises(ValueError, match="labels must repeat"):
        L.tuples_from_cirtorch(cols.detach(), label.flip(0))
    with pytest.raises(ValueError, match="tuple_size"):
        L.TripletLoss()(rows, tuple_size=2)
    assert L.ContrastiveLoss()(rows[:4], tuple_size=2).item() > 0  # [q, p] pairs are allowed
