"""Every loss and model gives the same values and gradients for channels_last / non-contiguous
inputs as for contiguous ones, in fp32 and under bf16 autocast, and never writes into its input.

The trainer puts models in channels_last on CUDA; these tests run the same layouts on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cfcd.losses as L
import cfcd.models as M
from test_losses import planted_tuples, ref_local_triplet

CL = torch.channels_last


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# CFCD stage-2 local triplet loss
# ----------------------------------------------------------------------------------------------
def _local_grad(base: torch.Tensor, memory_format, dtype=torch.float32):
    """The trainer's path: a ReLU'd feature map (autograd saves the ReLU output), cast to fp32."""
    x = base.detach().to(dtype).clone().contiguous(memory_format=memory_format).requires_grad_()
    fmap = x.relu()
    assert fmap.is_contiguous(memory_format=memory_format)
    before = fmap.detach().clone()
    loss = L.LocalTripletLoss()(fmap.float(), tuple_size=5)
    assert torch.equal(fmap.detach(), before), "the loss wrote into its input"
    loss.backward()
    return loss.detach(), x.grad.float()


def test_local_triplet_channels_last_fp32_equals_contiguous_and_reference():
    # Before the fix: "modified by an inplace operation" in backward (the ReLU output).
    base = planted_tuples(seed=11)
    loss_c, grad_c = _local_grad(base, torch.contiguous_format)
    loss_l, grad_l = _local_grad(base, CL)
    ref_x = base.clone().requires_grad_()
    ref, n = ref_local_triplet(ref_x.relu(), 5)  # CFCD core/losses/super_loss.py, transcribed
    ref.backward()
    assert n > 0 and grad_c.abs().sum() > 0
    assert abs(loss_l.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(grad_l, ref_x.grad) < 1e-5
    assert _rel(grad_l, grad_c) < 1e-6


def test_local_triplet_channels_last_bf16_gradient_is_not_scaled():
    # Before the fix the bf16 gradient came out ||x|| times too large, silently.
    base = planted_tuples(seed=12)
    loss_c, grad_c = _local_grad(base, torch.contiguous_format, torch.bfloat16)
    loss_l, grad_l = _local_grad(base, CL, torch.bfloat16)
    assert grad_c.abs().sum() > 0
    assert abs(loss_l.item() - loss_c.item()) <= 1e-5 * abs(loss_c.item())
    assert _rel(grad_l, grad_c) < 1e-5


def test_local_triplet_under_autocast_on_a_channels_last_conv():
    """bf16 autocast of a channels_last conv (the trainer's default on CUDA) vs contiguous."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 12, 3, padding=1)
    inp = torch.rand(10, 6, 5, 5)
    grads = []
    for fmt in (torch.contiguous_format, CL):
        c = copy.deepcopy(conv).to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fmap = c(inp.contiguous(memory_format=fmt)).relu()
        loss = L.LocalTripletLoss(margin=0.5, ratio=0.99, top_fraction=1.0)(fmap.float(), tuple_size=5)
        loss.backward()
        grads.append((loss.detach(), c.weight.grad.clone()))
    assert grads[0][1].abs().sum() > 0
    assert abs(grads[1][0].item() - grads[0][0].item()) <= 1e-3 * abs(grads[0][0].item())
    assert _rel(grads[1][1], grads[0][1]) < 1e-2  # bf16 conv kernels of two layouts round differently


# ----------------------------------------------------------------------------------------------
# Losses on 2-D inputs: non-contiguous views (transposed, strided) and bf16
# ----------------------------------------------------------------------------------------------
def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` (N x D) in a transposed, non-contiguous view."""
    return t.t().contiguous().t()


def _loss_cases():
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(12, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (12,), generator=g)
    scores = torch.rand(4, 30, generator=g) * 2 - 1
    rel = (torch.rand(4, 30, generator=g) < 0.3).float()
    rel[:, 0] = 1
    tuples = F.normalize(torch.randn(3 * 6, 16, generator=g), dim=1)
    yield "madacos", lambda: L.MadaCos(16, 5), emb, (labels,)
    yield "arcface", lambda: L.ArcFace(16, 5), emb, (labels,)
    yield "cosface", lambda: L.CosFace(16, 5), emb, (labels,)
    yield "curricularface", lambda: L.CurricularFace(16, 5), emb, (labels,)
    yield "ap", lambda: L.APLoss(), scores, (rel,)
    yield "tap", lambda: L.TAPLoss(), scores, (rel,)
    yield "ap_dist", lambda: L.APLossDist(), scores, (rel,)
    yield "tap_dist", lambda: L.TAPLossDist(), scores, (rel,)
    yield "contrastive", lambda: L.ContrastiveLoss(margin=1.3), tuples, (6,)
    yield "triplet", lambda: L.TripletLoss(margin=0.5), tuples, (6,)
    yield "triplet_logexp", lambda: L.TripletLogExpLoss(), tuples, (6,)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(_loss_cases()), ids=lambda c: c[0])
def test_losses_on_views_equal_contiguous(case, autocast):
    name, make, x, args = case
    torch.manual_seed(0)
    loss_fn = make()
    results = []
    for view in (lambda t: t.clone(), _noncontiguous):
        fn = copy.deepcopy(loss_fn).train()
        leaf = x.clone().requires_grad_()
        inp = view(leaf.relu() if name in ("ap", "tap", "ap_dist", "tap_dist") else leaf * 1.0)
        before = inp.detach().clone()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = fn(inp, *args)
        assert torch.equal(inp.detach(), before), f"{name} wrote into its input"
        loss.backward()
        results.append((loss.detach(), leaf.grad.clone()))
    (l0, g0), (l1, g1) = results
    assert g0.abs().sum() > 0, name
    assert abs(l1.item() - l0.item()) <= 1e-5 * max(abs(l0.item()), 1e-6)
    assert _rel(g1, g0) < 1e-5


# ----------------------------------------------------------------------------------------------
# Models: channels_last model and input vs contiguous, fp32 and bf16 (values and gradients)
# ----------------------------------------------------------------------------------------------
MODELS = [
    ("cfcd_r50", {"backbone": "resnet18"}),
    ("dolg_r50", {"backbone": "resnet18", "with_aspp": True}),
    ("gem_resnet18", {"whitening": "dirtorch", "out_dim": 64}),
    ("gem_resnet18", {"pooling": "rmac"}),
]


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                elif name.endswith("running_mean"):
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))
                elif name.endswith("pool.p"):
                    continue
                else:
                    t.add_(0.01 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, kwargs", MODELS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in MODELS])
def test_models_channels_last_equal_contiguous(name, kwargs, autocast, real_photos):
    base = _randomise(M.create(name, **kwargs, weights="random"), 0)
    photo = torch.from_numpy(real_photos["coffee"][::12, ::12].copy()).permute(2, 0, 1).float() / 255
    x = torch.stack([photo, photo.flip(2)])
    out = []
    for fmt in (torch.contiguous_format, CL):
        model = copy.deepcopy(base).to(memory_format=fmt)
        inp = x.detach().clone().contiguous(memory_format=fmt).requires_grad_()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            feats = model.forward_features(inp)
        g = F.normalize(feats["global"].float(), dim=1)
        loss = (g * torch.linspace(-1, 1, g.shape[1])).sum() + feats["local"].float().square().mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out.append((g.detach(), inp.grad.clone(), grads))
    (g0, i0, p0), (g1, i1, p1) = out
    cos = F.cosine_similarity(g0, g1, dim=1).min().item()
    tol = 1e-2 if autocast else 1e-4  # bf16 conv kernels of two layouts round differently on the CPU
    assert cos >= (0.999 if autocast else 0.99999)
    assert _rel(i1, i0) < tol and _rel(p1, p0) < tol
