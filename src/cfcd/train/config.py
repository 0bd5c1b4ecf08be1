"""Training recipes: versioned YAML files merged over defaults, with ``key=value`` overrides.

A recipe is a nested mapping (see :data:`DEFAULTS` for every key and its meaning). Files in
``cfcd/configs/`` are found by name (``--config cfcd_r50_s1``), anything else is a path.
Unknown keys are errors (a typo must not silently train the default), and the resolved
config is written next to the checkpoints so a run documents itself.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from cfcd.errors import InputError

#: Bump when the meaning of a key changes; recipes declare the version they were written for.
CONFIG_VERSION = 1

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

#: Keys renamed since version 1 of the recipes: the old name still works (recipes and overrides).
RENAMED_KEYS = {"loss.madacos_stats": "loss.batch_stats"}

DEFAULTS: dict[str, Any] = {
    "version": CONFIG_VERSION,
    "name": "unnamed",
    "stage": 1,                 # 1: global (classification or listwise); 2: + local triplets on tuples
    "model": {
        "name": "cfcd_r50",     # cfcd.models registry name
        "kwargs": {},           # extra arguments for cfcd.models.create
        "weights": None,        # initial weights for cfcd.models.create (e.g. ImageNet backbone)
        "init": None,           # checkpoint to start from: ours (dir/.pt) or the official .pyth,
                                # incl. the classifier weight (desc_cls.weight) -> loss head
        "strict": False,        # strict key matching when loading `init`
        "frozen": [],           # parameter-name prefixes kept fixed (e.g. backbone.blocks.0 for an
                                # early stage); their BN layers still follow train.freeze_bn
    },
    "loss": {
        "global": "madacos",    # madacos | arcface | cosface | curricularface | ap | none
        "global_kwargs": {"alpha": 0.02},
        "num_classes": 81313,
        "batch_stats": "exact",  # losses with batch statistics (MadaCos's median): exact: over the
                                 # global batch even with accumulation (extra no-grad forward);
                                 # micro: per micro-batch (cheaper). Old name: madacos_stats
        "local": None,          # local_triplet for CFCD stage 2
        "local_kwargs": {"margin": 0.1, "ratio": 0.9, "top_fraction": 0.5},
        "local_weight": 1.0,    # the code's effective lambda (the yaml's LAMDA 0.05 is ignored)
    },
    "data": {
        "root": None,           # image root; list paths are relative to it
        "train_list": "train_list.txt",
        "val_list": None,
        "confusions": None,     # landmark_scores.txt for hard negatives (stage 2)
        "im_size": 512,
        "test_size": 512,
        "area_frac": 0.08,
        "flip": 0.5,
        "lighting": 0.1,
        "workers": 4,
        "tuple_size": 8,
        "sampler": "shuffle",   # shuffle | tuple | class_balanced | mined
        "images_per_class": 4,  # class_balanced only
        # mined (cirtorch TuplesDataset): per epoch, hardest negatives by the current model
        "mining": {"nnum": 5, "qsize": 2000, "poolsize": 20000, "image_size": 1024},
        "val_max_images": None,
    },
    "optim": {
        "name": "sgd",
        "lr": 0.005,            # base LR for the global batch
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,  # on all parameters, as the reference
        "epochs": 50,
        "warmup_epochs": 5,
        "warmup_factor": 0.1,
        "policy": "cos",        # cos | steps | exp | constant
        "steps": [],            # epochs where the LR is multiplied by lr_mult (policy steps)
        "lr_mult": 0.1,
        "gamma": 0.99,          # policy exp: lr = base * gamma**epoch
        "per": "epoch",         # epoch: constant within an epoch (reference); step: per step
        "clip_grad": None,
    },
    "train": {
        "global_batch": 128,
        "micro_batch": 16,      # per forward/backward on one process
        "seed": 1,
        "amp": "bf16",          # bf16 | fp16 | none (CUDA only; CPU runs fp32)
        "channels_last": True,
        "compile": False,
        "freeze_bn": False,     # cirtorch: BN layers in eval mode
        "out_dir": "runs/{name}",
        "keep_every": 5,        # keep every 5th epoch checkpoint (plus the last)
        "checkpoint_steps": 0,  # also save <out>/checkpoints/last.pt every N steps (0: epoch ends only)
        "log_every": 20,
        "eval_period": 1,       # val every N epochs (0: never)
        "max_steps_per_epoch": None,
        "tensorboard": True,
        "progress": True,
        "find_unused_parameters": False,
        "deterministic": False,
        "cudnn_benchmark": True,
    },
    "benchmark": {              # optional revisitop evaluation hook
        "datasets": [],         # e.g. [roxford5k, rparis6k]
        "root": None,
        "every": 0,             # epochs; 0: never
        "scales": [0.7071, 1.0, 1.4142],
        "max_size": 1024,
    },
}


def deep_merge(base: dict, update: dict, *, path: str = "", source: str = "config") -> dict:
    """Merge ``update`` into a copy of ``base``; keys absent from ``base`` are errors,
    except under free-form mappings (``*kwargs``)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = f"{path}{key}"
        if full in RENAMED_KEYS:
            old, full = full, RENAMED_KEYS[full]
            key = full.rsplit(".", 1)[-1]
            if key in update and update[key] != value:
                raise InputError(f"{source}: {full!r} and its old name {old!r} disagree")
        if key not in out:
            if path.rstrip(".").endswith("kwargs"):
                out[key] = copy.deepcopy(value)
                continue
            raise InputError(f"{source}: unknown key {full!r}")
        if isinstance(out[key], dict) and not full.endswith("kwargs"):
            if not isinstance(value, dict):
                raise InputError(f"{source}: {full!r} must be a mapping, got {value!r}")
            out[key] = deep_merge(out[key], value, path=f"{full}.", source=source)
        elif isinstance(out[key], dict):
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{source}: {full!r} must be a mapping, got {value!r}")
            # a recipe replaces a kwargs mapping (a new head has other arguments);
            # a command-line override edits single entries of it
            value = copy.deepcopy(value or {})
            out[key] = {**out[key], **value} if source == "override" else value
        else:
            out[key] = copy.deepcopy(value)
    return out


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
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Defaults <- recipe file (``_base_`` chains allowed) <- overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path is not None:
        path = find_config(name_or_path)
        cfg = deep_merge(cfg, _read_recipe(path, set()), source=str(path))
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        cfg = deep_merge(cfg, ov, source="override")
    validate(cfg)
    return cfg


def _read_recipe(path: Path, seen: set) -> dict:
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
    if base is None:
        return data
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        base_path = find_config(base)
    merged = deep_merge(DEFAULTS, _read_recipe(base_path, seen), source=str(base_path))
    return deep_merge(merged, data, source=str(path))


# integer defaults that also accept fractions
_FRACTIONAL_OK = {"optim.warmup_epochs"}
# string defaults that also accept false
_FALSE_OK = {"train.amp"}


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__)


def check_types(cfg: dict, defaults: dict = DEFAULTS, path: str = "") -> None:
    """Every value has the type of its default (None on either side is always allowed), so that
    ``optim.lr=abc`` is refused here with its key, not as a traceback hours into the trainer."""
    for key, default in defaults.items():
        if key not in cfg:
            continue
        value, full = cfg[key], f"{path}{key}"
        if isinstance(default, dict):
            if isinstance(value, dict) and not key.endswith("kwargs"):
                check_types(value, default, f"{full}.")
            continue
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok or (full in _FRACTIONAL_OK and isinstance(value, float))
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str) or (full in _FALSE_OK and value is False)
        elif isinstance(default, list):
            ok = isinstance(value, list)
        else:
            ok = True
        if not ok:
            raise InputError(f"{full} must be {_type_name(default)} (like the default {default!r}), "
                             f"got {value!r} ({_type_name(value)})")


def validate(cfg: dict) -> None:
    """Checks that catch a wrong recipe before hours of data loading."""
    check_types(cfg)
    if int(cfg["version"]) > CONFIG_VERSION:
        raise InputError(f"recipe version {cfg['version']} is newer than this cfcd ({CONFIG_VERSION})")
    if cfg["stage"] not in (1, 2):
        raise InputError(f"stage must be 1 or 2, got {cfg['stage']!r}")
    t, d, o, lo = cfg["train"], cfg["data"], cfg["optim"], cfg["loss"]
    for key in ("global_batch", "micro_batch"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise InputError(f"train.{key} must be a positive integer, got {t[key]!r}")
    if d["sampler"] not in ("shuffle", "tuple", "class_balanced", "mined"):
        raise InputError(f"data.sampler must be shuffle, tuple, class_balanced or mined, got {d['sampler']!r}")
    if d["sampler"] == "mined":
        size = 2 + int(d["mining"]["nnum"])
        if t["micro_batch"] % size:
            raise InputError(f"train.micro_batch {t['micro_batch']} must be a multiple of the mined tuple size {size} "
                             "(2 + data.mining.nnum)")
    if cfg["stage"] == 2 and d["sampler"] != "tuple":
        raise InputError("stage 2 trains on tuples: set data.sampler: tuple")
    if cfg["stage"] == 2 and not lo["local"]:
        raise InputError("stage 2 needs loss.local (e.g. local_triplet)")
    if d["sampler"] == "tuple" and t["micro_batch"] % d["tuple_size"]:
        raise InputError(f"train.micro_batch {t['micro_batch']} must be a multiple of data.tuple_size "
                         f"{d['tuple_size']} (tuples are never split)")
    if o["policy"] not in ("cos", "steps", "exp", "constant"):
        raise InputError(f"optim.policy must be cos, steps, exp or constant, got {o['policy']!r}")
    if o["per"] not in ("epoch", "step"):
        raise InputError(f"optim.per must be epoch or step, got {o['per']!r}")
    if lo["batch_stats"] not in ("exact", "micro"):
        raise InputError(f"loss.batch_stats must be exact or micro, got {lo['batch_stats']!r}")
    if t["amp"] not in ("bf16", "fp16", "none", None, False):
        raise InputError(f"train.amp must be bf16, fp16 or none, got {t['amp']!r}")
    frozen = cfg["model"]["frozen"]
    if not isinstance(frozen, (list, tuple)) or not all(isinstance(f, str) and f for f in frozen):
        raise InputError(f"model.frozen must be a list of parameter-name prefixes, got {frozen!r}")
    if o["epochs"] < 1:
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


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
