"""Global pooling layers of the retrieval literature, with the exact formulas of the originals.

All layers take a non-negative feature map ``B x C x H x W`` and return ``B x C`` (flattened).
Pooling runs in float32 even under ``torch.autocast`` (``x ** 3`` in bf16 loses the descriptor),
and reduces with ``mean``/``amax`` so it exports to ONNX with dynamic spatial size.

- :class:`GeM`: ``(mean_{h,w} clamp(x, eps)^p)^(1/p)``, eps = 1e-6 (cirtorch ``LF.gem``, dirtorch
  ``GeneralizedMeanPoolingP``, CFCD ``GeneralizedMeanPooling(norm=3)``). ``learnable=False``
  gives CFCD's fixed p (no state-dict entry); ``learnable=True`` registers ``p`` (DOLG ``pool_g.p``,
  cirtorch/dirtorch ``pool.p``/``adpool.p``); ``per_channel=C`` is cirtorch's GeMmp.
- :class:`MAC` (max), :class:`SPoC` (mean), :class:`RMAC` (cirtorch's ``LF.rmac`` region grid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GEM_EPS = 1e-6


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalized-mean pooling, ``B x C x H x W -> B x C``."""
    x = x.float().clamp(min=eps)
    if isinstance(p, torch.Tensor):
        p = p.float()
        if p.numel() > 1:  # GeMmp: one p per channel
            p = p.view(1, -1, 1, 1)
            return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p.view(1, -1))
        return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """Generalized-mean pooling; fixed (no parameter) or learnable ``p``.

    Args:
        p: initial (or fixed) exponent; 3 in every model of this package.
        learnable: register ``p`` as a Parameter (DOLG after 2022-04-11, cirtorch, dirtorch).
        per_channel: number of channels for cirtorch's GeMmp (one learnable p per channel).
        eps: clamp floor before the power, 1e-6 in all originals.
    """

    def __init__(self, p: float = 3.0, learnable: bool = False, per_channel: int | None = None, eps: float = GEM_EPS):
        super().__init__()
        self.eps = eps
        self.learnable = learnable or per_channel is not None
        if self.learnable:
            self.p = nn.Parameter(torch.ones(per_channel or 1) * p)
        else:
            self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        p = f"{self.p.detach().flatten()[:4].tolist()}" if self.learnable else f"{self.p}"
        return f"p={p}, learnable={self.learnable}, eps={self.eps}"


class MAC(nn.Module):
    """Maximum activation of convolutions: max over H x W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().amax(dim=(-2, -1))


class SPoC(nn.Module):
    """Sum-pooled convolutional features (average over H x W, as cirtorch's ``avg_pool2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(-2, -1))


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """cirtorch's R-MAC region grid: ``(y0, x0, side)`` for every square region, level by level.

    Reproduces ``cirtorch.layers.functional.rmac`` exactly, including its float32 centre
    arithmetic and floors. The global region is not included (it is always added first).
    For a 24 x 32 map this gives 2 + 6 + 12 = 20 regions (sides 24, 16, 12).
    """
    ovr = 0.4  # desired overlap of neighbouring regions
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float32)
    W, H = width, height
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    Wd = idx.item() + 1 if H < W else 0
    Hd = idx.item() + 1 if H > W else 0
    regions: list[tuple[int, int, int]] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        step = 0 if level + Wd == 1 else (W - wl) / (level + Wd - 1)
        cen_w = torch.floor(wl2 + torch.arange(level + Wd, dtype=torch.float32) * step) - wl2
        step = 0 if level + Hd == 1 else (H - wl) / (level + Hd - 1)
        cen_h = torch.floor(wl2 + torch.arange(level + Hd, dtype=torch.float32) * step) - wl2
        for y in cen_h.tolist():
            for x in cen_w.tolist():
                regions.append((int(y), int(x), wl))
    return regions


def _l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


class RMAC(nn.Module):
    """Regional MAC (Tolias et al.) with cirtorch's grid: ``L2N(MAC(x)) + sum_r L2N(MAC(region_r))``.

    Like cirtorch, the sum is returned un-normalised (the network applies the final L2N).
    The region grid depends on the map size, so ONNX export fixes the input size.
    """

    def __init__(self, levels: int = 3, eps: float = 1e-6):
        super().__init__()
        self.levels = levels
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        v = _l2n(x.amax(dim=(-2, -1)), self.eps)
        for y, x0, side in rmac_regions(x.shape[-2], x.shape[-1], self.levels):
            region = x[:, :, y : y + side, x0 : x0 + side]
            v = v + _l2n(region.amax(dim=(-2, -1)), self.eps)
        return v


def create_pooling(name: str, *, p: float = 3.0, learnable_p: bool = True, channels: int | None = None) -> nn.Module:
    """Pooling by name: ``gem``, ``gemmp`` (per-channel p, needs ``channels``), ``mac``, ``spoc``, ``rmac``."""
    name = name.lower()
    if name == "gem":
        return GeM(p=p, learnable=learnable_p)
    if name == "gemmp":
        if channels is None:
            raise ValueError("gemmp pooling needs the number of channels")
        return GeM(p=p, per_channel=channels)
    if name == "mac":
        return MAC()
    if name in ("spoc", "avg"):
        return SPoC()
    if name == "rmac":
        return RMAC()
    raise ValueError(f"unknown pooling {name!r}: choose gem, gemmp, mac, spoc or rmac")


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's L2N: ``x / (||x||_2 + eps)`` along dim 1."""
    return _l2n(x, eps)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, p=2, dim=1)`` in float32 (eps 1e-12), the final step of every model."""
    return F.normalize(x.float(), p=2, dim=1)
