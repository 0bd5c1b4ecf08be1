"""The trainer: CFCD stage 1/2, DOLG and the GeM baselines, one process to many (DDP via torchrun).

What one optimizer step does (``global_batch`` G samples, W processes, A accumulation steps
of ``micro_batch`` samples each, ``G = W * A * micro_batch``):

1. Every rank takes its contiguous slice of global batch ``t`` (:mod:`cfcd.train.samplers`), so
   the step sees the same images whatever W and A are.
2. Batch statistics (``loss.batch_stats: exact``): an objective whose statistics span the
   global batch (:attr:`cfcd.losses.Objective.batch_statistics`; MadaCos's median target cosine,
   which the reference all_gathers over 8 x 16 images) gets them over the **whole global
   batch**. With ``A == 1`` the objective computes them in the training forward (gathered over
   ranks). With ``A > 1`` a first no-grad forward over the accumulation window (train-mode BN,
   running statistics restored afterwards) gives :meth:`~cfcd.losses.Objective.window_statistics`
   all G samples, and the training forwards then use these fixed statistics. ``micro``
   computes them per micro-batch instead (cheaper, not the reference when ``W * micro_batch < 128``).
3. Loss per micro-batch: the global objective (``loss.global``, e.g. the CE of a classification
   head, a mean over the micro-batch) ``+ local_weight * (reference_batch / micro_batch) *`` the
   local objective (``loss.local``, CFCD's triplet sum over tuples), divided by A; DDP averages
   over ranks. With 16-image micro-batches this is exactly the reference's per-GPU loss; the
   rescaling keeps the objective the same for other micro-batch sizes. Every objective is called
   the same way (:mod:`cfcd.losses.base`); the trainer names none.
4. SGD (nesterov) step; the LR follows :mod:`cfcd.train.schedule` (per epoch by default).

Checkpoints (:mod:`cfcd.train.checkpoint`) hold the model with its head, optimizer, sampler and
RNG state; a restarted run continues from the newest one and reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cfcd.losses as losses
import cfcd.models as models
from cfcd.data.gnd import find_gnd, load_gnd
from cfcd.errors import CfcdError, InputError
from cfcd.evaluation.benchmark import run_benchmark
from cfcd.extract import ExtractOptions, parse_scales
from cfcd.losses import BatchLayout, CosineHead, Objective
from cfcd.losses.madacos import MadaCos
from cfcd.runtime import autocast_dtype, jsonable, precision_name, progress
from cfcd.train import checkpoint as ckpt_mod
from cfcd.train.builders import OPTIMIZERS, SAMPLERS, data_file, set_bn_eval
from cfcd.train.config import TrainConfig, dump_config
from cfcd.train.data import (
    TrainingDataset,
    TrainTransform,
    ValTransform,
    collate,
    opencv_fork_guard,
    read_labelled_list,
    worker_init,
)
from cfcd.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, destroy, init_distributed
from cfcd.train.logging import TrainLogger
from cfcd.train.schedule import lr_at, set_lr
from cfcd.utils.io import atomic_write_text

logger = logging.getLogger("cfcd.train")

#: The reference's per-GPU batch (8 GPUs x 16): the local triplet sum is taken over 2 tuples.
REFERENCE_MICRO_BATCH = 16


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


#: Where the initial weights named by the packaged recipes come from (cfcd never downloads them).
WEIGHT_SOURCES = {
    "R-50-1x64d_dds_8gpu.pyth": "the pycls ImageNet ResNet-50 checkpoint, "
                                "https://dl.fbaipublicfiles.com/pycls/dds_baselines/161235311/R-50-1x64d_dds_8gpu.pyth",
    "R-101-1x64d_dds_8gpu.pyth": "the pycls ImageNet ResNet-101 checkpoint, "
                                 "https://dl.fbaipublicfiles.com/pycls/dds_baselines/161167170/R-101-1x64d_dds_8gpu.pyth",
    "dinov2_vits14_pretrain.pth": "the DINOv2 ViT-S/14 hub checkpoint, "
                                  "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
}


def check_weights_file(key: str, path: str) -> None:
    """A missing ``model.weights`` / ``model.init`` file: name the recipe key and where the file comes from."""
    p = Path(path)
    if p.exists():
        return
    source = WEIGHT_SOURCES.get(p.name)
    where = f" It is {source} (download it yourself; cfcd never downloads)." if source else ""
    fallback = " (null: start from the model's own initialisation)" if key == "model.weights" else ""
    raise InputError(f"{path}: checkpoint file not found. Set {key}=PATH{fallback}.{where}")


def build_model(cfg: TrainConfig) -> nn.Module:
    """``cfcd.models.create`` + optional initial weights (ImageNet backbone, non-strict)."""

    m = cfg.model
    # a training run starts from the embedded weights where the model has them, else from a random
    # init that model.weights (ImageNet backbone) or model.init may overwrite
    initial = None if models.has_embedded_weights(m.name) else models.RANDOM_WEIGHTS
    model = models.create(m.name, weights=initial, **m.kwargs)
    if m.weights:
        check_weights_file("model.weights", m.weights)
        report = models.load_weights(model, m.weights, strict=False)
        if report.loaded == 0:
            raise InputError(f"{m.weights}: no tensor matches {m.name} ({report.summary()})")
        logger.info("initial weights: %s", report.summary())
    return model


def build_head(cfg: TrainConfig, embedding_dim: int) -> Objective | None:
    """The global objective ``loss.global`` (None for ``none``)."""

    lo = cfg.loss
    if not lo.global_ or lo.global_ == "none":
        return None
    return losses.create_from_recipe(lo.global_, lo.global_kwargs, embedding_dim=embedding_dim,
                                     num_classes=lo.num_classes)


def build_local_loss(cfg: TrainConfig) -> Objective | None:
    lo = cfg.loss
    if not lo.local:
        return None
    return losses.create(lo.local, **lo.local_kwargs)


def init_from_checkpoint(model: nn.Module, head: nn.Module | None, path: str, *, strict: bool) -> Any:
    """Start from a stage-1 checkpoint (ours or the official ``.pyth``): model weights, and the
    classifier ``desc_cls.*`` into the classification head's class weights."""

    report = models.load_weights(model, path, strict=strict)
    if report.loaded == 0:
        raise InputError(f"{path}: no tensor matches the model ({report.summary()})")
    head_state = {k[len(ckpt_mod.HEAD_PREFIX):]: v for k, v in report.extra.items()
                  if k.startswith(ckpt_mod.HEAD_PREFIX)}
    if head is not None and head_state:
        _load_head(head, head_state, source=str(path))
    elif isinstance(head, CosineHead):
        logger.warning("%s: no classifier weights (desc_cls.*): the loss head starts from scratch", path)
    logger.info("init from %s: %s", path, report.summary())
    return report


def _load_head(head: nn.Module, state: dict, *, source: str) -> None:
    own = head.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise InputError(f"{source}: classifier tensors do not fit the loss head {bad} "
                         "(check loss.num_classes and the embedding size)")
    missing = [k for k in own if k not in state]
    if missing:
        logger.warning("%s: classifier state lacks %s (kept from initialisation)", source, missing)
    head.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})


def freeze_parameters(model: nn.Module, prefixes) -> int:
    """``requires_grad = False`` for the parameters whose name starts with one of ``prefixes``;
    returns how many tensors were frozen. A prefix that matches nothing is an error (a typo
    would otherwise silently train everything)."""
    prefixes = tuple(prefixes or ())
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    unused = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unused:
        raise InputError(f"model.frozen: no parameter of the model starts with {unused} "
                         f"(parameters look like {names[0]!r}, {names[-1]!r})")
    count = 0
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
            count += 1
    logger.info("frozen: %d parameter tensors under %s", count, list(prefixes))
    return count


class TrainModule(nn.Module):
    """Model + global objective + local objective in one module, so DDP averages every gradient.

    ``forward(images, labels, batch_stats=None)`` returns ``(loss, aux)``: the weighted sum of
    the objectives and their statistics (each objective's loss under its ``log_name``).
    ``batch_stats`` maps a term name (``"global"``, ``"local"``) to the statistics that term's
    :meth:`~cfcd.losses.Objective.window_statistics` computed over the whole global batch.
    """

    def __init__(self, model: nn.Module, head: Objective | None, local_loss: Objective | None, *,
                 layout: BatchLayout, local_weight: float, micro_batch: int):
        super().__init__()
        self.model, self.head, self.local_loss = model, head, local_loss
        self.layout, self.micro_batch = layout, micro_batch
        self.local_scale = float(local_weight) * REFERENCE_MICRO_BATCH / micro_batch

    @property
    def tuple_size(self) -> int | None:
        """Rows per tuple of the batches (None: independent images)."""
        return self.layout.tuple_size

    def terms(self) -> list[tuple[str, Objective, float]]:
        """``(name, objective, weight)`` of every objective of the total loss."""
        out = []
        if self.head is not None:
            out.append(("global", self.head, 1.0))
        if self.local_loss is not None:
            out.append(("local", self.local_loss, self.local_scale))
        return out

    def forward(self, images: torch.Tensor, labels: torch.Tensor, batch_stats: dict | None = None):
        feats = self.model.forward_features(images)
        aux: dict[str, torch.Tensor] = {}
        loss = feats["global"].new_zeros((), dtype=torch.float32)
        for name, objective, weight in self.terms():
            missing = [k for k in objective.inputs if feats.get(k) is None]
            if missing:
                raise CfcdError(f"{type(objective).__name__} needs a model whose forward_features gives {missing}")
            term, stats = objective.objective(feats, labels, self.layout, (batch_stats or {}).get(name))
            if weight != 1.0:
                term = term * weight
            aux.update(stats)
            aux[objective.log_name] = term.detach()
            loss = loss + term
        aux["loss"] = loss.detach()
        return loss, aux


@contextlib.contextmanager
def frozen_bn_buffers(module: nn.Module):
    """Run forwards in train mode without changing BN running statistics (the exact pre-pass)."""
    saved = [(b, b.detach().clone()) for n, b in module.named_buffers()
             if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@dataclass
class TrainState:
    epoch: int = 0            # completed epochs
    step_in_epoch: int = 0    # completed global steps in the current epoch
    global_step: int = 0
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Train from a resolved config (:func:`cfcd.train.config.load_config`).

    Args:
        cfg: the typed config.
        device: ``"cuda"``, ``"cpu"`` or None (auto; under torchrun the local GPU).
        resume: continue from the newest checkpoint in ``out_dir`` if there is one.
        stop_after_steps: stop (after checkpointing) once this many global steps are done in
            this process -- used to test resuming; None: train to the end.
    """

    def __init__(self, cfg: TrainConfig, *, device: str | None = None, resume: bool = True,
                 stop_after_steps: int | None = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"Trainer takes a TrainConfig (cfcd.train.config.load_config), got {type(cfg).__name__}")
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(device)
        self.device = self.dist.device
        self.resume = resume
        self.stop_after_steps = stop_after_steps
        self.out_dir = cfg.out_dir
        self.state = TrainState()
        self._built = False

    # -- setup -----------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, t, d, lo = self.cfg, self.cfg.train, self.cfg.data, self.cfg.loss
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        np.random.seed(t.seed % 2**32)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cpu":
            # zero-initialised residual BN gammas make denormal activations, 3x slower on x86 CPUs
            torch.set_flush_denormal(True)

        # every file the recipe names is checked before the model is built (minutes for 81313 classes)
        train_path = data_file(cfg, "train_list")
        for key, path in (("model.weights", cfg.model.weights), ("model.init", cfg.model.init)):
            if path:
                check_weights_file(key, path)
        self.model = build_model(cfg)
        self.head = build_head(cfg, int(self.model.embedding_dim))
        self.local_loss = build_local_loss(cfg)
        self.val_path = None
        if isinstance(self.head, CosineHead) and d.val_list and t.eval_period:
            self.val_path = data_file(cfg, "val_list")
        if cfg.model.init:
            init_from_checkpoint(self.model, self.head, cfg.model.init, strict=cfg.model.strict)
        freeze_parameters(self.model, cfg.model.frozen)

        classes = lo.num_classes if isinstance(self.head, CosineHead) else None
        self.train_list = read_labelled_list(train_path, d.root, num_classes=classes)
        if self.dist.is_main and classes is not None:
            _warn_unused_classes(self.train_list, classes, train_path)
        transform = TrainTransform(d.im_size, self.model.preprocess, area_frac=d.area_frac,
                                   flip=d.flip, lighting=d.lighting)
        self.dataset = TrainingDataset(self.train_list, transform, seed=t.seed)
        common = dict(global_batch=t.global_batch, micro_batch=t.micro_batch,
                      rank=self.dist.rank, world_size=self.dist.world_size, seed=t.seed)
        self.sampler = SAMPLERS.build(d.sampler, cfg, self.train_list, common, self)
        self.accumulation = self.sampler.accumulation

        self.model.to(self.device)
        if self.head is not None:
            self.head.to(self.device)
        if self.device.type == "cuda" and t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        layout = BatchLayout(tuple_size=getattr(self.sampler, "tuple_size", None))  # tuple samplers only
        self.module = TrainModule(self.model, self.head, self.local_loss, layout=layout,
                                  local_weight=lo.local_weight, micro_batch=t.micro_batch)
        if self.local_loss is not None:
            self.local_loss.to(self.device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = OPTIMIZERS.build(cfg.optim.name, params, cfg.optim)

        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=t.find_unused_parameters)
        else:
            self.ddp = self.module
        if t.compile:
            self.model.forward_features = torch.compile(self.model.forward_features)

        amp = t.amp if self.device.type == "cuda" else "none"
        self.autocast_dtype = autocast_dtype(amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

        if self.resume:
            self._maybe_resume()  # before writing anything into out_dir: a mismatch leaves it untouched
        self.logger = TrainLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=t.tensorboard)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", dump_config(cfg))
        self._built = True

    # -- checkpoints -----------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.head is not None:
            state.update({ckpt_mod.HEAD_PREFIX + k: v.detach().cpu() for k, v in self.head.state_dict().items()})
        return state

    def save(self, path: Path) -> None:
        if not self.dist.is_main:
            return
        payload = {
            "epoch": self.state.epoch,
            "step_in_epoch": self.state.step_in_epoch,
            "global_step": self.state.global_step,
            "model_state": self.model_state(),
            "optimizer_state": self.optimizer.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else {},
            "sampler_state": {"epoch": self.state.epoch, "start_step": self.state.step_in_epoch,
                              "seed": self.sampler.seed, "global_batch": self.sampler.global_batch},
            "rng_state": ckpt_mod.rng_state(),
            "model_config": jsonable(getattr(self.model, "model_config", {})),
            "config_yaml": dump_config(self.cfg),
            "metrics": {k: float(v) for k, v in self.state.metrics.items()},
            "world_size": self.dist.world_size,
        }
        ckpt_mod.save_checkpoint(path, payload)

    def _maybe_resume(self) -> None:
        path = ckpt_mod.latest_checkpoint(self.out_dir) if self.dist.is_main else None

        path = broadcast_object(str(path) if path else None)
        if not path:
            return
        ck = ckpt_mod.load_checkpoint(path)
        model_state, head_state = ckpt_mod.split_head_state(ck["model_state"])
        try:
            self.model.load_state_dict(model_state)
            if self.head is not None:
                self.head.load_state_dict(head_state)
            self.optimizer.load_state_dict(ck["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: cannot resume this run with the current recipe ({str(exc).splitlines()[0]}); "
                             "use another train.out_dir or --no-resume") from None
        if self.scaler is not None and ck.get("scaler_state"):
            self.scaler.load_state_dict(ck["scaler_state"])
        self.sampler.load_state_dict(ck["sampler_state"])
        ckpt_mod.set_rng_state(ck["rng_state"])
        self.state = TrainState(int(ck["epoch"]), int(ck["step_in_epoch"]), int(ck["global_step"]),
                                dict(ck.get("metrics", {})))
        logger.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.global_step)

    # -- training ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, images, labels):
        nb = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=nb)
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=nb)

    @torch.no_grad()
    def exact_batch_stats(self, window: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict]:
        """Statistics over the whole global batch of every objective that has them, from a no-grad
        train-mode pre-pass: ``({term: batch_stats}, report for the log)``."""
        terms = [(name, obj) for name, obj, _ in self.module.terms() if obj.batch_statistics]
        if not terms:
            return {}, {}
        outputs: dict[str, list] = {name: [] for name, _ in terms}
        labels = []
        with frozen_bn_buffers(self.model), self._autocast():
            for images, y in window:
                feats = self.model.forward_features(images)
                for name, obj in terms:  # keep only what the objective reads
                    outputs[name].append({k: feats[k] for k in obj.inputs})
                labels.append(y)
        batch_stats, report = {}, {}
        for name, obj in terms:
            batch_stats[name], term_report = obj.window_statistics(outputs[name], labels)
            report.update(term_report)
        return batch_stats, report

    def train_step(self, window: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of a global batch."""
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        window = [self._to_device(x, y) for x, y in window]
        batch_stats, report = None, {}
        if self.cfg.loss.batch_stats == "exact" and len(window) > 1:
            batch_stats, report = self.exact_batch_stats(window)
        sums: dict[str, float] = {}
        for k, (images, labels) in enumerate(window):
            sync = k == len(window) - 1
            ctx = self.ddp.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    loss, aux = self.ddp(images, labels, batch_stats or None)
                scaled = loss / len(window)
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            for key, v in aux.items():
                sums[key] = sums.get(key, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        clip = self.cfg.optim.clip_grad
        if clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), float(clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        out = {key: v / len(window) for key, v in sums.items()}  # micro-batches are equal-sized
        out.update(report)
        return out

    def _loader(self, sampler, dataset):
        from torch.utils.data import DataLoader


        workers = self.cfg.data.workers
        if workers:
            opencv_fork_guard()  # the loader forks its workers at each epoch's iter()
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          persistent_workers=False, worker_init_fn=worker_init if workers else None)

    def fit(self) -> dict[str, float]:
        """Train to ``optim.epochs`` (or ``stop_after_steps``); returns the last metrics."""
        if not self._built:
            self.build()
        cfg, t = self.cfg, self.cfg.train
        epochs = cfg.optim.epochs
        steps_per_epoch = self.sampler.steps_per_epoch()
        if t.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        done_here = 0
        if self.dist.is_main and self.state.epoch < epochs:
            print(epoch_legend(self.head, self.local_loss, validates=bool(self.val_path)), file=sys.stderr, flush=True)
        try:
            while self.state.epoch < epochs:
                epoch = self.state.epoch
                self.sampler.set_epoch(epoch, self.state.step_in_epoch)
                self.module.train()
                if t.freeze_bn:
                    set_bn_eval(self.module)
                loader = iter(self._loader(self.sampler, self.dataset))
                bar = progress(total=steps_per_epoch, initial=self.state.step_in_epoch, unit="step",
                                enabled=self.dist.is_main and t.progress, desc=f"epoch {epoch + 1}/{epochs}")
                meter: dict[str, Any] = {}
                t0, images_seen, first_step = time.perf_counter(), 0, self.state.step_in_epoch
                while self.state.step_in_epoch < steps_per_epoch:
                    window = [next(loader)[:2] for _ in range(self.accumulation)]
                    lr = lr_at(cfg.optim, epoch, self.state.step_in_epoch, steps_per_epoch)
                    out = self.train_step(window, lr)
                    out.update(self._active_share(out))
                    self.state.step_in_epoch += 1
                    self.state.global_step += 1
                    done_here += 1
                    images_seen += self.sampler.global_batch
                    for k, v in out.items():  # device tensors: no sync until a log line is written
                        meter[k] = meter.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))
                    bar.update(1)
                    if self.state.global_step % t.log_every == 0 or self.state.step_in_epoch == steps_per_epoch:
                        row = {k: float(v) for k, v in out.items()}
                        row.update(lr=lr, epoch=epoch, images_per_s=images_seen / max(1e-9, time.perf_counter() - t0))
                        self.logger.log("train", self.state.global_step, row)
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
                    if self.stop_after_steps is not None and done_here >= self.stop_after_steps:
                        self._checkpoint_mid_epoch()
                        return {k: float(v) / max(1, self.state.step_in_epoch - first_step) for k, v in meter.items()}
                    if t.checkpoint_steps and self.state.global_step % t.checkpoint_steps == 0:
                        self._checkpoint_mid_epoch()
                bar.close()
                del loader
                steps = max(1, steps_per_epoch - first_step)
                metrics = {f"train_{k}": float(v) / steps for k, v in meter.items()}
                metrics.update({f"train_{k}": v for k, v in self._active_share(meter).items()})  # of the epoch's sums
                metrics["epoch_time_s"] = time.perf_counter() - t0
                metrics["images_per_s"] = images_seen / max(1e-9, metrics["epoch_time_s"])
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                if self._due(t.eval_period) and self.val_path:
                    metrics.update(self.validate())
                if self._due(cfg.benchmark.every) and cfg.benchmark.datasets:
                    metrics.update(self.benchmark())
                self.state.metrics = metrics
                if self.dist.is_main:
                    print(epoch_summary(self.state.epoch, epochs, metrics), file=sys.stderr, flush=True)
                self.logger.log("epoch", self.state.global_step, {"epoch": self.state.epoch, **metrics})
                self.save(ckpt_mod.epoch_path(self.out_dir, self.state.epoch))
                if self.dist.is_main:
                    ckpt_mod.prune_checkpoints(self.out_dir, t.keep_every)
                    (self.out_dir / "checkpoints" / "last.pt").unlink(missing_ok=True)
                barrier()
            if self.dist.is_main:
                self.export(self.out_dir / "final")
                name = self.cfg.model.name
                print(f"final weights: {self.out_dir / 'final'} (cfcd extract --model {name} --weights "
                      f"{self.out_dir / 'final'}; checkpoints in {self.out_dir / 'checkpoints'})",
                      file=sys.stderr, flush=True)
            barrier()
            return dict(self.state.metrics)
        finally:
            self.logger.close()

    def _active_share(self, values: dict) -> dict[str, Any]:
        """``active_share``: the share of the local triplets (matched pair x negative) whose hinge is
        non-zero, the part of the local term that still trains; from the ``matches`` and ``active``
        counts a local objective reports (device tensors stay on the device)."""
        tuple_size = self.module.tuple_size
        if "active" not in values or "matches" not in values or not tuple_size or tuple_size < 3:
            return {}
        triplets = values["matches"] * (tuple_size - 2)
        if torch.is_tensor(triplets):
            return {"active_share": values["active"] / triplets.clamp_min(1)}
        return {"active_share": float(values["active"]) / max(1.0, float(triplets))}

    def _checkpoint_mid_epoch(self) -> None:
        self.save(self.out_dir / "checkpoints" / "last.pt")
        barrier()

    def _due(self, every) -> bool:
        every = int(every or 0)
        return every > 0 and (self.state.epoch % every == 0 or self.state.epoch == self.cfg.optim.epochs)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Top-1 (argmax cosine) and CE of the classification head on the val list (no augmentation).

        The list is split over ranks by stride; the head runs in eval mode (MadaCos: m = 0, batch-dependent
        s as in the reference) without cross-rank statistics. Stage-2 val tuples are not built:
        the reference's val triplet loss (CFCD ``core/trainer.py`` ``test_epoch``) is not comparable
        across settings anyway.
        """
        from torch.utils.data import DataLoader


        if not isinstance(self.head, CosineHead):
            return {}
        d, size = self.cfg.data, self.cfg.train.micro_batch
        val = read_labelled_list(self.val_path, d.root, num_classes=self.cfg.loss.num_classes)
        n = len(val) if not d.val_max_images else min(len(val), d.val_max_images)
        ds = TrainingDataset(val, ValTransform(d.im_size, d.test_size, self.model.preprocess))
        mine = list(range(self.dist.rank, n, self.dist.world_size))
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        loader = DataLoader(ds, batch_sampler=batches, num_workers=d.workers, collate_fn=collate)
        self.module.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        try:
            with self.head.local_statistics():  # only this rank's share: no collective
                for images, labels, _ in loader:
                    images, labels = self._to_device(images, labels)
                    with self._autocast():
                        emb = self.model.forward_features(images)["global"]
                    logits = self.head.logits(emb, labels).float()
                    totals[0] += F.cross_entropy(logits, labels, reduction="sum").item()
                    totals[1] += (logits.argmax(1) == labels).sum().item()
                    totals[2] += len(labels)
        finally:
            self.module.train()
        if self.dist.distributed:
            totals = all_reduce_sum(totals.to(self.device)).cpu()
        count = max(1.0, float(totals[2]))
        return {"val_loss": float(totals[0]) / count, "val_top1": float(totals[1]) / count, "val_images": count}

    def benchmark(self) -> dict[str, float]:
        """Optional revisitop evaluation hook: :func:`cfcd.evaluation.benchmark.run_benchmark` with the current
        model (every rank extracts its share, rank 0 evaluates), log mAP per setup. A failure is logged,
        never fatal to training."""

        b = self.cfg.benchmark
        out: dict[str, float] = {}
        self.model.eval()
        try:
            # the training precision (fp16 stays fp16), and the model's layout left as the trainer set it
            options = ExtractOptions(scales=parse_scales(b.scales), max_size=b.max_size,
                                     device=str(self.device), precision=precision_name(self.autocast_dtype),
                                     channels_last=self.cfg.train.channels_last and self.device.type == "cuda",
                                     workers=self.cfg.data.workers, progress=False)
            for ds in b.datasets:
                gnd = load_gnd(find_gnd(ds, b.root), ds)
                base = self.out_dir / "benchmark" / f"epoch_{self.state.epoch:04d}" / ds
                result = run_benchmark(self.model, gnd, b.root, base, options, overwrite=True, log=logger.info,
                                       evaluate=self.dist.is_main)
                if self.dist.is_main:
                    for setup, values in result.plain.metrics(percent=True).items():
                        if values.get("mAP") is not None:
                            out[f"{ds}_{setup}_mAP"] = float(values["mAP"])
        except Exception as exc:  # noqa: BLE001 - an evaluation failure must not kill training
            logger.warning("benchmark hook failed: %s", exc)
        finally:
            self.model.train()
            if self.cfg.train.freeze_bn:
                set_bn_eval(self.model)
        barrier()
        return broadcast_object(out)

    def export(self, out_dir: Path) -> None:
        """Deployable model: ``model.safetensors`` + ``config.json`` (+ the head as extra tensors)."""

        extra = None
        if self.head is not None and len(self.head.state_dict()):
            extra = {ckpt_mod.HEAD_PREFIX + k: v for k, v in self.head.state_dict().items()}
        models.save_weights(self.model, out_dir, extra=extra,
                            meta={"trained_with": self.cfg.name, "epochs": self.state.epoch,
                                  "global_step": self.state.global_step})

    def close(self) -> None:
        destroy(self.dist)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _warn_unused_classes(train_list, num_classes: int, path) -> None:
    """A classifier with many more rows than classes in the list wastes memory and dilutes MadaCos."""
    present = len(set(int(label) for label in train_list.labels))
    if present < num_classes:
        message = (f"warning: {path} has {present} classes but loss.num_classes is {num_classes}: "
                   f"{num_classes - present} classifier rows are never trained (set loss.num_classes={present} "
                   "if the labels are 0..N-1)")
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)


def epoch_legend(head: nn.Module | None, local_loss: nn.Module | None, *, validates: bool = False) -> str:
    """What the numbers of the epoch lines mean, printed once before the first epoch."""

    text = ("epoch lines: loss = mean training loss; top-1 = batch top-1 (with margin): augmented training "
            "batches, the head's margin applied")
    if validates:
        text += "; val top-1 = top-1 on data.val_list, eval mode (no margin, no augmentation)"
    text += "."
    if isinstance(head, MadaCos):
        text += (" MadaCos raises its scale s as the target cosines grow, keeping the median sample's target "
                 "probability at alpha: the loss rises while the model learns (docs/training.md).")
    if local_loss is not None:
        text += (" active triplets = share of the local triplets (matched pair x negative) with a non-zero hinge, "
                 "the part of the local term that trains.")
    return text


# (metric, how the epoch line shows it), in the order of the line
_EPOCH_FIELDS = (
    ("train_loss", lambda m: f"loss {m['train_loss']:.4f}"),
    ("train_loss_local", lambda m: f"local {m['train_loss_local']:.4f}"),
    ("train_top1", lambda m: f"top-1 {100 * m['train_top1']:.1f}%"),
    ("train_scale", lambda m: f"s {m['train_scale']:.1f} m {m.get('train_margin', float('nan')):.3f}"),
    ("train_active_share", lambda m: f"active triplets {100 * m['train_active_share']:.1f}%"),
    ("val_top1", lambda m: f"val top-1 {100 * m['val_top1']:.1f}%"),
)


def epoch_summary(epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """One line per epoch: loss, top-1, MadaCos s and m, active triplets, validation, benchmark mAP,
    time (:func:`epoch_legend` says what each is)."""
    parts = [f"epoch {epoch}/{epochs}"]
    for key, show in _EPOCH_FIELDS:
        if key in metrics:
            parts.append(show(metrics))
    parts += [f"{k[:-4]} mAP {v:.2f}" for k, v in metrics.items() if k.endswith("_mAP")]  # already percent
    if "epoch_time_s" in metrics:
        parts.append(f"{metrics['epoch_time_s']:.1f} s ({metrics.get('images_per_s', 0):.1f} img/s)")
    return "  ".join(parts)


def train(cfg: TrainConfig, *, device: str | None = None, resume: bool = True,
          stop_after_steps: int | None = None) -> dict[str, float]:
    """Build a :class:`Trainer` from ``cfg``, train, clean up; returns the last epoch's metrics."""
    trainer = Trainer(cfg, device=device, resume=resume, stop_after_steps=stop_after_steps)
    try:
        return trainer.fit()
    finally:
        trainer.close()
