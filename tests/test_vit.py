"""The ViT family (cfcd.models.vit) with tiny random ViTs: patch-token GeM/CLS against hand
computations, every scale of multi-scale extraction, channels_last/bf16/non-contiguous inputs,
DINOv2-hub / OpenAI-CLIP checkpoint import (key layouts transcribed from the originals) and
MadaCos training with the real Trainer and the packaged recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cfcd.models as M
from cfcd.errors import CfcdError
from cfcd.models._compat import import_timm
from cfcd.models.checkpoints import read_checkpoint
from cfcd.models.vit import ViTNet, convert_vit_state, describe_vit_state

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str = "vit_dinov2_small14", **kw) -> ViTNet:
    torch.manual_seed(0)
    kw.setdefault("backbone_kwargs", TINY)
    kw.setdefault("img_size", 56)
    return M.create(name, **{"weights": "random", **kw})


def photo(height: int, width: int) -> np.ndarray:
    import cv2
    from skimage import data

    return np.ascontiguousarray(cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA))


def test_registry_names_routing_and_errors():
    names = M.list_models()
    for n in ("vit_dinov2_small14", "vit_dinov2_base14", "vit_dinov2_small14_reg", "vit_clip_b16", "vit_timm"):
        assert n in names and M.get_entry(n).family == "vit"
    # gem_<timm ViT> is the ViT family with GeM over the patch map, not GeMNet pooling the token axis
    model = M.create("gem_vit_small_patch14_dinov2", backbone_kwargs=TINY, weights="random")
    assert isinstance(model, ViTNet) and model.pooling == "gem" and model.embedding_dim == 32
    assert M.create("gem_resnet18", weights="random").__class__.__name__ == "GeMNet"
    with pytest.raises(CfcdError, match="pooling must be one of"):
        M.create("vit_dinov2_small14", backbone_kwargs=TINY, pooling="rmac", weights="random")
    with pytest.raises(CfcdError, match="not a timm VisionTransformer"):
        M.create("vit_timm", backbone="resnet18", weights="random")
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        tiny()(torch.zeros(1, 3, 10, 40))
    # normalisation per checkpoint family
    assert tiny().preprocess.mean == (0.485, 0.456, 0.406)
    clip = tiny("vit_clip_b16")
    assert clip.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.embedding_dim == 512


def test_gem_of_the_patch_map_and_cls_equal_hand_computations():
    model = tiny(out_dim=None)
    x = torch.randn(2, 3, 70, 98)  # 5 x 7 patches of 14
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)  # B x (1 + 35) x C, final LayerNorm applied
        assert tokens.shape == (2, 36, 32)
        fmap = torch.zeros(2, 32, 5, 7)
        for i in range(5):
            for j in range(7):
                fmap[:, :, i, j] = tokens[:, 1 + i * 7 + j]  # row-major patch order
        gem = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        out = model.forward_features(x)
        torch.testing.assert_close(out["local"], fmap)
        torch.testing.assert_close(out["global"], gem)
        torch.testing.assert_close(model(x), F.normalize(gem, dim=1))

        cls = tiny(pooling="cls", out_dim=16)
        t = cls.backbone.forward_features(x)
        expected = F.normalize(t[:, 0] @ cls.fc.weight.T + cls.fc.bias, dim=1)
        torch.testing.assert_close(cls(x), expected)
        spoc = tiny(pooling="spoc")
        torch.testing.assert_close(spoc(x), F.normalize(t[:, 1:].mean(1), dim=1))


def test_registers_are_prefix_tokens_not_patches():
    model = tiny("vit_dinov2_small14_reg")
    assert model.num_prefix_tokens == 5
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        assert tokens.shape[1] == 5 + 3 * 4
        torch.testing.assert_close(model.forward_features(x)["local"][0, :, 2, 3], tokens[0, 5 + 2 * 4 + 3])


def test_multi_scale_extraction_at_several_sizes_fast_equals_reference():
    from cfcd.extract import ExtractOptions, Extractor, parse_scales

    model = tiny(out_dim=24)
    images = [photo(84, 112), photo(112, 84), photo(100, 130)]  # 5 CFCD scales: 30 px ... 184 px sides
    fast = Extractor(model, ExtractOptions(scales=parse_scales("cfcd"), batch_size=2, workers=0, progress=False))
    naive = Extractor(model, ExtractOptions(scales=parse_scales("cfcd"), mode="naive", workers=0, progress=False))
    a, b = fast.describe_arrays(images), naive.describe_arrays(images)
    assert a.shape == (3, 24) and np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert (a * b).sum(1).min() > 0.9999
    # each scale really changed the descriptor (the position embedding follows the grid)
    single = Extractor(model, ExtractOptions(scales=parse_scales("single"), workers=0, progress=False))
    assert (single.describe_arrays(images) * a).sum(1).max() < 0.99999


def test_channels_last_bf16_and_views_match_fp32():
    model = tiny(out_dim=24)
    base = torch.randn(2, 3, 70, 100)
    with torch.no_grad():
        ref = model(base)
        view = torch.randn(2, 3, 70, 130)[:, :, :, 10:110]  # non-contiguous
        view.copy_(base)
        assert not view.is_contiguous()
        torch.testing.assert_close(model(view), ref, atol=1e-6, rtol=1e-5)
        cl = base.contiguous(memory_format=torch.channels_last)
        model_cl = tiny(out_dim=24).to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(cl), ref, atol=1e-6, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_cl(cl)
        assert low.dtype == torch.float32  # pooling and L2 in fp32
        assert (low * ref).sum(1).min() > 0.99


# ---- checkpoints -------------------------------------------------------------------------------


def to_dinov2_hub_layout(timm_state: dict, registers: bool) -> dict:
    """timm ViT state -> the facebookresearch/dinov2 DinoVisionTransformer layout
    (dinov2/models/vision_transformer.py: cls_token, pos_embed over CLS + patches even with
    registers, register_tokens, mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj,
    ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm)."""
    out = {k: v.clone() for k, v in timm_state.items()}
    width = out["cls_token"].shape[-1]
    device = out["cls_token"].device
    out["mask_token"] = torch.zeros(1, width, device=device)
    if registers:
        # timm keeps the CLS position inside cls_token (no_embed_class); DINOv2 adds pos_embed[:, 0]
        pos0 = torch.randn(1, 1, width, device=device) * 0.02
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([pos0, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - pos0
    return out


def dinov2_hub_keys(depth: int, registers: bool) -> set[str]:
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    if registers:
        keys.add("register_tokens")
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # ls gammas start at 1e-5 and biases at 0: make every tensor count
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_hub_checkpoint_import(tmp_path, registers):
    name = "vit_dinov2_small14" + ("_reg" if registers else "")
    source = randomized(tiny(name, pooling="spoc"))
    hub = to_dinov2_hub_layout({k[len("backbone."):]: v for k, v in source.state_dict().items()}, registers)
    assert set(hub) == dinov2_hub_keys(2, registers)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(hub, path)

    ckpt = read_checkpoint(path)
    assert ckpt.format == "vit" and ckpt.model_kwargs == {"img_size": 56}  # 4 x 4 grid of 14
    assert ckpt.model_name is None  # width 32 is no DINOv2 release: the caller names the model
    assert "mask_token" not in ckpt.state and "backbone.mask_token" not in ckpt.state
    loaded = M.create(name, weights=path, pooling="spoc", backbone_kwargs=TINY)
    assert loaded.load_report.complete and loaded.load_report.loaded == len(source.state_dict())
    for k, v in source.state_dict().items():  # every tensor went to its own name
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))

    # into a model of another native grid: the position embedding is resampled like timm does
    from timm.layers import resample_abs_pos_embed

    other = M.create(name, weights=path, pooling="spoc", backbone_kwargs=TINY, img_size=42)
    assert other.load_report.complete and other.backbone.pos_embed.shape[1] == 9 + (0 if registers else 1)
    pos = source.backbone.pos_embed.detach()
    expected = resample_abs_pos_embed(pos, new_size=[3, 3], old_size=[4, 4], num_prefix_tokens=0 if registers else 1)
    torch.testing.assert_close(other.backbone.pos_embed.detach(), expected)
    if not registers:  # `cfcd convert` in a fresh process (timm imported by the checkpoint reader itself)
        import subprocess

        out = subprocess.run([sys.executable, "-m", "cfcd", "convert", str(path), "--model", name, "--set",
                              'backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}', "--set", 'pooling="spoc"',
                              "--out", str(tmp_path / "converted")], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        converted = M.create(name, weights=tmp_path / "converted")
        with torch.no_grad():
            torch.testing.assert_close(converted(x), source(x))
    # the wrong family is refused with the file named
    with pytest.raises(CfcdError, match="dinov2_tiny_pretrain.pth"):
        M.create("cfcd_r50", weights=path)


def test_release_architectures_are_recognised_from_shapes():
    timm = import_timm()
    for arch, registers, expected in (("vit_small_patch14_dinov2", False, "vit_dinov2_small14"),
                                      ("vit_base_patch14_reg4_dinov2", True, "vit_dinov2_base14_reg")):
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        hub = to_dinov2_hub_layout(dict(model.state_dict()), registers)  # shapes only (meta tensors)
        assert set(hub) == dinov2_hub_keys(12, registers)
        info = describe_vit_state(hub)
        assert info["name"] == expected and info["timm"] == arch and info["grid"] == 37 and info["depth"] == 12
        _, _, meta = convert_vit_state(hub)
        assert meta["model_name"] == expected and meta["model_kwargs"] == {"backbone": arch, "img_size": 518}


def to_openai_clip_layout(timm_state: dict) -> dict:
    """timm CLIP tower -> OpenAI CLIP ``visual.*`` (clip/model.py VisionTransformer: conv1 without bias,
    class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_*,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj = head.weight.T)."""
    out = {}
    for k, v in timm_state.items():
        if k == "head.bias":
            continue
        if k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        k = (k.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre").replace("blocks.", "transformer.resblocks.")
             .replace("attn.qkv.", "attn.in_proj_").replace("attn.proj", "attn.out_proj").replace("norm1", "ln_1")
             .replace("norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
        out["visual." + ("ln_post" + k[len("norm"):] if k.startswith("norm.") else k)] = v
    return out


def test_openai_clip_checkpoint_projection_goes_into_fc(tmp_path):
    timm = import_timm()
    torch.manual_seed(0)
    tower = randomized(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=12,
                                         global_pool="token", img_size=48, dynamic_img_size=True, **TINY)).eval()
    with torch.no_grad():
        tower.head.bias.zero_()  # CLIP's proj has no bias
    state = to_openai_clip_layout(tower.state_dict())
    assert "visual.conv1.weight" in state and "visual.conv1.bias" not in state and "visual.proj" in state
    path = tmp_path / "clip_tiny.pt"
    torch.save({"state_dict": state}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "vit" and ckpt.model_kwargs == {"pooling": "cls", "out_dim": 12, "img_size": 48}
    model = M.create("vit_clip_b16", weights=path, backbone_kwargs=TINY)
    assert model.load_report.complete and model.embedding_dim == 12
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = F.normalize(tower.forward_head(tower.forward_features(x), pre_logits=False), dim=1)  # CLS -> ln_post -> proj
        torch.testing.assert_close(model(x), expected)


# ---- training ------------------------------------------------------------------------------------


@torch.no_grad()
def train_accuracy(trainer, root: Path) -> float:
    """Top-1 of the MadaCos classifier (argmax cosine) on the training images, without augmentation."""
    from cfcd.train.data import TrainingDataset, ValTransform, read_labelled_list

    lst = read_labelled_list(root / "train_list.txt", root)
    ds = TrainingDataset(lst, ValTransform(56, 64, trainer.model.preprocess))
    trainer.model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    cos = trainer.head.cosine(trainer.model.forward_features(x)["global"])
    trainer.model.train()
    return float((cos.argmax(1) == torch.as_tensor(lst.labels)).float().mean())


def test_madacos_trains_a_tiny_vit_with_the_packaged_recipe(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import _train_helpers as H

    from cfcd.train.config import load_config
    from cfcd.train.logging import read_log
    from cfcd.train.trainer import Trainer

    H.make_landmarks(tmp_path / "data", n_classes=6, train_per_class=8)
    cfg = load_config("vit_dinov2_s14_madacos", [
        f"data.root={tmp_path / 'data'}", "data.val_list=null", "data.im_size=56", "data.workers=0",
        "loss.num_classes=6", "optim.epochs=6", "optim.warmup_epochs=0", "optim.lr=0.003",
        "train.global_batch=16", "train.micro_batch=8", "train.tensorboard=false", "train.progress=false",
        "train.log_every=1", f"train.out_dir={tmp_path / 'run'}", "train.keep_every=0",
        'model.kwargs={"pooling": "gem", "out_dim": 16, "img_size": 56, '
        '"backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}',
    ])
    assert cfg.model.name == "vit_dinov2_small14" and cfg.optim.name == "adamw"
    trainer = Trainer(cfg, resume=False)
    trainer.build()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    accuracy_before = train_accuracy(trainer, tmp_path / "data")
    trainer.fit()
    trainer.close()
    rows = read_log(tmp_path / "run" / "log.jsonl", "train")
    assert len(rows) == 18 and all(np.isfinite(r["loss"]) for r in rows)  # 6 epochs x 3 steps (48 images / 16)
    accuracy_after = train_accuracy(trainer, tmp_path / "data")
    assert accuracy_after > max(0.6, accuracy_before + 0.3)
    after = trainer.model.state_dict()
    for k in ("backbone.blocks.0.attn.qkv.weight", "backbone.pos_embed", "fc.weight"):
        assert not torch.equal(before[k], after[k].cpu()), k
    again = M.create("vit_dinov2_small14", weights=tmp_path / "run" / "final")
    assert again.load_report.complete
    x = torch.randn(1, 3, 56, 70)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), trainer.model(x))
