"""Checkpoint import and export: official formats -> cfcd names, never with unrestricted unpickling.

Each layout is a :class:`CheckpointFormat` registered by its model family (``pycls`` and
``torchvision``/``timm`` in :mod:`cfcd.models.backbones`, ``cfcd`` in :mod:`cfcd.models.cfcd_net`, ``dolg`` in
:mod:`cfcd.models.dolg`, ``cirtorch``/``dirtorch`` in :mod:`cfcd.models.gem`, ``efficientnet_lite`` in
:mod:`cfcd.models.efficientnet_lite`, ``vit`` in :mod:`cfcd.models.vit`); ``cfcd-safetensors``, our own
``model.safetensors`` + ``config.json``, is here. ``cfcd convert --help`` and docs/models.md list them all.

Every ``torch.load`` is ``weights_only=True``. The only globals allowed besides torch's own are numpy's
array reconstruction (cirtorch/dirtorch store numpy arrays) and an attribute-only stand-in registered
under the sklearn PCA class paths; anything else (e.g. ``os.system``) is rejected.

cfcd names: the backbone is ``backbone.<torchvision/timm names>``; then ``pool.p``, ``fc``, ``bn``,
``fc_t``, ``local.*`` (DOLG) or ``whiten`` (cirtorch). Extras (``desc_cls.*``, ``imagenet_head.*``,
``Lw.*``, ``pca.*``) are not model parameters; :func:`load_weights` returns them in ``LoadReport.extra``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cfcd.errors import CfcdError, InputError
from cfcd.utils.registry import Registry

DEFAULT_ALLOW_EXTRA = ("desc_cls.", "imagenet_head.", "Lw.", "pca.", "unused_fc.")
WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "extra.safetensors"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------
# restricted unpickling


class PickledSklearnPCA:
    """Attribute-only stand-in for a pickled ``sklearn.decomposition.PCA`` (dirtorch checkpoints).

    It runs no sklearn code: unpickling only stores the saved attributes (``mean_``, ``components_``,
    ``explained_variance_``, ``whiten``...).
    """

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError("unexpected PCA state")
        self.__dict__.update(state)


def _safe_globals() -> list:
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    allowed: list = [np.ndarray, np.dtype, core._reconstruct, core.scalar,
                     (core._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (core.scalar, "numpy.core.multiarray.scalar"),
                     (PickledSklearnPCA, "sklearn.decomposition.pca.PCA"),
                     (PickledSklearnPCA, "sklearn.decomposition._pca.PCA")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def weights_sha256(path: str | Path) -> str:
    """The sha256 that identifies a weights source: the file, or a converted dir's ``model.safetensors``."""
    from cfcd.utils.io import sha256_file

    path = Path(path)
    return sha256_file(path / WEIGHTS_FILE if path.is_dir() else path)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` allowing numpy arrays and sklearn PCA attribute bags only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError for a non-torch file, ...
        msg = str(exc).strip().splitlines()
        detail = next((line for line in msg if "GLOBAL" in line or "Unsupported" in line), msg[0] if msg else "")
        raise CfcdError(f"{path}: not loadable as a weights-only checkpoint ({type(exc).__name__}: {detail[:300]}); "
                        "cfcd never unpickles arbitrary objects") from None


# --------------------------------------------------------------------------------------------------
# checkpoint formats: one adapter per layout, registered by the model family it belongs to


@dataclass
class Checkpoint:
    """A checkpoint read into cfcd names.

    ``state`` holds model parameters, ``extra`` tensors that are not (classifier, ImageNet head, Lw, PCA),
    ``model_kwargs`` what the file says about the architecture, ``model_name`` a registry name when known.
    """

    path: Path | None
    format: str
    state: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "<state dict>"


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint layout, registered next to its model family with :func:`register_checkpoint_format`.

    - ``detect(state, container) -> bool``: is this state dict (and the dict around it) of this layout;
      formats are asked in ``priority`` order, so a specific layout comes before a general one.
    - ``convert(state) -> (state, extra, info)``: rename into cfcd names; ``extra`` holds tensors that
      are not model parameters; ``info`` may give ``model_kwargs``, ``model_name`` and ``notes``.
    - ``infer(checkpoint, container)`` (optional): read the architecture from the converted tensors
      and the container's other entries (cirtorch ``meta``, dirtorch ``model_options``) into
      ``checkpoint.model_kwargs`` / ``model_name`` / ``notes`` / ``extra``.
    - ``adapt(model, state, source) -> (state, extra)`` (optional): just before loading into ``model``,
      e.g. a mapping by parameter order or a position embedding resampled to the model's grid.
    """

    name: str
    detect: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, torch.Tensor]], tuple[dict, dict, dict]]
    infer: Callable[["Checkpoint", Mapping[str, Any]], None] | None = None
    adapt: Callable[[torch.nn.Module, dict, str], tuple[dict, dict]] | None = None
    priority: int = 100
    aliases: tuple[str, ...] = ()
    description: str = ""


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def register_checkpoint_format(name: str, *, detect, convert, infer=None, adapt=None, priority: int = 100,
                               aliases: tuple[str, ...] = (), description: str = "") -> CheckpointFormat:
    """Add a checkpoint layout (see :class:`CheckpointFormat`); a model family calls it when imported."""
    taken = set(FORMATS.names()) | {a for _, f in FORMATS.items() for a in f.aliases} | {"auto"}
    clash = [n for n in (name, *aliases) if n in taken]
    if clash:
        raise ValueError(f"checkpoint format {clash[0]!r} is already registered")
    return FORMATS.register(name, CheckpointFormat(name, detect, convert, infer, adapt, priority, tuple(aliases),
                                                   description))


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    """Every registered format, in detection order (importing the built-in model families first)."""
    from cfcd.models.registry import _ensure_builtin

    _ensure_builtin()
    return dict(sorted(FORMATS.items(), key=lambda item: item[1].priority))


def format_names() -> tuple[str, ...]:
    """What ``format=`` accepts: ``auto``, every format and alias, sorted."""
    formats = checkpoint_formats().values()
    return ("auto", *sorted({f.name for f in formats} | {a for f in formats for a in f.aliases}))


def get_format(name: str) -> CheckpointFormat:
    for fmt in checkpoint_formats().values():
        if name == fmt.name or name in fmt.aliases:
            return fmt
    raise InputError(f"unknown checkpoint format {name!r}; choose one of {', '.join(format_names())}")


def strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that DataParallel/DDP checkpoints carry."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def as_tensor(value: Any, where: str) -> torch.Tensor:
    """A tensor from a tensor or a numpy array (cirtorch/dirtorch containers hold numpy arrays)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CfcdError(f"{where}: expected a tensor or numpy array, found {type(value).__name__}")


def detect_format(state: Mapping[str, Any], container: Mapping[str, Any] | None = None) -> str:
    """The first registered format (in priority order) that recognises the state dict."""
    for fmt in checkpoint_formats().values():
        if fmt.detect(state, container or {}):
            return fmt.name
    shown = ", ".join(list(state)[:6])
    raise CfcdError(f"unrecognised checkpoint layout (first keys: {shown}); force one with format= "
                    f"({', '.join(format_names()[1:])})")


def to_cfcd_names(state: Mapping[str, torch.Tensor], fmt: str) -> tuple[dict, dict]:
    """Rename a source state dict into cfcd names with format ``fmt``. Returns ``(state, extra)``."""
    mapped, extra, _ = get_format(fmt).convert(state)
    return mapped, extra


def _convert(path: Path | None, fmt: str, state: Mapping[str, torch.Tensor], container: Mapping[str, Any]) -> Checkpoint:
    adapter = get_format(fmt)
    mapped, extra, info = adapter.convert(state)
    ckpt = Checkpoint(path=path, format=adapter.name, state=mapped, extra=extra,
                      model_kwargs=dict(info.get("model_kwargs", {})), model_name=info.get("model_name"),
                      notes=list(info.get("notes", [])))
    if adapter.infer is not None:
        adapter.infer(ckpt, container)
    return ckpt


def _training_model_config(container: Mapping[str, Any], ckpt: Checkpoint) -> None:
    """A ``cfcd train`` checkpoint records the model it trained (``model_config``: name and kwargs)."""
    config = container.get("model_config")
    if not isinstance(config, Mapping) or not isinstance(config.get("name"), str):
        return
    from cfcd.models.registry import get_entry

    try:
        entry = get_entry(config["name"])
    except CfcdError:
        ckpt.notes.append(f"trained as {config['name']!r}, which is not registered here")
        return
    ckpt.model_name = config["name"]
    kwargs = config.get("kwargs") if isinstance(config.get("kwargs"), Mapping) else {}
    for key, value in kwargs.items():
        default = entry.defaults.get(key)
        default = default.to_dict() if hasattr(default, "to_dict") else default
        if key != "preprocess" and value != default:
            ckpt.model_kwargs[key] = value


def _read_safetensors(path: Path, format: str) -> Checkpoint:
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE if path.is_dir() else path
    directory = weights.parent
    if not weights.is_file():
        raise InputError(f"{weights}: missing (a converted model directory holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CfcdError(f"{weights}: not a valid safetensors file ({exc})") from None
    config: dict[str, Any] = {}
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{config_path}: invalid JSON ({exc})") from None
    fmt = detect_format(state)  # e.g. our own directory, or a timm hub model.safetensors of a ViT
    if format != "auto" and get_format(format).name != fmt:
        raise CfcdError(f"{path}: is a {fmt} checkpoint, not {format}")
    ckpt = _convert(path, fmt, state, config)
    if (directory / EXTRA_FILE).is_file():
        ckpt.extra.update(load_file(str(directory / EXTRA_FILE)))
    ckpt.config = config
    return ckpt


def _unwrap(raw: Any, path: Path) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``(container, state)``: the state dict under ``model_state``/``state_dict``/``model``, ``module.`` stripped."""
    if not isinstance(raw, Mapping):
        raise CfcdError(f"{path}: expected a dict (state_dict or checkpoint), found {type(raw).__name__}")
    state: Mapping[str, Any] = raw
    for key in ("model_state", "state_dict", "model"):
        if key in raw and isinstance(raw[key], Mapping):
            state = raw[key]
            break
    return raw, strip_module(state)


def read_checkpoint(path: str | Path, format: str = "auto") -> Checkpoint:
    """Read any supported checkpoint file (or converted directory) into cfcd names (no model needed)."""
    if format != "auto":
        get_format(format)  # an unknown name fails before the file is read
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return _read_safetensors(path, format)
    container, state = _unwrap(safe_torch_load(path), path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CfcdError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    fmt = detect_format(state, container) if format == "auto" else get_format(format).name
    ckpt = _convert(path, fmt, state, container)
    _training_model_config(container, ckpt)
    if "epoch" in container and isinstance(container["epoch"], int):
        ckpt.notes.append(f"epoch {container['epoch']}")
    return ckpt


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a checkpoint: ``weights_only``, ``model_state``/``state_dict`` unwrapped,
    ``module.`` stripped, source names kept (use :func:`read_checkpoint` for cfcd names)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS_FILE if path.is_dir() else path))
    _, state = _unwrap(safe_torch_load(path), path)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# cfcd's own layout (``cfcd convert`` output): cfcd names, the model's name and kwargs in config.json

def _is_cfcd_state(state: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    return any(k.startswith("backbone.") for k in state)  # never a prefix of the original layouts


def _infer_cfcd_safetensors(ckpt: Checkpoint, config: Mapping[str, Any]) -> None:
    ckpt.model_kwargs.update(dict(config.get("kwargs", {})))
    if config.get("name"):
        ckpt.model_name = config["name"]


register_checkpoint_format(
    "cfcd-safetensors", detect=_is_cfcd_state, convert=lambda state: (dict(state), {}, {}),
    infer=_infer_cfcd_safetensors, priority=0,
    description="our own model.safetensors + config.json (+ extra.safetensors), written by cfcd convert")


# --------------------------------------------------------------------------------------------------
# loading into a model


@dataclass
class LoadReport:
    """What happened when loading weights into a model.

    ``missing``: model keys the checkpoint lacks; ``unexpected``: checkpoint keys the model lacks;
    ``mismatched``: ``(key, checkpoint shape, model shape)``; ``extra``: expected leftovers
    (``desc_cls.*``, ``imagenet_head.*``, ``Lw.*``, ``pca.*``) as tensors.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    format: str = ""
    loaded: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, loaded: bool = True) -> str:
        parts = [f"{self.loaded} tensors loaded from {self.source} ({self.format})" if loaded else f"{self.format} layout"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing[:5])}{' ...' if len(self.missing) > 5 else ''}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {', '.join(self.unexpected[:5])}"
                         f"{' ...' if len(self.unexpected) > 5 else ''}")
        if self.mismatched:
            shown = ", ".join(f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:5])
            parts.append(f"{len(self.mismatched)} of wrong shape: {shown}")
        if self.extra:
            parts.append(f"extra: {', '.join(sorted(self.extra)[:6])}{' ...' if len(self.extra) > 6 else ''}")
        return "; ".join(parts)


def load_weights(model: torch.nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor] | Checkpoint, *,
                 strict: bool = True, allow_extra: tuple[str, ...] = DEFAULT_ALLOW_EXTRA,
                 allow_missing: tuple[str, ...] = (), format: str = "auto") -> LoadReport:
    """Load a checkpoint (file, converted directory, state dict or :class:`Checkpoint`) into ``model``.

    Keys whose prefix is in ``allow_extra`` are expected leftovers (returned in ``report.extra``).
    Model keys whose prefix is in ``allow_missing`` may be absent (e.g. ``("fc.", "bn.")`` when starting
    CFCD training from an ImageNet backbone). With ``strict`` any other missing, unexpected or
    wrongly-shaped key raises a CfcdError naming the file and listing them; with ``strict=False`` the
    matching tensors are loaded and the report says what was not.
    """
    if isinstance(path_or_state, Checkpoint):
        ckpt = path_or_state
    elif isinstance(path_or_state, Mapping):
        state = strip_module(path_or_state)
        ckpt = _convert(None, detect_format(state) if format == "auto" else format, state, {})
    else:
        ckpt = read_checkpoint(path_or_state, format=format)
    target = model.state_dict()
    state = dict(ckpt.state)
    extra = dict(ckpt.extra)
    adapter = get_format(ckpt.format)
    if adapter.adapt is not None:
        state, more = adapter.adapt(model, state, ckpt.source)
        extra.update(more)
    for k in list(state):
        if k.startswith(allow_extra) and k not in target:
            extra[k] = state.pop(k)
    # an absent num_batches_tracked is harmless (older checkpoints); allow_missing prefixes are the caller's choice
    missing = [k for k in target if k not in state
               and not k.endswith("num_batches_tracked") and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state if k not in target]
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]
    report = LoadReport(missing=missing, unexpected=unexpected, mismatched=mismatched, extra=extra,
                        source=ckpt.source, format=ckpt.format, notes=list(ckpt.notes))
    if strict and not report.complete:
        raise CfcdError(f"{ckpt.source}: does not match the model ({report.summary(loaded=False)}). "
                        "Pick the right model name/options, or load non-strictly (strict=False, --non-strict) "
                        "to keep the matching tensors only")
    loadable = {k: v for k, v in state.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    with torch.no_grad():
        for k, v in loadable.items():
            target_tensor = target[k]
            target_tensor.copy_(v.to(dtype=target_tensor.dtype))
    report.loaded = len(loadable)
    return report


def load_backbone_weights(model: torch.nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor], *,
                          format: str = "auto") -> LoadReport:
    """Initialise only the backbone (e.g. from a pycls/torchvision ImageNet checkpoint before training).

    Every backbone tensor must be present and of the right shape; the heads (``fc``, ``bn``, ``fc_t``,
    ``local``, ``pool.p``, ``whiten``) keep their initialisation and are listed as allowed-missing.
    """
    heads = tuple(sorted({k.split(".")[0] + "." for k in model.state_dict() if not k.startswith("backbone.")}))
    return load_weights(model, path_or_state, strict=True, allow_missing=heads, format=format)


# --------------------------------------------------------------------------------------------------
# saving


def _jsonable(value: Any) -> Any:
    from cfcd.runtime import jsonable

    return jsonable(value)


def save_weights(model: torch.nn.Module, out_dir: str | Path, extra: Mapping[str, torch.Tensor] | None = None,
                 meta: Mapping[str, Any] | None = None, *, only: tuple[str, ...] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``extra.safetensors``) atomically; returns the directory.

    The config holds ``name`` and ``kwargs`` (so :func:`cfcd.models.create` rebuilds the model with no
    pickle at all), the embedding size, the preprocessing and any ``meta`` (source file, sha256, format).
    ``only``: save just the tensors with these prefixes (e.g. ``("backbone.",)``; a strict load then fails).
    """
    from safetensors.torch import save as st_save

    from cfcd import __version__
    from cfcd.utils.io import atomic_open, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if only is None or k.startswith(tuple(only))}
    with atomic_open(out / WEIGHTS_FILE, "wb") as handle:
        handle.write(st_save(state, metadata={"format": "pt"}))
    if extra:
        with atomic_open(out / EXTRA_FILE, "wb") as handle:
            handle.write(st_save({k: v.detach().cpu().contiguous() for k, v in extra.items()}, metadata={"format": "pt"}))
    elif (out / EXTRA_FILE).exists():
        (out / EXTRA_FILE).unlink()
    config_in = getattr(model, "model_config", {}) or {}
    config = {
        "format": "cfcd-safetensors",
        "name": config_in.get("name"),
        "kwargs": _jsonable(config_in.get("kwargs", {})),
        "embedding_dim": getattr(model, "embedding_dim", None),
        "preprocess": _jsonable(getattr(model, "preprocess", None)),
        "extra_tensors": sorted(extra) if extra else [],
        "cfcd_version": __version__,
    }
    config.update(_jsonable(dict(meta or {})))
    atomic_write_json(out / CONFIG_FILE, config)  # written last: a directory without it is incomplete
    return out
