"""Fixed-margin cosine-softmax heads: ArcFace, CosFace and DOLG's head (really CurricularFace).

All take ``(embedding_dim, num_classes)``, own ``weight`` (C x D, U(-1/sqrt(D), 1/sqrt(D))),
compute the cosine in float32 whatever the autocast and return the mean cross-entropy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cosine import CosineHead

__all__ = ["ArcFace", "CosFace", "CurricularFace"]


def _angular_constants(margin: float) -> tuple[float, float, float, float]:
    # cos m, sin m, the threshold cos(pi - m) beyond which theta + m would pass pi, and the
    # linear fallback slope sin(pi - m) * m used past it (insightface's "easy margin off").
    return math.cos(margin), math.sin(margin), math.cos(math.pi - margin), math.sin(math.pi - margin) * margin


def _sin_from_cos(c: Tensor) -> Tensor:
    # sqrt(1 - c^2) with the radicand floored at 1e-12: the plain sqrt has an infinite
    # gradient (NaN after the chain rule) at |c| = 1; elsewhere the values are identical.
    return (1.0 - c * c).clamp_min(1e-12).sqrt()


class ArcFace(CosineHead):
    """Additive angular margin (ArcFace, Deng et al. 2019): target logit ``s cos(theta + m)``.

    ``easy_margin=False`` (default) uses ``cos(theta + m)`` while ``cos theta > cos(pi - m)``
    and ``cos theta - sin(pi - m) m`` beyond, so the target logit stays monotonic; with
    ``easy_margin=True`` the margin applies only where ``cos theta > 0``. The margin is applied
    in train and eval mode (the loss is the objective; use ``head.cosine`` for plain scores).
    This is the true ArcFace; DOLG's "Arcface" is :class:`CurricularFace`.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.15,
                 easy_margin: bool = False) -> None:
        super().__init__(embedding_dim, num_classes)
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)
        self.cos_m, self.sin_m, self.threshold, self.mm = _angular_constants(self.margin)

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check(embeddings, labels)
        labels = labels.long()
        cos = self.cosine(embeddings).clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        phi = target * self.cos_m - _sin_from_cos(target) * self.sin_m
        if self.easy_margin:
            phi = torch.where(target > 0, phi, target)
        else:
            phi = torch.where(target > self.threshold, phi, target - self.mm)
        self.stats = {"scale": self.scale, "margin": self.margin, "mean_target_cos": target.detach().mean()}
        return self.scale * cos.scatter(1, labels[:, None], phi)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, easy_margin={self.easy_margin}")


class CosFace(CosineHead):
    """Additive cosine margin (CosFace / LMCL, Wang et al. 2018): target logit ``s (cos theta - m)``.

    The margin is applied in train and eval mode.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(embedding_dim, num_classes)
        self.scale = float(scale)
        self.margin = float(margin)

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check(embeddings, labels)
        labels = labels.long()
        cos = self.cosine(embeddings)
        self.stats = {"scale": self.scale, "margin": self.margin,
                       "mean_target_cos": cos.detach().gather(1, labels[:, None]).mean()}
        shift = cos.new_full((labels.shape[0], 1), -self.margin)
        return self.scale * cos.scatter_add(1, labels[:, None], shift)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}")


class CurricularFace(CosineHead):
    """DOLG's head. The DOLG and CFCD code call it ``Arcface``, but it is CurricularFace
    (Huang et al., CVPR 2020): DOLG ``core/model/dolg_model.py`` ``Arcface`` = CFCD
    ``core/model/arcface.py`` lines 9-54. For true ArcFace use :class:`ArcFace`.

    Training mode (``cos`` clamped to [-1, 1], theta the target angle):

    * target: ``cos(theta + m)`` if ``cos theta > cos(pi - m)``, else ``cos theta - sin(pi - m) m``;
    * ``t <- 0.01 mean(cos theta) + 0.99 t`` (an EMA over the local batch, no gradient, initial
      0), updated BEFORE it is used;
    * hard non-targets (``cos_j > cos(theta + m)``) become ``cos_j (t + cos_j)``;
    * logits ``s *`` the above, then mean cross-entropy.

    ``t`` is a registered buffer of shape [1], so DOLG checkpoints' ``desc_cls.t`` load into it.

    Eval mode follows the CFCD copy: plain ``s cos`` (no margin, ``t`` untouched). DOLG's own
    copy has no eval branch: it applies the margin and updates ``t`` during validation too;
    ``margin_in_eval=True`` reproduces that. DOLG's copy also leaves ``weight`` uninitialised;
    here it gets CFCD's U(-1/sqrt(D), 1/sqrt(D)). Defaults scale 30, margin 0.15 (DOLG yaml).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.15,
                 *, margin_in_eval: bool = False, momentum: float = 0.01) -> None:
        super().__init__(embedding_dim, num_classes)
        self.scale = float(scale)
        self.margin = float(margin)
        self.margin_in_eval = bool(margin_in_eval)
        self.momentum = float(momentum)
        self.cos_m, self.sin_m, self.threshold, self.mm = _angular_constants(self.margin)
        self.register_buffer("t", torch.zeros(1))

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check(embeddings, labels)
        labels = labels.long()
        cos = self.cosine(embeddings)
        if not (self.training or self.margin_in_eval):
            self.stats = {"scale": self.scale, "margin": 0.0, "t": self.t[0].detach().clone()}
            return self.scale * cos
        cos = cos.clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        cos_theta_m = target * self.cos_m - _sin_from_cos(target) * self.sin_m
        hard = cos > cos_theta_m
        final_target = torch.where(target > self.threshold, cos_theta_m, target - self.mm)
        with torch.no_grad():
            self.t.mul_(1.0 - self.momentum).add_(self.momentum * target.detach().mean().to(self.t.dtype))
        t = self.t.to(cos.dtype)
        out = torch.where(hard, cos * (t + cos), cos)
        out = out.scatter(1, labels[:, None], final_target)
        self.stats = {"scale": self.scale, "margin": self.margin, "t": self.t[0].detach().clone(),
                       "mean_target_cos": target.detach().mean(), "hard_fraction": hard.float().mean()}
        return self.scale * out

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, margin_in_eval={self.margin_in_eval}, momentum={self.momentum}")
