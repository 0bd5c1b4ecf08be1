"""Builders of synthetic *official* checkpoints for the model tests.

Each function takes a cfcd model and writes its weights in the layout of the original code base,
with the key names spelled out independently of cfcd.models.checkpoints (the inverse mappings).
"""

from __future__ import annotations

import re

import torch

_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv1|conv2|conv3|bn1|bn2|bn3|downsample\.0|downsample\.1)\.(.+)$")
_PYCLS_PART = {"conv1": "f.a", "conv2": "f.b", "conv3": "f.c", "bn1": "f.a_bn", "bn2": "f.b_bn", "bn3": "f.c_bn",
               "downsample.0": "proj", "downsample.1": "bn"}


def torchvision_to_pycls(key: str) -> str:
    if key.startswith("conv1."):
        return "stem.conv." + key[6:]
    if key.startswith("bn1."):
        return "stem.bn." + key[4:]
    m = _TV_BLOCK.match(key)
    assert m, key
    stage, block, part, rest = m.groups()
    return f"s{stage}.b{int(block) + 1}.{_PYCLS_PART[part]}.{rest}"


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}


def randomize_bn_stats(model, seed: int = 0) -> None:
    """Give every BN non-trivial running statistics so that a wrong mapping changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def pycls_state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + torchvision_to_pycls(k): v for k, v in backbone_state(model).items()}


def official_cfcd(model, num_classes: int = 10) -> dict:
    sd = model.state_dict()
    state = pycls_state(model, "globalmodel.")
    state.update({k: sd[k].clone() for k in sd if k.startswith(("fc.", "bn."))})
    state["desc_cls.weight"] = torch.randn(num_classes, model.embedding_dim)
    return {"epoch": 49, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
            "cfg": "MODEL:\n  ALGO: MODEL_S2\n  DEPTH: 50\n"}


def official_dolg(model, num_classes: int = 10, module_prefix: bool = False) -> dict:
    sd = model.state_dict()
    state = pycls_state(model, "globalmodel.")
    for k, v in sd.items():
        if k.startswith("local."):
            state["localmodel." + k[len("local."):]] = v.clone()
        elif k.startswith(("fc.", "fc_t.", "bn.")):
            state[k] = v.clone()
        elif k == "pool.p":
            state["pool_g.p"] = v.clone()
    state["desc_cls.weight"] = torch.randn(num_classes, model.embedding_dim)
    state["desc_cls.t"] = torch.zeros(1)
    if module_prefix:
        state = {"module." + k: v for k, v in state.items()}
    return {"epoch": 99, "model_state": state, "cfg": "MODEL:\n  TYPE: DOLG\n"}


_CIRTORCH_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def official_cirtorch(model, architecture: str = "resnet50") -> dict:
    import numpy as np

    state = {}
    for k, v in backbone_state(model).items():
        head, rest = k.split(".", 1)
        state[f"features.{_CIRTORCH_INDEX[head]}.{rest}"] = v
    for k, v in model.state_dict().items():
        if k.startswith(("pool.", "whiten.")):
            state[k] = v.clone()
    d = model.embedding_dim
    rng = np.random.default_rng(0)
    meta = {"architecture": architecture, "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": model.whiten is not None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "outputdim": d,
            "Lw": {"retrieval-SfM-120k": {"ss": {"m": rng.standard_normal((d, 1)), "P": rng.standard_normal((d, d))},
                                          "ms": {"m": rng.standard_normal((d, 1)), "P": rng.standard_normal((d, d))}}}}
    return {"meta": meta, "state_dict": state, "epoch": 3, "min_loss": 0.5}


def official_dirtorch(model, pca=None, arch: str = "resnet50_rmac") -> dict:
    state = {"module." + k: v for k, v in backbone_state(model).items()}
    sd = model.state_dict()
    state["module.adpool.p"] = sd["pool.p"].clone()
    state["module.fc.weight"] = sd["fc.weight"].clone()
    state["module.fc.bias"] = sd["fc.bias"].clone()
    ckpt = {"model_options": {"arch": arch, "out_dim": model.embedding_dim, "pooling": "gem", "gemp": 3},
            "state_dict": state, "current_iter": 296,
            "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 224}}
    if pca is not None:
        ckpt["pca"] = {"Landmarks_clean": pca}
    return ckpt
