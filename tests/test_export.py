"""ONNX export, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

import cfcd.models as M
from cfcd.errors import CfcdError
from cfcd.models.export import export_onnx, onnx_max_abs_diff

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_cli_exports_embedded_lite0_at_224(tmp_path, capsys):
    from cfcd.cli import main

    out = tmp_path / "lite0.onnx"
    assert main(["export", "--model", "gem_efficientnet_lite0", "--onnx", str(out)]) == 0  # native 224, checked
    printed = capsys.readouterr().out
    assert "1x3x224x224" in printed and "max abs diff" in printed
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["preprocess"])["mean"] == [0.5, 0.5, 0.5] and meta["embedding_dim"] == "1280"
    model = M.create("gem_efficientnet_lite0")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert onnx_max_abs_diff(model, out, x) < 1e-4


def test_dynamic_export_of_cfcd_runs_at_other_sizes(tmp_path):
    model = M.create("cfcd_r50", backbone="resnet18", weights="random")
    path = export_onnx(model, tmp_path / "cfcd.onnx", size=(64, 64), dynamic=True)
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128)]:
        assert onnx_max_abs_diff(model, path, torch.randn(*shape, generator=g)) < 1e-4


def test_fixed_export_of_dolg_with_learnable_p(tmp_path):
    model = M.create("dolg_r50", backbone="resnet18", learnable_p=True, weights="random")
    path = export_onnx(model, tmp_path / "dolg.onnx", size=(64, 96))
    assert onnx_max_abs_diff(model, path, torch.randn(1, 3, 64, 96)) < 1e-4


def test_rmac_refuses_dynamic_export(tmp_path):
    model = M.create("gem_resnet18", pooling="rmac", weights="random")
    with pytest.raises(CfcdError, match="R-MAC"):
        export_onnx(model, tmp_path / "rmac.onnx", dynamic=True)
    path = export_onnx(model, tmp_path / "rmac.onnx", size=(96, 128))
    assert onnx_max_abs_diff(model, path, torch.randn(1, 3, 96, 128)) < 1e-4
