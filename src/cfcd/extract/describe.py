"""Multi-scale global descriptors of decoded images: the fast batched path and the reference path.

Both paths take images already decoded in the model's channel order (``uint8``, H x W x 3) and
return float32 unit vectors. They share the recipe (:class:`~cfcd.extract.scales.MultiScale`)
and the model, and differ only in how the work is done:

``describe_batch`` (fast)
    a batch of same-size images, normalised once on the device, resized on the device with
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=recipe.antialias)``, one
    forward per scale under autocast, per-scale descriptors accumulated on the device and returned
    without a host round trip (the caller does one ``.cpu()`` per batch).

``describe_reference`` (naive, the CFCD ``evaler/infer.py`` procedure)
    one image, fp32, batch 1: ``cv2.resize(INTER_LINEAR)`` of the float image to
    ``(round(w*s), round(h*s))``, then ``/255`` and mean/std in numpy, one forward and one
    ``.cpu().numpy()`` per scale, L2, mean, L2 in numpy.

Resizing on the device versus ``cv2``: for ``INTER_LINEAR`` on float images OpenCV samples at
``(x + 0.5) * in/out - 0.5``, clamps at the border and interpolates bilinearly in float; torch's
``bilinear, align_corners=False, antialias=False`` does the same, so upsampling and downsampling
agree to float rounding: torch computes the source coordinates in float32, OpenCV in double, so
the difference grows with the coordinates. Measured on a real photo at the five CFCD scales: max
abs difference 0.0067 on the 0-255 scale at 1024x768 and 0.0017 at 211x139 (0 at scales 1 and
exactly 0.5 of even sizes); ``tests/test_extract.py`` checks < 0.005 at ~200 px. OpenCV switches exact 2x downsampling to ``INTER_AREA``, which equals
bilinear at those sample points. Neither antialiases when shrinking, which is what the reference
does. Normalising before resizing (fast path) or after (reference) is the same affine map and
differs only by float rounding.
"""

from __future__ import annotations

import functools

import numpy as np

from cfcd.extract.scales import MultiScale
from cfcd.models.preprocess import Preprocess
from cfcd.runtime import autocast

_SYMPOW_EPS = 1e-6  # dirtorch's clamp in sympow (dirtorch/utils/common.py, pool)


def _power(x, p: float, rule: str):
    """The power of the multi-scale mean: dirtorch's ``sympow`` (clamped at 1e-6) or cirtorch's
    plain ``x^p`` (written ``sign(x) |x|^p`` so that negative components stay finite)."""
    import torch

    floor = _SYMPOW_EPS if rule == "dirtorch" else 0.0
    return torch.sign(x) * torch.clamp(x.abs(), min=floor) ** p


def _power_np(x: np.ndarray, p: float, rule: str) -> np.ndarray:
    floor = _SYMPOW_EPS if rule == "dirtorch" else 0.0
    return np.sign(x) * np.maximum(np.abs(x), floor) ** p


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """dirtorch's ``img.resize((w, h), Image.BILINEAR)`` of one uint8 H x W x 3 image."""
    from PIL import Image

    height, width = size
    if image.shape[:2] == (height, width):
        return image
    out = Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(out)


def _views(x, flip: bool):
    return (x, x.flip(-1)) if flip else (x,)


def normalisation_tensors(preprocess, device) -> tuple:
    """mean and std, shaped 1 x 3 x 1 x 1 and scaled to 0-255 inputs (:meth:`Preprocess.scale_shift`)."""

    return Preprocess.coerce(preprocess).scale_shift(device)


def resize_on_device(x, recipe: MultiScale, scale: float):
    """Resize a B x C x H x W float batch to one scale of the recipe (no-op at the same size)."""
    import torch.nn.functional as F

    height, width = x.shape[-2:]
    if recipe.size_rule == "scale_factor":
        if scale == 1.0:
            return x
        # cirtorch: F.interpolate(scale_factor=s) -> floor size, sampling grid of s itself.
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=recipe.antialias)
    size = recipe.target_size(height, width, scale)
    if size == (height, width):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=recipe.antialias)


def describe_batch(
    model,
    images,
    recipe: MultiScale,
    *,
    mean,
    std,
    precision: str = "fp32",
    channels_last: bool = False,
):
    """Descriptors of a batch of same-size images. ``images``: B x H x W x 3 uint8 tensor already on
    the model's device. Returns a B x D float32 tensor of unit vectors, on the same device.

    ``recipe.resample == "pil"`` (dirtorch): every scale is resized from the uint8 images with
    Pillow on the host (one copy back to the host per batch), then normalised on the device."""
    import torch
    import torch.nn.functional as F


    # images are already in the model's order, so the order here is only for the arithmetic
    prep = Preprocess()

    def normalise(u8):  # B x 3 x H x W, channels_last strides unless made contiguous
        return prep.normalise_nhwc_u8(u8, mean, std, input_order=prep.channel_order, contiguous=not channels_last)

    height, width = images.shape[1:3]
    host = images.cpu().numpy() if recipe.resample == "pil" else None
    x = normalise(images) if host is None else None
    acc, count = None, 0
    for scale in recipe.scales:
        if host is None:
            xs = resize_on_device(x, recipe, scale)
        else:
            size = recipe.target_size(height, width, scale)
            resized = np.stack([pil_resize(im, size) for im in host])
            xs = normalise(torch.from_numpy(resized).to(images.device))
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        for view in _views(xs, recipe.flip):
            with autocast(images.device.type, precision):
                v = model(view)
            v = F.normalize(v.float(), p=2, dim=1)  # per-scale L2 (again in fp32 after autocast)
            if recipe.uses_power:
                v = _power(v, recipe.power, recipe.power_rule)
            acc = v if acc is None else acc + v
            count += 1
    acc = acc / count
    if recipe.uses_power:
        acc = _power(acc, 1.0 / recipe.power, recipe.power_rule)
    return F.normalize(acc, p=2, dim=1)


def reference_resize(image: np.ndarray, recipe: MultiScale, scale: float) -> np.ndarray:
    """The reference implementations' CPU resize of one float32 H x W x 3 image."""
    height, width = image.shape[:2]
    if recipe.size_rule == "scale_factor":
        import torch
        import torch.nn.functional as F

        if scale == 1.0:
            return image
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        y = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=recipe.antialias)
        return y[0].numpy().transpose(1, 2, 0)
    h, w = recipe.target_size(height, width, scale)
    if (h, w) == (height, width):
        return image
    if recipe.antialias:
        # dirtorch resizes with Pillow's BILINEAR, which antialiases when shrinking.
        from PIL import Image

        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize((w, h), Image.Resampling.BILINEAR))
            for c in range(image.shape[2])
        ]
        return np.stack(channels, axis=2)
    import cv2

    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def describe_reference(model, image: np.ndarray, recipe: MultiScale, preprocess) -> np.ndarray:
    """The reference procedure for one image (H x W x 3 uint8 in the model's channel order):
    batch 1, fp32, CPU resize, numpy normalisation, one host copy per scale."""
    import torch


    prep = Preprocess.coerce(preprocess)
    norm = functools.partial(prep.normalise_numpy, layout="HWC")  # image already in the model's order
    device = next(iter(model.parameters())).device
    base = image.astype(np.float32)
    acc, count = None, 0
    for scale in recipe.scales:
        if recipe.resample == "pil":  # dirtorch: Scale() on the uint8 PIL image, then ToTensor/Normalize
            im = pil_resize(image, recipe.target_size(image.shape[0], image.shape[1], scale)).astype(np.float32)
            im = norm(im)
        elif recipe.size_rule == "scale_factor":  # cirtorch normalises first, then interpolates
            normed = norm(base)
            im = reference_resize(normed.astype(np.float32), recipe, scale)
        else:  # CFCD: resize the 0-255 float image, then /255 and normalise
            im = reference_resize(base, recipe, scale)
            im = norm(im)
        chw = np.ascontiguousarray(im.transpose(2, 0, 1), dtype=np.float32)
        for view in (chw, chw[:, :, ::-1]) if recipe.flip else (chw,):
            x = torch.from_numpy(np.ascontiguousarray(view))[None].to(device)
            with torch.no_grad():
                v = model(x).cpu().numpy()[0].astype(np.float32)
            v = v / np.linalg.norm(v)
            if recipe.uses_power:
                v = _power_np(v, recipe.power, recipe.power_rule)
            acc = v if acc is None else acc + v
            count += 1
    acc = acc / count
    if recipe.uses_power:
        acc = _power_np(acc, 1.0 / recipe.power, recipe.power_rule)
    return (acc / np.linalg.norm(acc)).astype(np.float32)

