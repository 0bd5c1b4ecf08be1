"""onnxruntime against PyTorch for the network of an extraction (cfcd.extract.runtimes): equal
descriptors for every family that exports, at several sizes and presets (flip included), the
graph cache, the fallback to torch and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _extract_helpers import real_photos, resize_rgb, write_photo_dir  # noqa: E402

import cfcd.models as M  # noqa: E402
from cfcd.errors import InputError  # noqa: E402
from cfcd.extract import ExtractOptions, Extractor, parse_scales  # noqa: E402
from cfcd.extract.runtimes import cached_graph, graph_dir, graph_key, resolve_runtime  # noqa: E402

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def images():
    """Real photos at three small sizes (two share one: they batch together)."""
    photos = list(real_photos().values())
    sizes = [(150, 112), (150, 112), (97, 130), (181, 77)]
    return [resize_rgb(p, w, h) for p, (w, h) in zip(photos, sizes)]


def _both(model, images, recipe, **kw):
    out = {}
    for runtime in ("torch", "onnx"):
        extractor = Extractor(model, ExtractOptions(scales=recipe, runtime=runtime, workers=0, **kw))
        out[runtime] = (extractor.runtime, extractor.describe_arrays(images))
    assert out["torch"][0] == "torch" and out["onnx"][0] == "onnx"
    return out["torch"][1], out["onnx"][1]


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


FAMILIES = {
    "cfcd": lambda: M.create("cfcd_r50", backbone="resnet18", weights="random"),
    "dolg": lambda: M.create("dolg_r50", backbone="resnet18", learnable_p=True, weights="random"),
    "gem_resnet": lambda: M.create("gem_resnet18", weights="random"),
    "efficientnet_lite": lambda: M.create("gem_efficientnet_lite0"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_equals_torch_for_every_family(images, family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    for recipe in (parse_scales("single"), parse_scales("cfcd", flip=True)):
        ref, got = _both(model, images, recipe, batch_size=2)
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert _cos(ref, got).min() >= 0.9999, (family, recipe.name, _cos(ref, got))


def test_onnx_equals_torch_for_the_other_presets(images):
    model = M.create("gem_efficientnet_lite0")
    for recipe in (parse_scales("cirtorch", power=3.0), parse_scales("dirtorch_relative"),
                   parse_scales("1 0.6", flip=True)):
        ref, got = _both(model, images, recipe)
        assert _cos(ref, got).min() >= 0.9999, (recipe.name, _cos(ref, got))


def test_graph_is_cached_once_per_state(tmp_path):
    torch.manual_seed(1)
    model = M.create("gem_resnet18", weights="random")
    lines = []
    path = cached_graph(model, cache=tmp_path, log=lines.append)
    assert path is not None and path.parent == graph_dir(tmp_path) and not lines
    stamp = path.stat().st_mtime_ns
    assert cached_graph(model, cache=tmp_path) == path and len(list(path.parent.glob("*.onnx"))) == 1
    assert path.read_bytes() and path.stat().st_mtime_ns >= stamp  # reused, not exported again
    other = M.create("gem_resnet18", weights="random")  # another random state: another graph
    assert graph_key(other)[0] != graph_key(model)[0]
    assert not list(path.parent.glob(".*.onnx"))  # no temporary file left behind


def test_a_model_that_cannot_export_runs_in_torch_with_one_line(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("CFCD_CACHE", str(tmp_path))
    model = M.create("gem_resnet18", pooling="rmac", weights="random")
    extractor = Extractor(model, ExtractOptions(scales=parse_scales("single"), runtime="onnx", workers=0))
    assert extractor.runtime == "torch"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "R-MAC" in err[0] and "using torch" in err[0]
    ref = Extractor(model, ExtractOptions(scales=parse_scales("single"), workers=0)).describe_arrays(images[:1])
    assert np.allclose(extractor.describe_arrays(images[:1]), ref)
    Extractor(model, ExtractOptions(scales=parse_scales("single"), runtime="auto", workers=0))  # remembered
    assert "R-MAC" in capsys.readouterr().err


def test_runtime_choice():
    assert resolve_runtime("auto", "cpu") == "onnx"
    assert resolve_runtime("auto", "cuda:0") == "torch"
    assert resolve_runtime("auto", "cpu", mode="naive") == "torch"
    assert resolve_runtime("auto", "cpu", precision="bf16") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(InputError, match="CPU only"):
        resolve_runtime("onnx", "cuda")
    with pytest.raises(InputError, match="reference"):
        resolve_runtime("onnx", "cpu", mode="naive")
    with pytest.raises(InputError, match="runtime"):
        ExtractOptions(runtime="tensorrt")


def test_cli_default_runtime_equals_torch_one_scale_and_cfcd_preset(tmp_path, capsys):
    from cfcd.cli import main
    from cfcd.store import open_store

    write_photo_dir(tmp_path / "photos", count=5, long_side=160)
    for scales in ("single", "cfcd"):
        stores = {}
        for runtime in ("torch", None):
            out = tmp_path / f"{scales}-{runtime or 'default'}"
            argv = ["extract", "--model", "gem_efficientnet_lite0", "--images", str(tmp_path / "photos"),
                    "--out", str(out), "--device", "cpu", "--scales", scales, "--workers", "1", "--no-progress"]
            assert main(argv + (["--runtime", runtime] if runtime else [])) == 0
            stores[runtime] = open_store(out)
        meta = json.loads((tmp_path / f"{scales}-default" / "meta.json").read_text())
        assert meta["extract"]["runtime"] == "onnx"
        a, b = stores["torch"], stores[None]
        assert list(a.ids) == list(b.ids)
        assert _cos(np.asarray(a.descriptors), np.asarray(b.descriptors)).min() >= 0.9999
    capsys.readouterr()
    assert main(["extract", "--model", "gem_efficientnet_lite0", "--images", str(tmp_path / "photos"),
                 "--out", str(tmp_path / "x"), "--device", "cpu", "--runtime", "onnx", "--naive"]) == 2
    assert "--naive" in capsys.readouterr().err


def test_cpu_policy_and_cache_pruning(tmp_path, monkeypatch):
    from cfcd.extract.runtimes import _prune, cpu_policy, decode_workers, free_cores, usable_cores

    assert 1 <= free_cores() <= usable_cores()
    assert cpu_policy()["spinning"] is False
    monkeypatch.setenv("CFCD_ORT_THREADS", "3")
    monkeypatch.setenv("CFCD_ORT_SPINNING", "1")
    assert cpu_policy() == {"threads": 3, "spinning": True}
    assert decode_workers(0) == 0 and decode_workers(8) == max(1, usable_cores() // 4)
    import os

    for i in range(4):
        (tmp_path / f"m{i}.onnx").write_bytes(b"x")
        os.utime(tmp_path / f"m{i}.onnx", (1000 + i, 1000 + i))
    _prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["m2.onnx", "m3.onnx"]


def test_unwritable_cache_runs_in_torch(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = M.create("gem_efficientnet_lite0")
    assert cached_graph(model, cache=blocker) is None
    assert "using torch" in capsys.readouterr().err
