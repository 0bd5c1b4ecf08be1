"""``Preprocess`` is the one owner of uint8 -> network input: each method equals the plain per-channel
formula exactly, for both channel orders, uint8/float, channels_last and non-contiguous views."""

import numpy as np
import pytest
import torch
from skimage import data as skdata

from cfcd.train.data import ValTransform, collate, opencv_fork_guard, worker_init
from cfcd.errors import InputError
from cfcd.models.preprocess import BGR_IMAGENET, RGB_IMAGENET, Preprocess

PREPS = [BGR_IMAGENET, RGB_IMAGENET, Preprocess("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]


def _u8_batch():
    im = skdata.astronaut()[::4, ::4]  # 128 x 128 x 3 RGB uint8, a real photo
    return torch.from_numpy(np.stack([im, im[::-1].copy()]))


def _plain_torch(u8, prep, input_order):
    """Channel c of the output is input channel src(c), minus 255 mean, over 255 std, in float32."""
    out = []
    for c in range(3):
        src = c if input_order == prep.channel_order else 2 - c
        m = torch.tensor(prep.mean[c] * 255.0, dtype=torch.float32)
        s = torch.tensor(prep.std[c] * 255.0, dtype=torch.float32)
        out.append((u8[..., src].to(torch.float32) - m) / s)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("prep", PREPS)
@pytest.mark.parametrize("input_order", ["RGB", "BGR"])
@pytest.mark.parametrize("view", ["plain", "noncontig", "channels_last", "float"])
def test_normalise_nhwc_equals_plain_formula(prep, input_order, view):
    u8 = _u8_batch()
    x = u8
    if view == "noncontig":
        x = u8[:, ::2, 1:]
        u8 = x
    elif view == "channels_last":  # NHWC storage seen through an NCHW-contiguous-in-memory permutation
        x = u8.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    elif view == "float":
        x = u8.float()
    before = x.clone()
    want = _plain_torch(u8, prep, input_order)
    mean, std = prep.scale_shift(torch.device("cpu"))
    for got in (prep.normalise_nhwc_u8(x, mean, std, input_order=input_order),
                prep.normalise_nhwc_u8(x, input_order=input_order, contiguous=False)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(x, before)  # never in place


def test_scale_shift_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mean, std = BGR_IMAGENET.scale_shift(dtype=dtype)
        assert mean.shape == (1, 3, 1, 1) and mean.dtype == dtype
        assert torch.equal(mean.flatten(), torch.tensor([m * 255.0 for m in BGR_IMAGENET.mean], dtype=dtype))
        assert torch.equal(std.flatten(), torch.tensor([s * 255.0 for s in BGR_IMAGENET.std], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prep", PREPS)
def test_call_rgb01_equals_plain_formula(prep, dtype):
    x = (_u8_batch().permute(0, 3, 1, 2).float() / 255.0).to(dtype)[:, :, 1:, ::1]
    before = x.clone()
    got = prep(x)
    for c in range(3):
        src = c if prep.channel_order == "RGB" else 2 - c
        want = (x[:, src] - torch.tensor(prep.mean[c], dtype=dtype)) / torch.tensor(prep.std[c], dtype=dtype)
        assert got.dtype == dtype and torch.equal(got[:, c], want)
    assert torch.equal(x, before)


@pytest.mark.parametrize("prep", PREPS)
@pytest.mark.parametrize("input_order", [None, "RGB", "BGR"])
def test_normalise_numpy_equals_plain_formula(prep, input_order):
    hwc = skdata.astronaut()[::4, ::4]
    hwc_f = hwc.astype(np.float32)
    mean = np.asarray(prep.mean, np.float32)
    std = np.asarray(prep.std, np.float32)
    order = prep.channel_order if input_order is None else input_order
    src = [c if order == prep.channel_order else 2 - c for c in range(3)]
    want = np.stack([(hwc_f[..., src[c]] / np.float32(255.0) - mean[c]) / std[c] for c in range(3)], axis=2)
    got = prep.normalise_numpy(hwc_f, input_order=input_order)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    # CHW from [0, 1], and the in-place variant the training transforms use
    chw01 = np.ascontiguousarray(hwc_f.transpose(2, 0, 1)) / np.float32(255.0)
    want01 = np.stack([(chw01[src[c]] - mean[c]) / std[c] for c in range(3)])
    assert np.array_equal(prep.normalise_numpy(chw01, input_order=input_order, layout="CHW", from_u8=False), want01)
    view = chw01[:, :, ::-1]  # a non-contiguous view: must be copied, not written through
    before = view.copy()
    got = prep.normalise_numpy(view, input_order=input_order, layout="CHW", from_u8=False, out="inplace")
    assert np.array_equal(got, np.ascontiguousarray(want01[:, :, ::-1])) and np.array_equal(view, before)
    owned = chw01.copy()
    got = prep.normalise_numpy(owned, input_order=input_order, layout="CHW", from_u8=False, out="inplace")
    assert np.array_equal(got, want01)


def test_coerce():
    assert Preprocess.coerce(None) == BGR_IMAGENET
    assert Preprocess.coerce(RGB_IMAGENET) is RGB_IMAGENET
    assert Preprocess.coerce({"channel_order": "bgr", "mean": list(BGR_IMAGENET.mean),
                              "std": list(BGR_IMAGENET.std)}) == BGR_IMAGENET
    with pytest.raises(InputError, match="channel_order must be BGR or RGB"):
        Preprocess.coerce({"channel_order": "GRB", "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="input_order"):
        RGB_IMAGENET.normalise_numpy(np.zeros((2, 2, 3), np.float32), input_order="HSV")


class _Photos:
    """Real cv2 work in the workers: ValTransform (cv2.resize) of a real photo."""

    def __init__(self):
        self.im = np.ascontiguousarray(skdata.astronaut()[..., ::-1])
        self.tf = ValTransform(64, 96)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.tf(self.im)), i, i


def test_dataloader_workers_after_parent_used_opencv():
    """The parent starts OpenCV's thread pool, then forks two workers whose worker_init sets cv2
    threads: without opencv_fork_guard this deadlocks (the DataLoader's timeout turns it into an error)."""
    import cv2
    from torch.utils.data import DataLoader

    saved = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)  # a real pool on any machine
        big = np.random.default_rng(0).random((1500, 1500, 3), dtype=np.float32)
        for _ in range(3):
            cv2.resize(big, (1100, 1100), interpolation=cv2.INTER_LINEAR)
        opencv_fork_guard()
        loader = DataLoader(_Photos(), batch_size=2, num_workers=2, worker_init_fn=worker_init, collate_fn=collate,
                            timeout=60, multiprocessing_context="fork")
        batches = list(loader)
    finally:
        cv2.setNumThreads(saved)
    want = _Photos()[0][0]
    assert len(batches) == 2 and all(torch.equal(b[0][j], want) for b in batches for j in range(2))
