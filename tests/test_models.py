"""Models: registry, pooling formulas, architecture details, preprocessing, embedded weights on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cfcd.models as M
from cfcd.errors import CfcdError
from cfcd.models.pooling import GeM, MAC, RMAC, SPoC, l2n, rmac_regions

G = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 64, 64, generator=G)


def test_registry_names_and_errors():
    names = M.list_models()
    for required in ["cfcd_r50", "cfcd_r101", "dolg_r50", "dolg_r101", "gem_r50", "gem_r101",
                     "gem_efficientnet_lite0", "gem_efficientnet_lite1", "gem_efficientnet_lite2", "gem_timm"]:
        assert required in names
    assert M.DEFAULT_MODEL == "gem_efficientnet_lite2"
    with pytest.raises(CfcdError, match="unknown model 'nope'"):
        M.create("nope")
    with pytest.raises(CfcdError, match="no embedded weights"):
        M.create("gem_resnet18", pretrained=True)
    with pytest.raises(CfcdError, match="cannot build"):
        M.create("gem_timm", backbone="resnet18", whitening="bogus", weights="random")


def test_random_weights_only_when_asked():
    # no weights and nothing embedded: refused, with the way out in the message
    with pytest.raises(CfcdError, match=r"cfcd_r50 has no embedded weights.*weights='random'"):
        M.create("cfcd_r50")
    with pytest.raises(CfcdError, match="contradicts"):
        M.create("gem_resnet18", weights="random", pretrained=True)
    a = M.create("gem_resnet18", weights="random")
    b = M.create("gem_resnet18", pretrained=False)  # timm's spelling is explicit too
    assert a.embedding_dim == b.embedding_dim == 512
    assert "gem_efficientnet_lite0" in M.embedded_models() and "cfcd_r50" not in M.embedded_models()


def test_gem_timm_pattern_and_config_roundtrip():
    model = M.create("gem_resnet18", pooling="mac", weights="random")
    assert model.embedding_dim == 512 and isinstance(model.pool, MAC)
    again = M.create(model.model_config["name"], **model.model_config["kwargs"], weights="random")
    assert [k for k in again.state_dict()] == [k for k in model.state_dict()]
    by_kwarg = M.create("gem_timm", backbone="resnet18", weights="random")
    assert by_kwarg.model_config["kwargs"]["backbone"] == "resnet18"
    assert not model.training  # create() returns eval mode


def test_gem_formula_fixed_learnable_and_per_channel():
    x = torch.rand(2, 5, 4, 6, generator=G)
    x[0, 0, 0, 0] = 0.0  # clamped to eps
    ref = x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(GeM(3.0)(x), ref, atol=1e-7)
    learn = GeM(3.0, learnable=True)
    assert torch.allclose(learn(x), ref, atol=1e-6)
    assert "p" in dict(learn.named_parameters()) and "p" not in dict(GeM(3.0).named_parameters())
    learn(x).sum().backward()
    assert learn.p.grad is not None and torch.isfinite(learn.p.grad).all()
    mp = GeM(3.0, per_channel=5)
    mp.p.data = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expect = torch.stack([x[:, c].clamp(min=1e-6).pow(p).mean(dim=(1, 2)).pow(1 / p)
                          for c, p in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])], dim=1)
    assert torch.allclose(mp(x), expect, atol=1e-6)
    assert torch.allclose(MAC()(x), x.flatten(2).max(dim=2).values)
    assert torch.allclose(SPoC()(x), F.avg_pool2d(x, (4, 6)).flatten(1))


def test_rmac_region_grid_matches_cirtorch_example():
    regions = rmac_regions(24, 32)
    assert len(regions) == 20
    assert [r for r in regions if r[2] == 24] == [(0, 0, 24), (0, 8, 24)]
    assert [r for r in regions if r[2] == 16] == [(y, x, 16) for y in (0, 8) for x in (0, 8, 16)]
    assert [r for r in regions if r[2] == 12] == [(y, x, 12) for y in (0, 6, 12) for x in (0, 6, 13, 20)]
    assert rmac_regions(10, 10)[0] == (0, 0, 10)  # square: level 1 repeats the global region
    assert [r[:2] for r in rmac_regions(32, 24) if r[2] == 24] == [(0, 0), (8, 0)]  # portrait: along H


def test_rmac_value_is_sum_of_normalised_region_maxima():
    x = torch.rand(1, 3, 24, 32, generator=G)
    expect = l2n(x.amax(dim=(2, 3)))
    for y, x0, s in rmac_regions(24, 32):
        expect = expect + l2n(x[:, :, y:y + s, x0:x0 + s].amax(dim=(2, 3)))
    assert torch.allclose(RMAC()(x), expect, atol=1e-6)
    assert M.create("gem_resnet18", pooling="rmac", weights="random")(X).shape == (2, 512)


def test_cfcd_forward_is_bn_fc_gem_of_stage4():
    model = M.create("cfcd_r50", weights="random")
    assert model.preprocess.channel_order == "BGR" and model.preprocess.mean == (0.406, 0.456, 0.485)
    assert model.embedding_dim == 512 and "pool.p" not in model.state_dict()
    with torch.no_grad():
        out = model.forward_features(X)
        f4 = model.backbone.forward_features(X)
        gem = f4.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        expect = model.bn(model.fc(gem))
        y = model(X)
    assert torch.equal(out["local"], f4) and out["local"].shape == (2, 2048, 2, 2)
    assert torch.allclose(out["global"], expect, atol=1e-5)
    assert torch.allclose(y, F.normalize(out["global"], dim=1)) and torch.allclose(y.norm(dim=1), torch.ones(2))


def _dolg_reference(model, x):
    """Literal transcription of feymanpriv/DOLG DOLG.forward (global_feature)."""
    bb = model.backbone
    h = bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))
    f3 = bb.layer3(bb.layer2(bb.layer1(h)))
    f4 = bb.layer4(f3)
    loc = model.local
    z = loc.bn(loc.conv1(loc.aspp(f3) if loc.aspp is not None else f3))
    fmap = F.normalize(z, p=2, dim=1)
    att = F.softplus(loc.conv2(F.relu(z)), beta=1, threshold=20)
    fl = att.expand_as(fmap) * fmap
    p = model.pool.p
    fg_o = F.adaptive_avg_pool2d(f4.clamp(min=1e-6).pow(p), 1).pow(1.0 / p).view(x.size(0), -1)
    fg = model.fc_t(fg_o)
    fg_norm = torch.norm(fg, p=2, dim=1)
    proj = torch.bmm(fg.unsqueeze(1), torch.flatten(fl, start_dim=2))
    proj = torch.bmm(fg.unsqueeze(2), proj).view(fl.size())
    proj = proj / (fg_norm * fg_norm).view(-1, 1, 1, 1)
    fo = F.adaptive_avg_pool2d(fl - proj, 1).view(x.size(0), -1)
    return model.fc(torch.cat((fg, fo), 1)), fg, fo


@pytest.mark.parametrize("kwargs", [{}, {"backbone": "resnet18", "learnable_p": True, "with_aspp": True}])
def test_dolg_matches_original_forward_and_fusion_is_orthogonal(kwargs):
    model = M.create("dolg_r50", **kwargs, weights="random")
    torch.nn.init.normal_(model.fc_t.weight, std=0.05)
    with torch.no_grad():
        ref, fg, fo = _dolg_reference(model, X)
        out = model.forward_features(X)
    assert torch.allclose(out["global"], ref, atol=1e-4)
    assert out["local"].shape == (2, 256 if kwargs else 1024, 4, 4)  # stage 3, stride 16
    cos = F.cosine_similarity(fg, fo, dim=1)
    assert cos.abs().max() < 1e-4  # fo is orthogonal to fg
    assert ("pool.p" in model.state_dict()) == bool(kwargs.get("learnable_p"))
    assert ("local.aspp.aspp.3.weight" in model.state_dict()) == bool(kwargs.get("with_aspp"))
    if kwargs.get("with_aspp"):
        assert [c.dilation for c in model.local.aspp.aspp] == [(1, 1), (6, 6), (12, 12), (18, 18)]


def test_dolg_cfcd_copy_has_bn():
    model = M.create("dolg_r50", backbone="resnet18", with_bn=True, weights="random")
    assert "bn.running_var" in model.state_dict() and model(X).shape == (2, 512)


def test_preprocess_orders_and_normalises():
    rgb = torch.rand(1, 3, 4, 4, generator=G)
    bgr_model = M.create("cfcd_r50", weights="random").preprocess
    expect = (rgb.flip(1) - torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)) / torch.tensor(
        [0.225, 0.224, 0.229]).view(1, 3, 1, 1)
    assert torch.allclose(bgr_model(rgb), expect)
    assert M.Preprocess.from_dict(bgr_model.to_dict()) == bgr_model
    with pytest.raises(ValueError):
        M.Preprocess("BRG")


def test_channels_last_and_bf16_autocast():
    model = M.create("dolg_r50", backbone="resnet18", with_aspp=True, weights="random")
    with torch.no_grad():
        ref = model(X)
        cl = model.to(memory_format=torch.channels_last)(X.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(X)
    assert torch.allclose(cl, ref, atol=1e-5)
    assert bf.dtype == torch.float32 and (F.cosine_similarity(bf, ref) > 0.99).all()


# ---------------------------------------------------------------------------------------- real photos


def _photo(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("variant", [0, 2])
def test_embedded_efficientnet_lite_classifies_coffee_as_espresso(variant):
    from skimage import data

    from cfcd.models._compat import import_timm
    from cfcd.models.efficientnet_lite import NATIVE_SIZE, load_imagenet_efficientnet_lite

    net = import_timm().create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    assert load_imagenet_efficientnet_lite(net, variant) == {}  # the classifier mapped too
    size = NATIVE_SIZE[variant]
    with torch.no_grad():
        logits = net((_photo(data.coffee(), (size, size)) - 0.5) / 0.5)
    assert int(logits.argmax()) == 967  # ImageNet "espresso"


def test_embedded_mapping_refuses_another_variant():
    from cfcd.models._compat import import_timm
    from cfcd.models.efficientnet_lite import load_embedded_state, map_efficientnet_lite_state

    timm = import_timm()
    source = load_embedded_state(0)
    with pytest.raises(CfcdError, match="not the same EfficientNet-Lite variant"):
        map_efficientnet_lite_state(source, timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped, head = map_efficientnet_lite_state(source, target)
    assert len(mapped) == len([k for k in target if not k.endswith("num_batches_tracked")]) and head == {}
    target["blocks.1.0.conv_pw.weight"] = torch.zeros(1)
    with pytest.raises(CfcdError, match="1 shape mismatches.*blocks.1.0.conv_pw.weight"):
        map_efficientnet_lite_state(source, target)
    with pytest.raises(CfcdError, match="lite0, lite1 and lite2"):
        load_embedded_state(3)


def test_gem_descriptor_matches_flipped_resized_copy_better_than_other_photo():
    from skimage import data
    from sklearn.datasets import load_sample_images

    model = M.create("gem_efficientnet_lite0")  # embedded weights by default
    assert model.embedding_dim == 1280 and model.preprocess.input_size == 224
    coffee = data.coffee()
    other = load_sample_images().images[0]  # china.jpg
    with torch.no_grad():
        a = model(model.preprocess(_photo(coffee, (224, 336))))
        b = model(model.preprocess(_photo(coffee[:, ::-1], (160, 240))))  # flipped and resized
        c = model(model.preprocess(_photo(other, (224, 320))))
    same, different = float(a @ b.T), float(a @ c.T)
    assert same > different + 0.1, (same, different)
    assert abs(float(a.norm()) - 1) < 1e-5


def test_cfcd_models_lists_every_model(capsys):
    import json

    from cfcd.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(M.list_models()) <= set(rows)
    assert rows["cfcd_r50"]["dim"] == 512 and rows["cfcd_r50"]["channel_order"] == "BGR"
    assert not rows["cfcd_r50"]["embedded_weights"]
    lite = rows["gem_efficientnet_lite2"]
    assert lite["embedded_weights"] and lite["dim"] == 1280 and lite["mean"] == [0.5] * 3 and lite["input_size"] == 260
    assert all(r["description"] for r in rows.values())
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gem_efficientnet_lite2 (default)" in out and "embedded" in out and "--weights random" in out


def test_cfcd_models_formats_lists_every_checkpoint_format_in_detection_order(capsys):
    import json

    from cfcd.cli import main
    from cfcd.cli.convert import FORMATS
    from cfcd.models.checkpoints import detect_format

    assert main(["models", "--formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert set(names) | {a for r in rows for a in r["aliases"]} | {"auto"} == set(FORMATS)
    assert [r["priority"] for r in rows] == sorted(r["priority"] for r in rows) and all(r["description"] for r in rows)
    # the order is what makes a DOLG file (which has fc_t and globalmodel) a dolg, not a cfcd, checkpoint
    assert names.index("dolg") < names.index("cfcd") < names.index("pycls")
    dolg_keys = {"globalmodel.stem.conv.weight": None, "fc_t.weight": None, "fc.weight": None}
    assert detect_format(dolg_keys) == "dolg" and detect_format({"globalmodel.stem.conv.weight": None}) == "cfcd"
    assert main(["models", "--formats"]) == 0
    assert "torchvision (also: timm)" in capsys.readouterr().out


def test_families_carry_their_query_crop_rule():
    from cfcd.cli.extract import default_crop_rule

    assert [M.get_entry(n).crop_rule for n in ("cfcd_r50", "dolg_r101", "gem_r50")] == ["truncate", "truncate", "round"]
    M.register_model("crop_rule_test_net", lambda: None, family="test", crop_rule="truncate",
                     description="test-only entry")
    assert default_crop_rule("crop_rule_test_net") == "truncate"  # by registration, not by name prefix
    with pytest.raises(ValueError, match="crop_rule"):
        M.register_model("crop_rule_bad", lambda: None, family="test", crop_rule="floor")
