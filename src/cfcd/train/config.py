"""Training recipes: versioned YAML files read into typed dataclasses, with ``key=value`` overrides.

A recipe is a nested mapping whose sections are the dataclasses below (:class:`TrainConfig` and
its ``model``, ``loss``, ``data``, ``optim``, ``train``, ``benchmark`` sections; every field is a
recipe key, its default and its meaning). Files in ``cfcd/configs/`` are found by name
(``--config cfcd_r50_s1``), anything else is a path; ``_base_: other.yaml`` inherits a recipe.
Unknown keys and values of the wrong type are errors naming the key (a typo must not silently
train the default), and the resolved config is written next to the checkpoints so a run
documents itself.

The trainer reads attributes: ``cfg.optim.lr``, ``cfg.loss.global_`` (YAML key ``global``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cfcd.errors import InputError

#: Bump when the meaning of a key changes; recipes declare the version they were written for.
CONFIG_VERSION = 1

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

#: Keys renamed since version 1 of the recipes: the old name still works (recipes and overrides).
RENAMED_KEYS = {"loss.madacos_stats": "loss.batch_stats"}


@dataclass
class ModelConfig:
    name: str = "cfcd_r50"                  # cfcd.models registry name
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for cfcd.models.create
    weights: str | None = None              # initial weights for cfcd.models.create (e.g. ImageNet backbone)
    init: str | None = None                 # checkpoint to start from: ours (dir/.pt) or the official .pyth,
                                            # incl. the classifier weight (desc_cls.weight) -> loss head
    strict: bool = False                    # strict key matching when loading `init`
    frozen: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed (e.g.
                                            # backbone.blocks.0); their BN layers still follow train.freeze_bn


@dataclass
class LossConfig:
    global_: str | None = field(default="madacos", metadata={"key": "global"})
                                            # madacos | arcface | cosface | curricularface | ap | none
    global_kwargs: dict[str, Any] = field(default_factory=lambda: {"alpha": 0.02})
    num_classes: int | None = 81313
    batch_stats: str = "exact"              # losses with batch statistics (MadaCos's median): exact: over the
                                            # global batch even with accumulation (extra no-grad forward);
                                            # micro: per micro-batch (cheaper). Old name: madacos_stats
    local: str | None = None                # local_triplet for CFCD stage 2
    local_kwargs: dict[str, Any] = field(default_factory=lambda: {"margin": 0.1, "ratio": 0.9,
                                                                  "top_fraction": 0.5})
    local_weight: float = 1.0               # the code's effective lambda (the yaml's LAMDA 0.05 is ignored)


@dataclass
class MiningConfig:
    """``data.sampler: mined`` (cirtorch TuplesDataset): per epoch, hardest negatives by the current model."""

    nnum: int = 5
    qsize: int = 2000
    poolsize: int = 20000
    image_size: int | None = 1024


@dataclass
class DataConfig:
    root: str | None = None                 # image root; list paths are relative to it
    train_list: str | None = "train_list.txt"
    val_list: str | None = None
    confusions: str | None = None           # landmark_scores.txt for hard negatives (stage 2)
    im_size: int = 512
    test_size: int = 512
    area_frac: float = 0.08
    flip: float = 0.5
    lighting: float = 0.1
    workers: int = 4
    tuple_size: int = 8
    sampler: str = "shuffle"                # shuffle | tuple | class_balanced | mined
    images_per_class: int = 4               # class_balanced only
    mining: MiningConfig = field(default_factory=MiningConfig)
    val_max_images: int | None = None


@dataclass
class OptimConfig:
    name: str = "sgd"                       # sgd | adam | adamw
    lr: float = 0.005                       # base LR for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1.0e-4            # on all parameters, as the reference
    epochs: int = 50
    warmup_epochs: float = 5                # fractions allowed
    warmup_factor: float = 0.1
    policy: str = "cos"                     # cos | steps | exp | constant
    steps: list[float] = field(default_factory=list)  # epochs where the LR is multiplied by lr_mult (policy steps)
    lr_mult: float = 0.1
    gamma: float = 0.99                     # policy exp: lr = base * gamma**epoch
    per: str = "epoch"                      # epoch: constant within an epoch (reference); step: per step
    clip_grad: float | None = None


@dataclass
class RunConfig:
    """The ``train`` section: batch layout, precision, output and logging."""

    global_batch: int = 128
    micro_batch: int = 16                   # per forward/backward on one process
    seed: int = 1
    amp: str | bool | None = "bf16"         # bf16 | fp16 | none (CUDA only; CPU runs fp32)
    channels_last: bool = True
    compile: bool = False
    freeze_bn: bool = False                 # cirtorch: BN layers in eval mode
    out_dir: str = "runs/{name}"
    keep_every: int = 5                     # keep every 5th epoch checkpoint (plus the last)
    checkpoint_steps: int = 0               # also save <out>/checkpoints/last.pt every N steps (0: epoch ends only)
    log_every: int = 20
    eval_period: int = 1                    # val every N epochs (0: never)
    max_steps_per_epoch: int | None = None
    tensorboard: bool = True
    progress: bool = True
    find_unused_parameters: bool = False
    deterministic: bool = False
    cudnn_benchmark: bool = True


@dataclass
class BenchmarkConfig:
    """Optional revisitop evaluation hook."""

    datasets: list[str] = field(default_factory=list)  # e.g. [roxford5k, rparis6k]
    root: str | None = None
    every: int = 0                          # epochs; 0: never
    scales: list[float] = field(default_factory=lambda: [0.7071, 1.0, 1.4142])
    max_size: int | None = 1024


@dataclass
class TrainConfig:
    """A resolved recipe (:func:`load_config`)."""

    version: int = CONFIG_VERSION
    name: str = "unnamed"
    stage: int = 1                          # 1: global (classification or listwise); 2: + local triplets on tuples
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    @property
    def out_dir(self) -> Path:
        """``train.out_dir`` with ``{name}`` filled in."""
        return Path(str(self.train.out_dir).format(name=self.name))


# ----------------------------------------------------------------------------------------------
# fields and types
# ----------------------------------------------------------------------------------------------


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _fields(cls) -> dict[str, tuple[str, Any, dataclasses.Field]]:
    """YAML key -> (attribute, type hint, field)."""
    hints = typing.get_type_hints(cls)
    return {_key(f): (f.name, hints[f.name], f) for f in dataclasses.fields(cls)}


def _options(hint) -> tuple[list, bool]:
    """The non-None alternatives of a hint, and whether None is allowed."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def _is_section(hint) -> bool:
    return dataclasses.is_dataclass(hint)


def _is_mapping(hint) -> bool:
    return (typing.get_origin(hint) or hint) is dict


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _NAMES.get(type(value), type(value).__name__)


def _fits(value: Any, hint) -> bool:
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and (item is Any or all(_fits(v, item) for v in value))
    return True


def _check_value(full: str, value: Any, hint, default: Any) -> None:
    """``optim.lr=abc`` is refused here with its key, not as a traceback hours into the trainer."""
    options, nullable = _options(hint)
    if value is None:
        if nullable:
            return
        main = options[0]
    else:
        if any(_fits(value, h) for h in options):
            return
        main = options[0]
    origin = typing.get_origin(main) or main
    expected = _NAMES.get(origin, getattr(origin, "__name__", str(origin)))
    if origin is list and typing.get_args(main) and isinstance(value, list):
        expected = "a list of " + {str: "strings", float: "numbers", int: "integers"}.get(typing.get_args(main)[0], "values")
    like = f" (like the default {default!r})" if default is not None else ""
    raise InputError(f"{full} must be {expected}{like}, got {value!r} ({_type_name(value)})")


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------


def merge(cfg: TrainConfig, update: dict, *, source: str = "config", override: bool = False) -> TrainConfig:
    """A copy of ``cfg`` with the nested mapping ``update`` applied, checked key by key.

    A recipe (``override=False``) replaces a ``*kwargs`` mapping (a new head has other
    arguments); a command-line override (``override=True``) edits single entries of it.
    """
    out = copy.deepcopy(cfg)
    _merge_into(out, update, path="", source=source, override=override)
    return out


def _merge_into(obj, update: dict, *, path: str, source: str, override: bool) -> None:
    if not isinstance(update, dict):
        raise InputError(f"{source}: {path.rstrip('.') or 'a recipe'!r} must be a mapping, got {update!r}")
    fields = _fields(type(obj))
    for key, value in update.items():
        full = f"{path}{key}"
        if full in RENAMED_KEYS:
            old, full = full, RENAMED_KEYS[full]
            key = full.rsplit(".", 1)[-1]
            if key in update and update[key] != value:
                raise InputError(f"{source}: {full!r} and its old name {old!r} disagree")
        if key not in fields:
            raise InputError(f"{source}: unknown key {full!r}")
        attr, hint, f = fields[key]
        if _is_section(hint):
            if not isinstance(value, dict):
                raise InputError(f"{source}: {full!r} must be a mapping, got {value!r}")
            _merge_into(getattr(obj, attr), value, path=f"{full}.", source=source, override=override)
        elif _is_mapping(hint):
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{source}: {full!r} must be a mapping, got {value!r}")
            value = copy.deepcopy(value or {})
            setattr(obj, attr, {**getattr(obj, attr), **value} if override else value)
        else:
            _check_value(full, value, hint, _default(f))
            setattr(obj, attr, copy.deepcopy(value))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def to_dict(cfg) -> dict:
    """The config as a plain nested mapping with the recipe's keys (``global``, not ``global_``)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def from_dict(data: dict, *, source: str = "config") -> TrainConfig:
    """A validated config from a recipe-layout mapping (e.g. :func:`to_dict`'s output)."""
    cfg = merge(TrainConfig(), data, source=source)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# files and overrides
# ----------------------------------------------------------------------------------------------


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A recipe path, or the name of a packaged recipe (``cfcd_r50_s1`` or ``cfcd_r50_s1.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIGS_DIR / p.name, CONFIGS_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(q.stem for q in CONFIGS_DIR.glob("*.yaml")))
    raise InputError(f"{name_or_path}: no such recipe file or packaged recipe (packaged: {known})")


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=0.01", "data.root=/x"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise InputError(f"override {item!r}: cannot parse the value ({exc})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part!r} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str | os.PathLike | None = None,
                overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- recipe file (``_base_`` chains allowed) <- overrides; validated."""
    cfg = TrainConfig()
    if name_or_path is not None:
        cfg = _read_recipe(find_config(name_or_path), set())
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        cfg = merge(cfg, ov, source="override", override=True)
    validate(cfg)
    return cfg


def _read_recipe(path: Path, seen: set) -> TrainConfig:
    if path.resolve() in seen:
        raise InputError(f"{path}: _base_ cycle")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe must be a mapping")
    base = data.pop("_base_", None)
    cfg = TrainConfig()
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            base_path = find_config(base)
        cfg = _read_recipe(base_path, seen)
    return merge(cfg, data, source=str(path))


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def validate(cfg: TrainConfig) -> None:
    """Checks that catch a wrong recipe before hours of data loading."""
    from cfcd.train.builders import OPTIMIZERS, SAMPLERS
    from cfcd.train.schedule import SCHEDULES

    if cfg.version > CONFIG_VERSION:
        raise InputError(f"recipe version {cfg.version} is newer than this cfcd ({CONFIG_VERSION})")
    if cfg.stage not in (1, 2):
        raise InputError(f"stage must be 1 or 2, got {cfg.stage!r}")
    t, d, o, lo = cfg.train, cfg.data, cfg.optim, cfg.loss
    for key in ("global_batch", "micro_batch"):
        if getattr(t, key) < 1:
            raise InputError(f"train.{key} must be a positive integer, got {getattr(t, key)!r}")
    SAMPLERS.check(d.sampler)
    if d.sampler == "mined":
        size = 2 + d.mining.nnum
        if t.micro_batch % size:
            raise InputError(f"train.micro_batch {t.micro_batch} must be a multiple of the mined tuple size {size} "
                             "(2 + data.mining.nnum)")
    if cfg.stage == 2 and d.sampler != "tuple":
        raise InputError("stage 2 trains on tuples: set data.sampler: tuple")
    if cfg.stage == 2 and not lo.local:
        raise InputError("stage 2 needs loss.local (e.g. local_triplet)")
    if d.sampler == "tuple" and t.micro_batch % d.tuple_size:
        raise InputError(f"train.micro_batch {t.micro_batch} must be a multiple of data.tuple_size "
                         f"{d.tuple_size} (tuples are never split)")
    OPTIMIZERS.check(o.name)
    SCHEDULES.check(o.policy)
    if o.per not in ("epoch", "step"):
        raise InputError(f"optim.per must be epoch or step, got {o.per!r}")
    if lo.batch_stats not in ("exact", "micro"):
        raise InputError(f"loss.batch_stats must be exact or micro, got {lo.batch_stats!r}")
    if t.amp not in ("bf16", "fp16", "none", None, False):
        raise InputError(f"train.amp must be bf16, fp16 or none, got {t.amp!r}")
    if not all(cfg.model.frozen):
        raise InputError(f"model.frozen must be a list of parameter-name prefixes, got {cfg.model.frozen!r}")
    if o.epochs < 1:
        raise InputError("optim.epochs must be >= 1")


def recipe_summary(path: str | os.PathLike) -> str:
    """The first sentence of a recipe's leading comment, however many lines it spans."""
    text = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith(("cfcd ", "torchrun ")):  # the example commands end the prose
            break
        text.append(body)
    prose = " ".join(t for t in text if t)
    for end in range(len(prose)):
        # a sentence ends at ". " (or the end), not inside "e.g." or a file name like s1_8gpu.yaml)
        if prose[end] == "." and (end + 1 == len(prose) or prose[end + 1] == " ") and not prose[:end].endswith(("e.g", "i.e")):
            return prose[: end + 1]
    return prose


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML, keys in recipe order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
