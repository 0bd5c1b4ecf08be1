"""docs/extending.md runs: its new loss (NormFace), its new benchmark (GLDv2 retrieval, CSV
ground truth, mAP@100), its new model family (CroW) and its new checkpoint format (the official
ConvNeXt files) work through the registries alone, as the document says."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cfcd.losses as L
from cfcd.cli import main as cli_main
from cfcd.data.datasets import DATASETS, get_dataset, verify_dataset
from cfcd.evaluation import evaluate_dataset
from cfcd.errors import InputError
from cfcd.evaluation.metrics import AveragePrecisionAt, PrecisionAt, parse_metric

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _module(name: str, code: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(code, f"{DOC}:{name}", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def doc_modules():
    normface_code, register_code, gldv2_code, _, _ = _python_blocks()
    normface = _module("extending_doc_normface", normface_code)
    exec(register_code, {"NormFace": normface.NormFace})
    gldv2 = _module("extending_doc_gldv2", gldv2_code)
    yield normface, gldv2
    DATASETS.unregister("gldv2_minimal")
    L.LOSSES.unregister("normface")
    for name in ("extending_doc_normface", "extending_doc_gldv2"):
        sys.modules.pop(name, None)


def test_the_documented_loss_trains_through_the_registry(doc_modules):
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(12, 8, generator=g), torch.arange(12) % 5
    head = L.create_from_recipe("normface", {"scale": 10.0}, embedding_dim=8, num_classes=5)
    assert L.is_classification_head(head)
    loss, stats = head.objective({"global": emb}, labels, L.BatchLayout())
    cos = F.normalize(emb, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()
    torch.testing.assert_close(loss, F.cross_entropy(10.0 * cos, labels))
    assert float(stats["scale"]) == 10.0 and 0.0 <= float(stats["top1"]) <= 1.0
    loss.backward()
    assert head.weight.grad.abs().sum() > 0


def _kaggle_map_at_100(scores: np.ndarray, index: list[str], solution: dict[str, list[str]], queries: list[str]) -> float:
    """The GLDv2 retrieval metric as the Kaggle evaluation writes it: per query the top-100
    predictions, sum of P@i at each relevant prediction, over min(#relevant, 100)."""
    aps = []
    for q, qid in enumerate(queries):
        relevant = set(solution[qid])
        predictions = [index[j] for j in np.argsort(-scores[q], kind="stable")[:100]]
        hits, total = 0, 0.0
        for i, pred in enumerate(predictions):
            if pred in relevant:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / min(len(relevant), 100))
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def gldv2_root(tmp_path_factory, doc_modules):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("gldv2")
    ds_dir = root / "gldv2_minimal"
    n_index, dim = 150, 16
    index = [f"{rng.integers(16**15):015x}{k:01x}" for k in range(n_index)]
    tests = [f"{rng.integers(16**15):015x}{k:01x}" for k in range(9)]
    solution = {t: sorted(rng.choice(index, size=int(rng.integers(1, 40)), replace=False).tolist()) for t in tests[:7]}
    rows = ["id,images,Usage"] + [f"{t},{' '.join(solution[t])},{'Public' if k % 2 else 'Private'}"
                                  for k, t in enumerate(tests[:7])] + [f"{t},,Ignored" for t in tests[7:]]
    ds_dir.mkdir()
    (ds_dir / "retrieval_solution_v2.1.csv").write_text("\n".join(rows) + "\n")
    (ds_dir / "index.csv").write_text("id\n" + "\n".join(index) + "\n")
    dataset = get_dataset("gldv2_minimal")
    for name in index + tests[:7]:
        path = dataset.images_dir(root) / dataset.image_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    x = rng.standard_normal((n_index, dim)).astype(np.float32)
    q = rng.standard_normal((7, dim)).astype(np.float32)
    where = {n: i for i, n in enumerate(index)}
    for k, t in enumerate(tests[:7]):  # positives near the query, some too weakly for the top 100
        for name in solution[t]:
            x[where[name]] += rng.uniform(0.0, 1.5) * q[k]
    np.save(root / "index.npy", x)
    np.save(root / "test.npy", q)
    return {"root": root, "index": index, "queries": tests[:7], "solution": solution,
            "scores": q @ x.T, "dataset": dataset}


def test_the_documented_benchmark_reads_verifies_and_evaluates(gldv2_root, tmp_path):
    root, dataset = gldv2_root["root"], gldv2_root["dataset"]
    gt = dataset.ground_truth(root)
    assert gt.qimlist == gldv2_root["queries"] and gt.imlist == gldv2_root["index"]  # Ignored rows left out
    report = verify_dataset("gldv2_minimal", root, progress=False)
    assert report.ok, report.summary()
    assert report.counts["queries"] == 7 and report.counts["database"] == 150
    listed = dataset.image_list(root, queries=True)
    assert listed.boxes is None and all(Path(p).is_file() for p in listed.paths)

    expected = _kaggle_map_at_100(gldv2_root["scores"], gldv2_root["index"], gldv2_root["solution"],
                                  gldv2_root["queries"])
    result, protocol = evaluate_dataset(dataset, root, queries=root / "test.npy", database=root / "index.npy")
    assert list(result.setups) == ["retrieval"] and protocol["metrics"] == ["mAP@100"]
    assert result.setups["retrieval"].values["mAP@100"] == pytest.approx(expected, abs=1e-12)
    # some positives fall beyond rank 100, so the truncation is exercised
    ranks = np.argsort(np.argsort(-gldv2_root["scores"], axis=1), axis=1)
    where = {n: i for i, n in enumerate(gldv2_root["index"])}
    assert any(ranks[k, where[n]] >= 100 for k, t in enumerate(gldv2_root["queries"]) for n in gldv2_root["solution"][t])

    out = tmp_path / "report.json"
    assert cli_main(["evaluate", "--dataset", "gldv2_minimal", "--root", str(root), "-q", str(root / "test.npy"),
                     "-x", str(root / "index.npy"), "--metrics", "mAP@100", "mP@10", "--json", str(out)]) == 0
    import json

    saved = json.loads(out.read_text())
    assert saved["retrieval"]["mAP@100"] == pytest.approx(expected * 100, abs=1e-9)
    assert set(saved["per_query"][gldv2_root["queries"][0]]["retrieval"]) == {"AP@100", "P@10", "positives"}


def test_metric_names():
    assert parse_metric("mAP@100") == AveragePrecisionAt(100) and parse_metric("mP@5") == PrecisionAt(5)
    for bad in ("map", "mAP@0", "P@5"):
        with pytest.raises(InputError, match="unknown metric"):
            parse_metric(bad)
    # AP@k with every positive inside the top k is the non-interpolated AP
    ranks = np.array([0, 2, 5])
    assert AveragePrecisionAt(10)(ranks, 3) == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    assert AveragePrecisionAt(3)(ranks, 3) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert AveragePrecisionAt(2)(ranks, 3) == pytest.approx(1 / 2)  # normalised by min(3, 2)


# ---- the model family (CroW) and the checkpoint format (official ConvNeXt)


def _crow_yahoo(X: np.ndarray, a: float = 2, b: float = 2) -> np.ndarray:
    """yahoo/crow crow.py, transcribed: compute_crow_spatial_weight, compute_crow_channel_weight,
    apply_crow_aggregation, on one K x h x w map."""
    S = X.sum(axis=0)
    z = (S ** a).sum() ** (1.0 / a)
    S = (S / z) ** (1.0 / b) if b != 1 else (S / z)
    K, w, h = X.shape
    area = float(w * h)
    nonzeros = np.zeros(K, dtype=np.float32)
    for i, x in enumerate(X):
        nonzeros[i] = np.count_nonzero(x) / area
    nzsum = nonzeros.sum()
    for i, d in enumerate(nonzeros):
        nonzeros[i] = np.log(nzsum / d) if d > 0.0 else 0.0
    X = X * S
    X = X.sum(axis=(1, 2))
    return X * nonzeros


@pytest.fixture(scope="module")
def doc_family_and_format():
    from cfcd.models import checkpoints, registry

    registry._ensure_builtin()
    *_, crow_code, convnext_code = _python_blocks()
    crow = _module("extending_doc_crow", crow_code)
    convnext = _module("extending_doc_convnext_fb", convnext_code)
    yield crow, convnext
    for name in ("crow_r50", "crow_timm"):
        registry.MODELS.unregister(name)
    checkpoints.FORMATS.unregister("convnext_fb")
    for name in ("extending_doc_crow", "extending_doc_convnext_fb"):
        sys.modules.pop(name, None)


def _coffee_batch(size: int = 96) -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    im = resize(data.coffee(), (size, size), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(im).permute(2, 0, 1)[None]


def test_the_documented_family_registers_builds_and_equals_its_reference(doc_family_and_format):
    from cfcd.models import create, list_models

    assert {"crow_r50", "crow_timm"} <= set(list_models())
    torch.manual_seed(0)
    model = create("crow_timm", backbone="resnet18", weights="random")
    x = _coffee_batch()
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)
        out = model.forward_features(x)["global"]
        desc = model(x)
        # the GPU layout: channels_last input, same numbers
        cl = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, model.embedding_dim) == (1, 512)
    ref = _crow_yahoo(fmap[0].double().numpy())
    np.testing.assert_allclose(out[0].double().numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(1))
    torch.testing.assert_close(cl, desc, rtol=1e-4, atol=1e-5)


def test_the_documented_family_loads_a_torchvision_checkpoint(doc_family_and_format, tmp_path):
    from cfcd.models import create
    from cfcd.models.backbones import create_backbone

    torch.manual_seed(1)
    source = create_backbone("resnet50").state_dict()  # torchvision's names
    source.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    torch.save(source, tmp_path / "resnet50-tv.pth")
    model = create("crow_r50", weights=tmp_path / "resnet50-tv.pth")
    assert model.load_report.complete and model.load_report.format == "torchvision"
    assert set(model.load_report.extra) == {"imagenet_head.fc.weight", "imagenet_head.fc.bias"}
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, source["layer4.2.conv3.weight"])


def _to_official_convnext(key: str) -> str:
    """timm ConvNeXt names -> facebookresearch/ConvNeXt models/convnext.py names."""
    key = re.sub(r"^stem\.", "downsample_layers.0.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
    key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
    key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
    return key.replace("head.norm.", "norm.").replace("head.fc.", "head.")


def test_the_documented_format_detects_and_loads_an_official_convnext_file(doc_family_and_format, tmp_path):
    from cfcd.models import create
    from cfcd.models._compat import import_timm
    from cfcd.models.checkpoints import format_names, read_checkpoint

    torch.manual_seed(2)
    reference = import_timm().create_model("convnext_atto", pretrained=False, num_classes=7)
    official = {_to_official_convnext(k): v for k, v in reference.state_dict().items()}
    assert "downsample_layers.0.0.weight" in official and "stages.3.1.pwconv2.weight" in official
    torch.save({"model": official, "epoch": 299}, tmp_path / "convnext_atto_official.pth")

    assert "convnext_fb" in format_names()
    assert read_checkpoint(tmp_path / "convnext_atto_official.pth").format == "convnext_fb"
    model = create("gem_convnext_atto", weights=tmp_path / "convnext_atto_official.pth", learnable_p=False)
    report = model.load_report
    assert report.complete and report.format == "convnext_fb"
    assert set(report.extra) == {"imagenet_head.weight", "imagenet_head.bias"}
    ours = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("head.fc."):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    x = _coffee_batch(64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(x), reference.forward_features(x))
    # as a backbone initialisation before training: the learnable p keeps its initial value
    from cfcd.models import load_backbone_weights

    trainable = create("gem_convnext_atto", weights="random")
    assert load_backbone_weights(trainable, tmp_path / "convnext_atto_official.pth").complete
    torch.testing.assert_close(trainable.backbone.stem[0].weight, reference.stem[0].weight, rtol=0, atol=0)
