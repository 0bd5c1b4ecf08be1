"""cfcd against transcriptions of cirtorch and dirtorch lines (tests/_reference_cirtorch.py,
tests/_reference_dirtorch.py) on real photos and fixed random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _reference_cirtorch as cir
import _reference_dirtorch as dirt
import cfcd.losses as L
import cfcd.models as M
from _models_helpers import official_dirtorch
from cfcd.extract import ExtractOptions, Extractor, MultiScale, parse_scales

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def gem_net():
    """GeM ResNet-18 with fixed random weights (no whitening): the net cirtorch's msp applies to."""
    torch.manual_seed(0)
    model = M.create("gem_resnet18", weights="random")
    with torch.no_grad():
        model.pool.p.fill_(2.8)
    return model


def _photos(real_photos, names=("coffee", "chelsea")):
    out = []
    for n in names:
        im = real_photos[n]
        out.append(np.ascontiguousarray(im[:: max(1, im.shape[0] // 100), :: max(1, im.shape[0] // 100)]))
    return out


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _extract(model, images, recipe, mode):
    opts = ExtractOptions(scales=recipe, workers=0, mode=mode)
    return Extractor(model, opts).describe_arrays(images)


# ----------------------------------------------------------------------------------------------
# 1. multi-scale power mean: cirtorch's (no clamp) under --scales cirtorch, dirtorch's sympow under dirtorch
# ----------------------------------------------------------------------------------------------
def test_cirtorch_multiscale_power_mean_equals_extract_ms(gem_net, real_photos):
    msp = gem_net.pool.p.item()  # test.py l.138: msp = net.pool.p for a GeM net without whitening
    recipe = parse_scales("cirtorch", power=msp)
    images = _photos(real_photos)
    fast, naive = _extract(gem_net, images, recipe, "fast"), _extract(gem_net, images, recipe, "naive")
    for i, im in enumerate(images):
        x = dirt.to_tensor_normalize(im, MEAN, STD)
        with torch.no_grad():
            ref = cir.extract_ms(lambda t: gem_net(t).t(), x, [1, 1 / 2 ** 0.5, 1 / 2], msp).numpy()
        assert _cos(fast[i], ref) >= 0.99999 and _cos(naive[i], ref) >= 0.99999


def test_power_rules_on_fixed_descriptors():
    """Fixed descriptors with many components below 1e-6^(1/p): the clamp matters there."""
    from cfcd.extract.describe import _power

    g = torch.Generator().manual_seed(0)
    v = [F.normalize(torch.rand(1, 256, generator=g) ** 6, dim=1) for _ in range(3)]
    p = 2.8
    # cirtorch extract_ms l.318-322 on these vectors
    ref_cir = (sum(t.pow(p) for t in v) / 3).pow(1 / p)
    ours_cir = _power(sum(_power(t, p, "cirtorch") for t in v) / 3, 1 / p, "cirtorch")
    assert F.cosine_similarity(ours_cir, ref_cir).item() >= 0.99999
    ref_dir = dirt.pool([t for t in v], "gem", p)  # dirtorch common.py pool
    ours_dir = _power(sum(_power(t, p, "dirtorch") for t in v) / 3, 1 / p, "dirtorch")
    assert F.cosine_similarity(ours_dir, ref_dir).item() >= 0.99999
    assert 1 - F.cosine_similarity(ref_cir, ref_dir).item() > 1e-4  # the two peers really differ here


def test_dirtorch_power_mean_keeps_its_clamp(gem_net, real_photos):
    recipe = MultiScale((300, 200), "power", 3.0, "largest", True, "x", power_rule="dirtorch", resample="pil")
    im = _photos(real_photos, ("astronaut",))[0]
    got = _extract(gem_net, [im], recipe, "fast")[0]
    ref = dirt.eval_descriptors(gem_net, im, [dirt.Scale(300, largest=True), dirt.Scale(200, largest=True)],
                                MEAN, STD, "gem", 3).numpy()
    assert _cos(got, ref) >= 0.99999


# ----------------------------------------------------------------------------------------------
# 2. dirtorch resizing: Scale(S, largest=True) on the original uint8 image, Pillow bilinear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(480, 640), (1024, 700), (20, 1000), (400, 400)])
def test_dirtorch_scale_sizes(hw):
    from PIL import Image

    recipe = parse_scales("dirtorch")
    for size in (1024, 724, 300):
        h, w = hw
        ref = dirt.Scale(size, largest=True)(Image.new("RGB", (w, h))).size
        assert recipe.target_size(h, w, size) == (ref[1], ref[0])


def test_dirtorch_preset_equals_dirtorch_on_real_photos(gem_net, real_photos):
    recipe = parse_scales("dirtorch")
    assert recipe.scales == (1024, 724) and recipe.resample == "pil"
    # one photo at an odd size (upscaled to 1024 / 724), another one shrunk by a custom pair
    im = _photos(real_photos, ("coffee",))[0]
    chains = [dirt.Scale(1024, largest=True), dirt.Scale(724, largest=True)]
    ref = dirt.eval_descriptors(gem_net, im, chains, MEAN, STD).numpy()
    assert _cos(_extract(gem_net, [im], recipe, "fast")[0], ref) >= 0.99999
    small = MultiScale((120, 90), "power", 3.0, "largest", True, "x", power_rule="dirtorch", resample="pil")
    ims = _photos(real_photos, ("chelsea", "rocket"))
    got = _extract(gem_net, ims, small, "fast")
    naive = _extract(gem_net, ims, small, "naive")
    for g, n, im in zip(got, naive, ims):
        r = dirt.eval_descriptors(gem_net, im, [dirt.Scale(120, largest=True), dirt.Scale(90, largest=True)], MEAN, STD)
        assert _cos(g, r.numpy()) >= 0.99999 and _cos(n, r.numpy()) >= 0.99999


def test_flip_adds_the_mirrored_view(gem_net, real_photos):
    im = _photos(real_photos, ("chelsea",))[0]
    flip = parse_scales("single", flip=True)
    got = _extract(gem_net, [im], flip, "fast")[0]
    naive = _extract(gem_net, [im], flip, "naive")[0]
    views = [_extract(gem_net, [v], parse_scales("single"), "naive")[0] for v in (im, im[:, ::-1].copy())]
    expected = (views[0] + views[1]) / 2
    assert _cos(got, expected) >= 0.99999 and _cos(naive, expected) >= 0.99999


# ----------------------------------------------------------------------------------------------
# 3./4. dirtorch checkpoints: stored PCA whitening applied by name; without_fc imported
# ----------------------------------------------------------------------------------------------
def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("pool.p"):
                t.add_(0.01 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model


def test_dirtorch_stored_whitening_reproduces_whiten_features(tmp_path, real_photos, capsys):
    from sklearn.decomposition import PCA

    from cfcd.cli import main
    from cfcd.store import open_store

    model = _perturbed(M.create("gem_resnet18", whitening="dirtorch", out_dim=32, weights="random"), 3)
    photos = [_photos(real_photos, (n,))[0] for n in ("coffee", "chelsea", "rocket")]
    train = np.random.default_rng(0).standard_normal((200, 32)) + 0.3
    pca = PCA(whiten=True).fit(train)
    ckpt = tmp_path / "Resnet18-AP-GeM.pt"
    torch.save(official_dirtorch(model, pca=pca, arch="resnet18_rmac"), ckpt)
    out = tmp_path / "converted"
    assert main(["convert", str(ckpt), "--out", str(out)]) == 0
    assert (out / "whitening" / "Landmarks_clean.safetensors").is_file()
    info = json.loads((out / "whitening" / "Landmarks_clean.json").read_text())
    assert info["kind"] == "pca" and info["whitenp"] == 0.0

    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, im in enumerate(photos):
        Image.fromarray(im).save(img_dir / f"im{i}.png")
    store = tmp_path / "store"
    args = ["extract", "--model", "gem_resnet18", "--weights", str(out), "--images", str(img_dir), "--out", str(store),
            "--scales", "single", "--device", "cpu", "--workers", "0", "--no-progress",
            "--whiten", "Landmarks_clean", "--whiten-power", "0.25"]
    assert main(args) == 0
    got = open_store(store)
    raw = open_store(str(store) + ".unwhitened")
    assert got.meta["whitening"]["whitenp"] == 0.25
    # dirtorch: test_dir.py l.121 F.normalize(pool(...)), l.137 whiten_features(X, net.pca, whitenp=0.25)
    with torch.no_grad():
        x = np.stack([F.normalize(model(dirt.to_tensor_normalize(im, MEAN, STD)), dim=1)[0].numpy() for im in photos])
    ref = dirt.whiten_features(x.astype(np.float64), pca, whitenp=0.25)
    order = [int(i[2:]) for i in got.ids]
    for row, k in zip(np.asarray(got.descriptors), order):
        assert _cos(row, ref[k]) >= 0.99999
    for row, k in zip(np.asarray(raw.descriptors), order):
        assert _cos(row, x[k]) >= 0.99999
    # the same whitening applied by cfcd evaluate's resolver (looked up beside the store's weights)
    from cfcd.postprocess import resolve_whitening

    w = resolve_whitening("Landmarks_clean", power=0.25, weights=raw.meta["weights"])
    assert np.allclose(w.transform(np.asarray(raw.descriptors)), np.asarray(got.descriptors), atol=1e-6)
    import argparse

    from cfcd.cli.evaluate import _whitening

    w2 = _whitening(argparse.Namespace(whiten="Landmarks_clean", whiten_power=0.25, queries=str(store) + ".unwhitened"))
    assert np.allclose(w2.transform(np.asarray(raw.descriptors)), np.asarray(got.descriptors), atol=1e-6)
    with pytest.raises(Exception, match="no whitening file"):
        resolve_whitening("Paris_clean", weights=out)


def test_dirtorch_checkpoint_without_fc(tmp_path, real_photos):
    model = _perturbed(M.create("gem_resnet18", weights="random"), 4)
    with torch.no_grad():
        model.pool.p.fill_(3.0)
    # dirtorch creates self.fc anyway (rmac_resnet.py l.34): the checkpoint holds an unused FC
    fc_owner = M.create("gem_resnet18", whitening="dirtorch", out_dim=512, weights="random")
    fc_owner.load_state_dict(model.state_dict(), strict=False)
    ckpt = official_dirtorch(fc_owner, arch="resnet18_rmac")
    ckpt["model_options"]["without_fc"] = True
    path = tmp_path / "nofc.pt"
    torch.save(ckpt, path)
    loaded = M.create("gem_resnet18", weights=path)
    assert loaded.model_config["kwargs"]["whitening"] is None
    assert set(loaded.load_report.extra) >= {"unused_fc.weight", "unused_fc.bias"}
    im = _photos(real_photos, ("chelsea",))[0]
    x = dirt.to_tensor_normalize(im, MEAN, STD)
    with torch.no_grad():
        # ResNet_RMAC.forward with without_fc: GeM -> (no fc) -> l2_normalize
        fmap = model.backbone.forward_features(x)
        ref = F.normalize(fmap.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1 / 3.0), dim=-1)
        assert F.cosine_similarity(loaded(x), ref).item() >= 0.99999


# ----------------------------------------------------------------------------------------------
# dirtorch distance losses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [(L.APLossDist, dirt.APLoss_dist), (L.TAPLossDist, dirt.TAPLoss_dist)])
def test_distance_ap_losses_equal_dirtorch(ours, theirs):
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(24, 16, generator=g), dim=1)
    labels = torch.arange(24) // 4
    scores = emb[:6] @ emb.t()
    rel = (labels[:6, None] == labels[None]).float()
    a = scores.clone().requires_grad_()
    b = scores.clone().requires_grad_()
    la, lb = ours(nq=20, min=-1.0, max=1.0)(a, rel), theirs(nq=20, min=-1, max=1)(b, rel)
    assert abs(la.item() - lb.item()) <= 1e-5 * abs(lb.item())
    la.backward()
    lb.backward()
    assert float((a.grad - b.grad).norm() / b.grad.norm()) < 1e-5


@pytest.mark.parametrize("swap", [False, True])
def test_triplet_logexp_equals_dirtorch(swap):
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(3 * 5, 8, generator=g), dim=1)
    t = x.reshape(3, 5, 8)
    a = t[:, :1].expand(-1, 3, -1).reshape(-1, 8)
    p = t[:, 1:2].expand(-1, 3, -1).reshape(-1, 8)
    n = t[:, 2:].reshape(-1, 8)
    x1 = x.clone().requires_grad_()
    ours = L.TripletLogExpLoss(swap=swap)(x1, tuple_size=5)
    x2 = x.clone().requires_grad_()
    t2 = x2.reshape(3, 5, 8)
    ref = dirt.TripletLogExpLoss(swap=swap)(t2[:, :1].expand(-1, 3, -1).reshape(-1, 8),
                                            t2[:, 1:2].expand(-1, 3, -1).reshape(-1, 8), t2[:, 2:].reshape(-1, 8))
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    ours.backward()
    ref.backward()
    assert float((x1.grad - x2.grad).norm() / x2.grad.norm()) < 1e-5
    assert torch.allclose(L.TripletLogExpLoss(swap=swap).triplets(a, p, n), ref.detach(), rtol=1e-6)
