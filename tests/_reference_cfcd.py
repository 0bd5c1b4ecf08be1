"""A transcription of the CFCD reference code, for fidelity tests only.

Layer definitions of pycls ``core/model/resnet.py`` (R-50-1x64d: stride on the 3x3, projection
shortcut with a block-level BN), ``core/model/model_deploy.py`` (GeM p=3, fc, bn, L2) and the
extraction procedure of ``evaler/infer.py`` + ``evaler/process.py`` (cv2 BGR decoding, float32
cv2.resize INTER_LINEAR to (round(w*s), round(h*s)), /255, BGR mean/std, batch 1, one forward per
scale, per-scale L2, mean, L2). Parameter names are the reference's, so ``state_dict()`` is an
official checkpoint layout.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_MEAN = [0.406, 0.456, 0.485]  # BGR order, as in datasets/commondataset.py
_SD = [0.225, 0.224, 0.229]
SCALES = [0.3535, 0.5, 0.7071, 1.0, 1.4142]


class ResStemIN(nn.Module):
    def __init__(self, w_in, w_out):
        super().__init__()
        self.conv = nn.Conv2d(w_in, w_out, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


class BottleneckTransform(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, stride=1, padding=0, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_b, w_out, 1, stride=1, padding=0, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b):
        super().__init__()
        self.proj_block = (w_in != w_out) or (stride != 1)
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, padding=0, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = BottleneckTransform(w_in, w_out, stride, w_b)
        self.relu = nn.ReLU(True)

    def forward(self, x):
        x = self.bn(self.proj(x)) + self.f(x) if self.proj_block else x + self.f(x)
        return self.relu(x)


class ResStage(nn.Module):
    def __init__(self, w_in, w_out, stride, d, w_b):
        super().__init__()
        for i in range(d):
            b_stride = stride if i == 0 else 1
            b_w_in = w_in if i == 0 else w_out
            self.add_module(f"b{i + 1}", ResBlock(b_w_in, w_out, b_stride, w_b))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class ResNet(nn.Module):
    def __init__(self, depths=(3, 4, 6, 3)):
        super().__init__()
        self.stem = ResStemIN(3, 64)
        self.s1 = ResStage(64, 256, 1, depths[0], 64)
        self.s2 = ResStage(256, 512, 2, depths[1], 128)
        self.s3 = ResStage(512, 1024, 2, depths[2], 256)
        self.s4 = ResStage(1024, 2048, 2, depths[3], 512)

    def forward(self, x):
        x = self.stem(x)
        x1 = self.s1(x)
        x2 = self.s2(x1)
        x3 = self.s3(x2)
        x4 = self.s4(x3)
        return x3, x4


class GeneralizedMeanPooling(nn.Module):
    def __init__(self, norm=3.0, eps=1e-6):
        super().__init__()
        self.p, self.eps = float(norm), eps

    def forward(self, x):
        x = x.clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class ModelDeploy(nn.Module):
    def __init__(self, depths=(3, 4, 6, 3)):
        super().__init__()
        self.globalmodel = ResNet(depths)
        self.pool_g = GeneralizedMeanPooling(norm=3.0)
        self.fc = nn.Linear(2048, 512, bias=True)
        self.bn = nn.BatchNorm1d(512)

    def forward(self, x):
        _, f4 = self.globalmodel(x)
        g = self.pool_g(f4).view(f4.size(0), -1)
        return F.normalize(self.bn(self.fc(g)), p=2, dim=1)


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere, BN running statistics included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.01)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model.eval()


@torch.no_grad()
def reference_extract(model: ModelDeploy, path: str, bbx=None) -> np.ndarray:
    """evaler/infer.py ``extract`` for one image file: (512,) float32, L2-normalised."""
    im = cv2.imread(path).astype(np.float32)  # BGR, HWC, 0-255
    if bbx is not None:
        x1, y1, x2, y2 = map(int, bbx)  # the reference truncates the query box
        im = im[y1:y2, x1:x2]
    h, w = im.shape[:2]
    acc = np.zeros(512, dtype=np.float32)
    for s in SCALES:
        resized = cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
        x = resized.transpose(2, 0, 1) / 255.0
        for c in range(3):
            x[c] = (x[c] - _MEAN[c]) / _SD[c]
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]).numpy()[0]
        acc += out / np.linalg.norm(out)
    acc /= len(SCALES)
    return acc / np.linalg.norm(acc)
