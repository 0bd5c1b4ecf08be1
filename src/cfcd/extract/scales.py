"""Multi-scale recipes: which sizes an image is described at and how the descriptors combine.

Every recipe describes the image at several sizes, L2-normalises each per-scale descriptor (the
models return unit vectors) and combines them into one unit vector. What each preset reproduces
(docs/peers.md has the upstream lines):

* ``cfcd`` (default, the CFCD and DOLG reference ``evaler/infer.py``): scales 0.3535, 0.5, 0.7071,
  1.0, 1.4142 of the full (or query-cropped) image; target size ``(round(h*s), round(w*s))`` with
  Python's ``round`` (half to even); bilinear without antialias (``cv2.INTER_LINEAR``); mean of the
  per-scale unit vectors, then L2. (The reference divides the sum by 5: no effect after L2.)
* ``cirtorch`` (``extract_ms``, ``--multiscale '[1, 1/2**(1/2), 1/2]'``): the already capped image
  (``--max-size 1024`` in cirtorch) is resized with ``F.interpolate(scale_factor=s)``, i.e. size
  ``floor(h*s)`` and the sampling grid of the factor ``s`` itself; the combination is cirtorch's
  generalised mean with power ``msp`` (1 by default; ``test.py`` uses the GeM ``p`` for GeM nets
  without whitening, ``--power p`` here): ``(mean_s v_s^msp)^(1/msp)`` with no clamp, then L2.
* ``dirtorch`` (``--trfs "Scale(1024,largest=True)" "Scale(724,largest=True)"``, ``--pooling gem
  --gemp 3``): the ORIGINAL image (leave ``--max-size`` unset) is resized once per chain by
  ``Scale(S, largest=True)``: the longer side becomes S (upscaling allowed), the other
  ``int(0.5 + S*other/longer)``, no resize when the shorter side would not change; Pillow
  ``BILINEAR`` on the uint8 RGB image, then ``ToTensor``/``Normalize``. Combined by dirtorch's
  ``pool(..., 'gem', 3)``: ``sympow(mean_s sympow(v_s, 3), 1/3)`` with
  ``sympow(x, p) = sign(x) * clamp(|x|, 1e-6)^p``, then L2. (dirtorch's README rows are
  single-scale: ``--scales single``.)
* ``dirtorch_relative`` (cfcd's former ``dirtorch``, kept because it runs on the device): scales 1
  and 0.7071 of the (capped) image, size ``int(0.5 + s*w)``, antialiased bilinear in float on the
  device, dirtorch's ``sympow`` combination. Equal to ``dirtorch`` only up to resampling when the
  long side is exactly 1024 (1 - cos ~1e-2 otherwise).
* ``single``: the image as it is (or capped).

``power_rule`` says which power mean ``--power p`` uses: ``cirtorch`` (``x^p`` without clamp; for
negative components, which cirtorch turns into NaN, ``sign(x) |x|^p``) or ``dirtorch``
(``sympow``, whose clamp raises every |component| below ``1e-6^(1/p)`` to that value). A custom
list of scales uses ``cirtorch``. ``flip`` adds the horizontally flipped image at every scale
as one more view of the same weight (neither peer's published numbers use it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Sequence

from cfcd.errors import InputError

SizeRule = Literal["round", "half_up", "scale_factor", "largest"]
Combine = Literal["mean", "power"]
PowerRule = Literal["cirtorch", "dirtorch"]
Resample = Literal["device", "pil"]


@dataclass(frozen=True)
class MultiScale:
    """One multi-scale recipe; see the module docstring for the named presets."""

    scales: tuple[float, ...]
    combine: Combine = "mean"
    power: float = 1.0
    size_rule: SizeRule = "round"
    antialias: bool = False
    name: str = "custom"
    power_rule: PowerRule = "cirtorch"
    resample: Resample = "device"  # pil: Pillow BILINEAR on the uint8 image, on the host (dirtorch)
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.scales:
            raise InputError("at least one scale is needed")
        for s in self.scales:
            if self.size_rule == "largest":
                if not (float(s).is_integer() and 1 <= s <= 16384):
                    raise InputError(f"size {s!r}: with size_rule 'largest' the scales are pixel sizes of the longer side")
            elif not (math.isfinite(s) and 0 < s <= 8):
                raise InputError(f"scale {s!r} is outside (0, 8]")
        if self.power_rule not in ("cirtorch", "dirtorch"):
            raise InputError(f"unknown power rule {self.power_rule!r} (expected 'cirtorch' or 'dirtorch')")
        if self.resample not in ("device", "pil"):
            raise InputError(f"unknown resampling {self.resample!r} (expected 'device' or 'pil')")
        if self.combine not in ("mean", "power"):
            raise InputError(f"unknown scale combination {self.combine!r} (expected 'mean' or 'power')")
        if self.size_rule not in ("round", "half_up", "scale_factor", "largest"):
            raise InputError(f"unknown size rule {self.size_rule!r}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise InputError(f"combination power must be > 0, got {self.power!r}")

    def target_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """Output ``(height, width)`` of ``scale`` for an input of ``height x width``."""
        if self.size_rule == "largest":  # dirtorch Scale(int(scale), largest=True).get_params + its resize test
            size, w, h = int(scale), width, height
            if (w >= h and w == size) or (h >= w and h == size):
                ow, oh = w, h
            elif w >= h:
                ow, oh = size, int(0.5 + size * h / w)
            else:
                ow, oh = int(0.5 + size * w / h), size
            if min(ow, oh) == min(w, h):  # resized only when the shorter side changes
                return height, width
            return oh, ow
        if self.size_rule == "round":  # CFCD: Python round, half to even
            h, w = round(height * scale), round(width * scale)
        elif self.size_rule == "half_up":  # dirtorch: int(0.5 + s*w)
            h, w = int(0.5 + height * scale), int(0.5 + width * scale)
        else:  # torch F.interpolate(scale_factor=s): floor
            h, w = math.floor(height * scale), math.floor(width * scale)
        return max(1, h), max(1, w)

    @property
    def uses_power(self) -> bool:
        return self.combine == "power" and self.power != 1.0

    def to_meta(self) -> dict:
        meta = asdict(self)
        meta["scales"] = list(self.scales)
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> "MultiScale":
        """The inverse of :meth:`to_meta` (keys a newer version added are refused by the constructor)."""
        fields = dict(meta)
        fields["scales"] = tuple(float(s) for s in fields["scales"])
        return cls(**fields)


PRESETS: dict[str, MultiScale] = {
    "cfcd": MultiScale((0.3535, 0.5, 0.7071, 1.0, 1.4142), "mean", 1.0, "round", False, "cfcd"),
    "cirtorch": MultiScale((1.0, 1 / math.sqrt(2), 0.5), "mean", 1.0, "scale_factor", False, "cirtorch"),
    "dirtorch": MultiScale((1024, 724), "power", 3.0, "largest", True, "dirtorch", power_rule="dirtorch", resample="pil"),
    "dirtorch_relative": MultiScale((1.0, 0.7071), "power", 3.0, "half_up", True, "dirtorch_relative",
                                    power_rule="dirtorch"),
    "single": MultiScale((1.0,), "mean", 1.0, "round", False, "single"),
}


def parse_scales(
    spec: str | Sequence[float] | MultiScale | None,
    *,
    power: float | None = None,
    size_rule: SizeRule | None = None,
    antialias: bool | None = None,
    flip: bool | None = None,
) -> MultiScale:
    """A preset name (``cfcd``, ``cirtorch``, ``dirtorch``, ``dirtorch_relative``, ``single``), a list of floats, or a
    string of comma/space separated floats (``"1 0.7071 0.5"``; ``2**-0.5`` style expressions are
    not evaluated). A list gets the CFCD rules unless ``power``/``size_rule``/``antialias`` say
    otherwise. ``power`` switches the combination to the generalised mean."""
    if spec is None:
        spec = "cfcd"
    if isinstance(spec, MultiScale):
        recipe = spec
    elif isinstance(spec, str) and spec.strip().lower().replace("-", "_") in PRESETS:
        recipe = PRESETS[spec.strip().lower().replace("-", "_")]
    else:
        if isinstance(spec, str):
            tokens = spec.replace(",", " ").replace("[", " ").replace("]", " ").split()
            try:
                values = tuple(float(t) for t in tokens)
            except ValueError:
                raise InputError(
                    f"--scales {spec!r}: expected a preset ({', '.join(PRESETS)}) or numbers such as '1 0.7071 0.5'"
                ) from None
        else:
            values = tuple(float(v) for v in spec)
        recipe = MultiScale(values, name="custom")
    changes: dict = {}
    if power is not None:
        changes.update(power=float(power), combine="power" if power != 1.0 else "mean")
    if size_rule is not None:
        changes["size_rule"] = size_rule
    if antialias is not None:
        changes["antialias"] = bool(antialias)
    if flip:
        changes["flip"] = True
    if changes:
        recipe = replace(recipe, **changes)
        if recipe.name != "custom" and recipe != PRESETS.get(recipe.name):
            recipe = replace(recipe, name=f"{recipe.name}+custom")
    return recipe
