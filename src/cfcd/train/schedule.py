"""Learning-rate schedules of the reference (pycls ``core/optimizer.py``), per epoch or per step.

``lr_at(optim, epoch)`` is the reference: cosine ``0.5 * base * (1 + cos(pi * e / E))``,
evaluated at the integer epoch and held constant within it, multiplied during the first
``warmup_epochs`` by ``warmup_factor * (1 - a) + a`` with ``a = e / warmup_epochs``. With
``per: step`` the same formula is evaluated at the fractional epoch ``e + step / steps``
(a smoother variant, not the reference). ``optim.policy`` names one of :data:`SCHEDULES`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cfcd.utils.registry import Registry

if TYPE_CHECKING:
    from cfcd.train.config import OptimConfig

#: ``schedule(optim_config, epoch) -> LR before warm-up`` (epoch may be fractional).
SCHEDULES = Registry("optim.policy")


@SCHEDULES.register("cos")
def cosine(optim: OptimConfig, epoch: float) -> float:
    return 0.5 * optim.lr * (1.0 + math.cos(math.pi * epoch / optim.epochs))


@SCHEDULES.register("steps")
def steps(optim: OptimConfig, epoch: float) -> float:
    k = sum(1 for s in optim.steps if epoch >= s)
    return optim.lr * optim.lr_mult ** k


@SCHEDULES.register("exp")
def exponential(optim: OptimConfig, epoch: float) -> float:
    return optim.lr * optim.gamma ** epoch


@SCHEDULES.register("constant")
def constant(optim: OptimConfig, epoch: float) -> float:
    return float(optim.lr)


def base_lr_at(optim: OptimConfig, epoch: float) -> float:
    return SCHEDULES.build(optim.policy, optim, epoch)


def lr_at(optim: OptimConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate of ``step`` of ``epoch`` (0-based)."""
    e = float(epoch) if optim.per == "epoch" else epoch + step / max(1, steps_per_epoch)
    lr = base_lr_at(optim, e)
    warm = float(optim.warmup_epochs)
    if e < warm:
        a = e / warm
        lr *= optim.warmup_factor * (1.0 - a) + a
    return lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
