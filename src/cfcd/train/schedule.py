"""Learning-rate schedules of the reference (pycls ``core/optimizer.py``), per epoch or per step.

``lr_at(cfg_optim, epoch)`` is the reference: cosine ``0.5 * base * (1 + cos(pi * e / E))``,
evaluated at the integer epoch and held constant within it, multiplied during the first
``warmup_epochs`` by ``warmup_factor * (1 - a) + a`` with ``a = e / warmup_epochs``. With
``per: step`` the same formula is evaluated at the fractional epoch ``e + step / steps``
(a smoother variant, not the reference).
"""

from __future__ import annotations

import math


def base_lr_at(optim: dict, epoch: float) -> float:
    base, total = float(optim["lr"]), float(optim["epochs"])
    policy = optim["policy"]
    if policy == "cos":
        return 0.5 * base * (1.0 + math.cos(math.pi * epoch / total))
    if policy == "steps":
        k = sum(1 for s in optim["steps"] if epoch >= s)
        return base * float(optim["lr_mult"]) ** k
    if policy == "exp":
        return base * float(optim["gamma"]) ** epoch
    return base


def lr_at(optim: dict, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate of ``step`` of ``epoch`` (0-based)."""
    e = float(epoch) if optim["per"] == "epoch" else epoch + step / max(1, steps_per_epoch)
    lr = base_lr_at(optim, e)
    warm = float(optim["warmup_epochs"])
    if e < warm:
        a = e / warm
        lr *= float(optim["warmup_factor"]) * (1.0 - a) + a
    return lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
