"""Checkpoint import and export: official formats -> cfcd names, never with unrestricted unpickling.

Supported sources (auto-detected from the keys, or forced with ``format=``):

========================  ==========================================================================
``pycls``                 pycls ImageNet ``R-*-1x64d_dds_8gpu.pyth``: ``model_state`` with ``stem.*``,
                          ``s{i}.b{j}.f.{a,b,c}[_bn]``, ``s{i}.b1.{proj,bn}``; ``head.fc`` kept as an extra
``cfcd``                  CFCD MODEL_S1/S2/DEPLOY: ``globalmodel.<pycls>``, ``fc``, ``bn``, ``desc_cls.weight``
``dolg``                  DOLG: ``globalmodel``, ``localmodel.{conv1,bn,conv2[,aspp]}``, ``fc_t``, ``fc``,
                          ``desc_cls.{weight,t}``, optional ``pool_g.p`` (learnable p) and ``bn`` (CFCD copy)
``cirtorch``              cnnimageretrieval ``{meta, state_dict}``, ``features.N.*``, ``pool.p``, ``whiten.*``;
                          ``meta['Lw']`` numpy arrays become extras ``Lw.<set>.<ss|ms>.{m,P}``
``dirtorch``              deep-image-retrieval ``{model_options, state_dict, [pca]}``; ``adpool.p``, ``fc``;
                          pickled sklearn PCA objects are read as plain attributes -> ``pca.<name>.*``
``torchvision``           torchvision / timm ResNet state dicts (``conv1``, ``layer1..4``; ``fc`` = extra)
``efficientnet_lite``     ``efficientnet_lite_pytorch`` state dicts (mapped by parameter order)
``cfcd-safetensors``      our own ``model.safetensors`` + ``config.json`` (+ ``extra.safetensors``)
========================  ==========================================================================

Every ``torch.load`` is ``weights_only=True``. The only globals allowed besides torch's own are numpy's
array reconstruction (cirtorch/dirtorch store numpy arrays) and an attribute-only stand-in registered
under the sklearn PCA class paths; anything else (e.g. ``os.system``) is rejected.

cfcd names: the backbone is ``backbone.<torchvision/timm names>``; then ``pool.p``, ``fc``, ``bn``,
``fc_t``, ``local.*`` (DOLG) or ``whiten`` (cirtorch). Extras (``desc_cls.*``, ``imagenet_head.*``,
``Lw.*``, ``pca.*``) are not model parameters; :func:`load_weights` returns them in ``LoadReport.extra``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cfcd.errors import CfcdError, InputError

FORMATS = ("auto", "pycls", "cfcd", "dolg", "cirtorch", "dirtorch", "torchvision", "timm", "efficientnet_lite",
           "cfcd-safetensors")
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
# name mappings

_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.+)$")
_PYCLS_BLOCK_PARTS = (("f.a_bn.", "bn1."), ("f.b_bn.", "bn2."), ("f.c_bn.", "bn3."),  # *_bn before conv and .bn
                      ("f.a.", "conv1."), ("f.b.", "conv2."), ("f.c.", "conv3."),
                      ("proj.", "downsample.0."), ("bn.", "downsample.1."))


def pycls_to_torchvision(key: str) -> str | None:
    """Map a pycls ResNet key to the torchvision/timm name; None for keys that are not backbone weights."""
    if key.startswith("stem.conv."):
        return "conv1." + key[len("stem.conv."):]
    if key.startswith("stem.bn."):
        return "bn1." + key[len("stem.bn."):]
    m = _PYCLS_BLOCK.match(key)
    if m:
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        for src, dst in _PYCLS_BLOCK_PARTS:
            if rest.startswith(src):
                return f"layer{stage}.{block - 1}.{dst}{rest[len(src):]}"
    return None


_CIRTORCH_FEATURES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def detect_format(state: Mapping[str, Any], container: Mapping[str, Any] | None = None) -> str:
    """Guess the source format from the state-dict keys (and the container's other entries)."""
    keys = list(state)
    container = container or {}
    if any(k.startswith("backbone.") for k in keys):  # our own names (never used by the originals)
        return "cfcd-safetensors"
    if any(k.startswith(("localmodel.", "fc_t.")) for k in keys):
        return "dolg"
    if any(k.startswith("globalmodel.") for k in keys):
        return "cfcd"
    if "stem.conv.weight" in state:
        return "pycls"
    if "features.0.weight" in state or ("meta" in container and "state_dict" in container):
        return "cirtorch"
    if "model_options" in container or "adpool.p" in state:
        return "dirtorch"
    if "_conv_stem.weight" in state:
        return "efficientnet_lite"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    for family in family_formats().values():
        if family.detect(state, container):
            return family.name
    shown = ", ".join(keys[:6])
    raise CfcdError(f"unrecognised checkpoint layout (first keys: {shown}); force one with format= ({', '.join(FORMATS[1:])})")


def _backbone_from_pycls(state: Mapping[str, torch.Tensor], prefix: str, out: dict, extra: dict, unknown: dict) -> None:
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.startswith("head."):
            extra["imagenet_head." + rest[len("head."):]] = v
            continue
        name = pycls_to_torchvision(rest)
        if name is None:
            unknown[k] = v
        else:
            out["backbone." + name] = v


def to_cfcd_names(state: Mapping[str, torch.Tensor], fmt: str) -> tuple[dict, dict]:
    """Rename a source state dict into cfcd names. Returns ``(state, extra)``.

    Keys that have no mapping are kept under their source name, so that loading reports them as
    unexpected instead of dropping them silently.
    """
    out: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    unknown: dict[str, torch.Tensor] = {}
    if fmt == "pycls":
        _backbone_from_pycls(state, "", out, extra, unknown)
    elif fmt in ("cfcd", "dolg"):
        _backbone_from_pycls(state, "globalmodel.", out, extra, unknown)
        for k, v in state.items():
            if k.startswith("globalmodel."):
                continue
            if k.startswith("desc_cls."):
                extra[k] = v
            elif k == "pool_g.p":
                out["pool.p"] = v
            elif k.startswith("localmodel."):
                out["local." + k[len("localmodel."):]] = v
            elif k.startswith(("fc.", "bn.", "fc_t.")):
                out[k] = v
            else:
                unknown[k] = v
    elif fmt in ("torchvision", "timm"):
        for k, v in state.items():
            if k.startswith("fc."):
                extra["imagenet_head." + k] = v
            else:
                out["backbone." + k] = v
    elif fmt == "cirtorch":
        for k, v in state.items():
            m = re.match(r"^features\.(\d+)\.(.+)$", k)
            if m and int(m.group(1)) in _CIRTORCH_FEATURES:
                out[f"backbone.{_CIRTORCH_FEATURES[int(m.group(1))]}.{m.group(2)}"] = v
            elif k.startswith(("pool.", "whiten.")):
                out[k] = v
            else:
                unknown[k] = v
    elif fmt == "dirtorch":
        for k, v in state.items():
            if k == "adpool.p":
                out["pool.p"] = v
            elif k.startswith("fc."):
                out[k] = v
            elif k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
                out["backbone." + k] = v
            else:
                unknown[k] = v
    elif fmt in ("efficientnet_lite", "cfcd-safetensors"):
        out = dict(state)  # efficientnet_lite is mapped by order against the model in load_weights
    elif fmt in family_formats():
        out, extra, _ = family_formats()[fmt].convert(state)
    else:
        raise CfcdError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out.update(unknown)
    return out, extra


# --------------------------------------------------------------------------------------------------
# reading


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


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CfcdError(f"{where}: expected a tensor or numpy array, found {type(value).__name__}")


def _resnet_depth(state: Mapping[str, Any]) -> str | None:
    """ResNet name from the number of stage-3 blocks and the block type (bottleneck has conv3)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^backbone\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.layer3.0.conv3.weight" in state
    table = {6: "resnet50", 23: "resnet101", 36: "resnet152"} if bottleneck else {2: "resnet18", 6: "resnet34"}
    return table.get(len(blocks))


_GEM_NAMES = {"resnet50": "gem_r50", "resnet101": "gem_r101", "resnet152": "gem_r152"}


def _read_safetensors_dir(path: Path) -> Checkpoint:
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
    extra: dict[str, torch.Tensor] = {}
    if (directory / EXTRA_FILE).is_file():
        extra = load_file(str(directory / EXTRA_FILE))
    fmt = "cfcd-safetensors" if any(k.startswith("backbone.") for k in state) else detect_format(state)
    family = _family_checkpoint(path, fmt, state)  # e.g. a timm hub model.safetensors of a ViT
    if family is not None:
        family.extra.update(extra)
        family.config = config
        return family
    state, more = to_cfcd_names(state, fmt)
    extra.update(more)
    return Checkpoint(path=path, format=fmt, state=state, extra=extra, model_kwargs=dict(config.get("kwargs", {})),
                      model_name=config.get("name"), config=config)


def _cirtorch_meta(meta: Mapping[str, Any], ckpt: Checkpoint) -> None:
    arch = str(meta.get("architecture", ""))
    if arch not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        raise CfcdError(f"{ckpt.source}: cirtorch architecture {arch!r} is not supported (ResNet-18/34/50/101/152 only)")
    if meta.get("local_whitening") or meta.get("regional"):
        raise CfcdError(f"{ckpt.source}: cirtorch local whitening / regional pooling networks are not supported")
    pooling = str(meta.get("pooling", "gem"))
    ckpt.model_kwargs.update(backbone=arch, pooling=pooling,
                             whitening="cirtorch" if meta.get("whitening") else None)
    if pooling in ("gem", "gemmp"):
        ckpt.model_kwargs["learnable_p"] = True
    if "mean" in meta and "std" in meta:
        ckpt.model_kwargs["preprocess"] = {"channel_order": "RGB", "mean": [float(v) for v in meta["mean"]],
                                           "std": [float(v) for v in meta["std"]]}
    ckpt.model_name = _GEM_NAMES.get(arch, f"gem_{arch}")
    for wset, modes in (meta.get("Lw") or {}).items():
        for mode, mats in (modes or {}).items():
            for name in ("m", "P"):
                if name in mats:
                    ckpt.extra[f"Lw.{wset}.{mode}.{name}"] = _as_tensor(mats[name], f"{ckpt.source}: meta['Lw']").float()
    if ckpt.extra:
        ckpt.notes.append("cirtorch learned whitening Lw kept as extras Lw.<set>.<ss|ms>.{m,P} (x' = P (x - m))")


def _dirtorch_options(container: Mapping[str, Any], ckpt: Checkpoint) -> None:
    options = dict(container.get("model_options") or {})
    arch = str(options.get("arch", ""))
    m = re.match(r"^resnet(18|34|50|101|152)(_rmac)?$", arch)
    if arch and not m:
        raise CfcdError(f"{ckpt.source}: dirtorch arch {arch!r} is not supported (resnet18/34/50/101/152[_rmac] only)")
    if m:
        backbone = f"resnet{m.group(1)}"
        ckpt.model_kwargs["backbone"] = backbone
        ckpt.model_name = _GEM_NAMES.get(backbone, f"gem_{backbone}")
    pooling = str(options.get("pooling", "gem"))
    ckpt.model_kwargs["pooling"] = "gem" if pooling.startswith("gem") else {"max": "mac", "avg": "spoc"}.get(pooling, pooling)
    if "gemp" in options:
        ckpt.model_kwargs["p"] = float(options["gemp"])
    if options.get("without_fc") or "fc.weight" not in ckpt.state:
        ckpt.model_kwargs["whitening"] = None
        # ResNet_RMAC always creates self.fc (rmac_resnet.py) and skips it with without_fc: keep it as an extra
        unused = [k for k in ("fc.weight", "fc.bias") if k in ckpt.state]
        for k in unused:
            ckpt.extra["unused_" + k] = ckpt.state.pop(k)
        if unused:
            ckpt.notes.append("dirtorch without_fc=True: the unused FC is kept as extras unused_fc.{weight,bias}")
    else:
        ckpt.model_kwargs["whitening"] = "dirtorch"
        ckpt.model_kwargs["out_dim"] = int(ckpt.state["fc.weight"].shape[0])
    ckpt.model_kwargs["norm_features"] = bool(options.get("norm_features", False))
    unsupported = [k for k in ("center_bias", "dropout") if options.get(k)]
    if unsupported:
        ckpt.notes.append(f"dirtorch options {unsupported} are training/test-time extras not reproduced by cfcd")
    pre = container.get("preprocess")
    if isinstance(pre, Mapping) and "mean" in pre and "std" in pre:
        ckpt.model_kwargs["preprocess"] = {"channel_order": "RGB", "mean": [float(v) for v in pre["mean"]],
                                           "std": [float(v) for v in pre["std"]]}
    for name, pca in (container.get("pca") or {}).items():
        attrs = getattr(pca, "__dict__", {})
        arrays = {a: attrs.get(a) for a in ("mean_", "components_", "explained_variance_")}
        if any(v is None for v in arrays.values()):
            ckpt.notes.append(f"pca[{name!r}] skipped: missing mean_/components_/explained_variance_")
            continue
        for a, v in arrays.items():
            ckpt.extra[f"pca.{name}.{a.rstrip('_')}"] = _as_tensor(np.asarray(v), f"{ckpt.source}: pca").float()
        ckpt.extra[f"pca.{name}.whiten"] = torch.tensor(bool(attrs.get("whiten", False)))
    if any(k.startswith("pca.") for k in ckpt.extra):
        ckpt.notes.append("dirtorch PCA kept as extras pca.<name>.{mean,components,explained_variance,whiten}")


def _infer_model_kwargs(ckpt: Checkpoint) -> None:
    """Architecture switches that follow from which tensors the checkpoint has."""
    state, kw = ckpt.state, ckpt.model_kwargs
    depth = _resnet_depth(state)
    if depth and "backbone" not in kw:
        kw["backbone"] = depth
    if ckpt.format in ("cfcd", "dolg"):
        kw["learnable_p"] = "pool.p" in state
        kw["with_bn"] = "bn.weight" in state
        if "fc.weight" in state:
            kw["dim"] = int(state["fc.weight"].shape[0])
        if ckpt.format == "dolg":
            kw["with_aspp"] = any(k.startswith("local.aspp.") for k in state)
        if depth in _GEM_NAMES:
            ckpt.model_name = f"{ckpt.format}_r{depth[len('resnet'):]}"
    elif ckpt.format == "cirtorch" and "pool.p" in state and state["pool.p"].numel() > 1:
        kw["pooling"] = "gemmp"


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


def read_checkpoint(path: str | Path, format: str = "auto") -> Checkpoint:
    """Read any supported checkpoint file (or converted directory) into cfcd names (no model needed)."""
    if format not in FORMATS and format not in family_formats():
        raise InputError(f"unknown checkpoint format {format!r}; choose one of {', '.join((*FORMATS, *family_formats()))}")
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        ckpt = _read_safetensors_dir(path)
        if format not in ("auto", ckpt.format) and not (format == "timm" and ckpt.format == "torchvision"):
            raise CfcdError(f"{path}: is a {ckpt.format} checkpoint, not {format}")
        return ckpt
    raw = safe_torch_load(path)
    if not isinstance(raw, Mapping):
        raise CfcdError(f"{path}: expected a dict (state_dict or checkpoint), found {type(raw).__name__}")
    container: Mapping[str, Any] = raw
    state: Any = raw
    for key in ("model_state", "state_dict", "model"):
        if key in raw and isinstance(raw[key], Mapping):
            state = raw[key]
            break
    state = _strip_module(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CfcdError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    fmt = detect_format(state, container) if format == "auto" else ("torchvision" if format == "timm" else format)
    ckpt = _family_checkpoint(path, fmt, state)
    if ckpt is None:
        mapped, extra = to_cfcd_names(state, fmt)
        ckpt = Checkpoint(path=path, format=fmt, state=mapped, extra=extra)
    if fmt == "cirtorch" and isinstance(container.get("meta"), Mapping):
        _cirtorch_meta(container["meta"], ckpt)
    if fmt == "dirtorch":
        _dirtorch_options(container, ckpt)
    _infer_model_kwargs(ckpt)
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
    raw = safe_torch_load(path)
    if not isinstance(raw, Mapping):
        raise CfcdError(f"{path}: expected a dict (state_dict or checkpoint), found {type(raw).__name__}")
    for key in ("model_state", "state_dict", "model"):
        if key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
            break
    return {k: v for k, v in _strip_module(raw).items() if isinstance(v, torch.Tensor)}


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
        state = _strip_module(path_or_state)
        fmt = detect_format(state) if format == "auto" else ("torchvision" if format == "timm" else format)
        mapped, extra = to_cfcd_names(state, fmt)
        ckpt = Checkpoint(path=None, format=fmt, state=mapped, extra=extra)
    else:
        ckpt = read_checkpoint(path_or_state, format=format)
    target = model.state_dict()
    state = dict(ckpt.state)
    extra = dict(ckpt.extra)
    family = family_formats().get(ckpt.format)
    if family is not None and family.adapt is not None:
        state = family.adapt(model, state)  # e.g. a ViT position embedding resampled to the model's grid
    if ckpt.format == "efficientnet_lite":
        from cfcd.models.efficientnet_lite import map_efficientnet_lite_state

        prefix = "backbone." if any(k.startswith("backbone.") for k in target) else ""
        sub = {k: v for k, v in target.items() if k.startswith(prefix)}
        state, head = map_efficientnet_lite_state(state, sub, origin=ckpt.source)
        extra.update(head)
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


# --------------------------------------------------------------------------------------------------
# formats added by model families (cfcd.models.vit registers "vit" when it is imported)


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout that a model family adds.

    ``detect(state, container) -> bool``; ``convert(state) -> (state, extra, info)`` in cfcd names,
    ``info`` holding ``model_kwargs``, ``model_name`` and ``notes``; ``adapt(model, state) -> state``
    (optional) runs just before loading into a model (e.g. resampling a position embedding).
    """

    name: str
    detect: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, torch.Tensor]], tuple[dict, dict, dict]]
    adapt: Callable[[torch.nn.Module, dict], dict] | None = None


_FAMILY_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(name: str, *, detect, convert, adapt=None) -> CheckpointFormat:
    if name in FORMATS or name in _FAMILY_FORMATS:
        raise ValueError(f"checkpoint format {name!r} is already registered")
    _FAMILY_FORMATS[name] = CheckpointFormat(name, detect, convert, adapt)
    return _FAMILY_FORMATS[name]


def family_formats() -> dict[str, CheckpointFormat]:
    """The formats registered by model families (importing the registry's families first)."""
    from cfcd.models.registry import _ensure_builtin

    _ensure_builtin()
    return _FAMILY_FORMATS


def _family_checkpoint(path: Path | None, fmt: str, state: Mapping[str, torch.Tensor]) -> "Checkpoint | None":
    family = family_formats().get(fmt)
    if family is None:
        return None
    mapped, extra, info = family.convert(state)
    return Checkpoint(path=path, format=fmt, state=mapped, extra=extra, model_kwargs=dict(info.get("model_kwargs", {})),
                      model_name=info.get("model_name"), notes=list(info.get("notes", [])))
