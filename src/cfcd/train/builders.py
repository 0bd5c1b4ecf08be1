"""The recipe's named parts: batch samplers (``data.sampler``) and optimizers (``optim.name``).

Each is a builder in a :class:`~cfcd.utils.registry.Registry`; a new one is a decorated function::

    @SAMPLERS.register("my_sampler")
    def my_sampler(cfg, train_list, common, trainer): ...

Heavy modules are imported inside the builders: the config check reads these tables without
importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfcd.errors import InputError
from cfcd.utils.registry import Registry

if TYPE_CHECKING:
    from cfcd.train.config import OptimConfig, TrainConfig

def set_bn_eval(module) -> None:
    """cirtorch: BN layers in eval mode (running stats frozen; affine parameters still learn)."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


#: ``builder(cfg, train_list, common, trainer) -> GlobalBatchSampler``; ``common`` holds the batch
#: layout (global_batch, micro_batch, rank, world_size, seed); ``trainer`` the model and device.
SAMPLERS = Registry("data.sampler")
#: ``builder(params, optim_config) -> torch.optim.Optimizer``.
OPTIMIZERS = Registry("optim.name")

# what to do when a data file named in the recipe is missing
_DATA_FILE_HINTS = {
    "train_list": ("training list", "`cfcd train make-list --csv train_clean.csv --root DIR --out lists/` writes one"),
    "val_list": ("validation list", "data.val_list=null trains without validation"),
    "confusions": ("confusion file", "`cfcd train confusions` writes it; data.confusions=null draws random negatives"),
}


def data_file(cfg: TrainConfig, key: str) -> str:
    """``data.<key>`` as a path: as given (absolute or relative to the working directory), else
    relative to ``data.root``. A missing file is an error naming the recipe key to set."""
    what, hint = _DATA_FILE_HINTS[key]
    value, root = getattr(cfg.data, key), cfg.data.root
    if value is None:
        raise InputError(f"data.{key} is not set: the {what} is required ({hint})")
    p = Path(value)
    if p.is_file():
        return str(p)
    tried = [p]
    if root is not None and not p.is_absolute():
        if (Path(root) / p).is_file():
            return str(Path(root) / p)
        tried.insert(0, Path(root) / p)
    where = " or ".join(str(t) for t in tried)
    root_note = "" if root is not None else "; data.root is not set"
    raise InputError(f"{value}: {what} not found (looked for {where}{root_note}). Set data.{key}=PATH "
                     f"(absolute, or relative to data.root); {hint}")


# ----------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------


@SAMPLERS.register("shuffle")
def shuffle_sampler(cfg: TrainConfig, train_list, common: dict, trainer: Any):
    from cfcd.train.samplers import ShuffleBatchSampler

    return ShuffleBatchSampler(len(train_list), **common)


@SAMPLERS.register("tuple")
def tuple_sampler(cfg: TrainConfig, train_list, common: dict, trainer: Any):
    """CFCD stage 2: ``[anchor, positive, negatives]`` with hard negatives from ``data.confusions``."""
    from cfcd.train.data import read_confusions
    from cfcd.train.samplers import TupleBatchSampler

    gt_pred = read_confusions(data_file(cfg, "confusions"), train_list) if cfg.data.confusions else None
    return TupleBatchSampler(train_list.labels, tuple_size=cfg.data.tuple_size, gt_pred=gt_pred, **common)


@SAMPLERS.register("class_balanced")
def class_balanced_sampler(cfg: TrainConfig, train_list, common: dict, trainer: Any):
    from cfcd.train.samplers import ClassBalancedBatchSampler

    return ClassBalancedBatchSampler(train_list.labels, images_per_class=cfg.data.images_per_class, **common)


@SAMPLERS.register("mined")
def mined_sampler(cfg: TrainConfig, train_list, common: dict, trainer: Any):
    """cirtorch: hardest negatives by the current model, every epoch."""
    from cfcd.train.mining import HardNegativeMiner, MinedTupleBatchSampler, model_describer, pairs_from_labels

    mi, seed = cfg.data.mining, cfg.train.seed
    qpool, ppool = pairs_from_labels(train_list.labels, seed=seed)
    miner = HardNegativeMiner(qpool, ppool, train_list.labels, nnum=mi.nnum, qsize=mi.qsize,
                              poolsize=mi.poolsize, seed=seed)
    describe = model_describer(trainer.model, [train_list.full_path(i) for i in range(len(train_list))],
                               image_size=mi.image_size, device=str(trainer.device),
                               after=(lambda: set_bn_eval(trainer.module)) if cfg.train.freeze_bn else None)
    return MinedTupleBatchSampler(miner, describe, **common)


# ----------------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------------


@OPTIMIZERS.register("sgd")
def sgd(params, o: OptimConfig):
    import torch

    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


@OPTIMIZERS.register("adam")
def adam(params, o: OptimConfig):
    import torch

    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params, o: OptimConfig):
    import torch

    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
