"""Multi-scale extraction: the fast batched path against the reference procedure, stores, resume
and rank sharding. Real photos (skimage/sklearn), real models from cfcd.models."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _extract_helpers import TinyNet, real_photos, resize_rgb, write_photo_dir  # noqa: E402

from cfcd.data.lists import read_image_list  # noqa: E402
from cfcd.errors import CfcdError, InputError  # noqa: E402
from cfcd.extract import (  # noqa: E402
    ExtractOptions,
    Extractor,
    MultiScale,
    describe_reference,
    extract_to_store,
    parse_scales,
    reference_resize,
    resize_on_device,
)
from cfcd.store import open_store  # noqa: E402


@pytest.fixture(scope="module")
def photos():
    return real_photos()


@pytest.fixture(scope="module")
def small_photos(photos):
    """Real photos at ~200 px, three different sizes (two share one: they batch together)."""
    sizes = [(192, 144), (192, 144), (144, 192), (197, 131)]
    return [resize_rgb(p, w, h) for p, (w, h) in zip(list(photos.values())[:4], sizes)]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------
# resizing on the device == cv2.INTER_LINEAR on float images


@pytest.mark.parametrize("in_hw", [(150, 200), (139, 211), (97, 64)])
def test_device_resize_matches_cv2_inter_linear(photos, in_hw):
    image = resize_rgb(photos["astronaut"], in_hw[1], in_hw[0]).astype(np.float32)
    recipe = parse_scales("cfcd")
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    for scale in recipe.scales:  # both shrinking (incl. exactly /2 on even sizes) and enlarging
        ours = resize_on_device(x, recipe, scale)[0].numpy().transpose(1, 2, 0)
        h, w = round(in_hw[0] * scale), round(in_hw[1] * scale)
        ref = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        assert ours.shape == ref.shape
        # float rounding only (in/out ratio computed in float vs double): measured < 2e-3 on 0..255
        assert np.abs(ours - ref).max() < 5e-3, (scale, np.abs(ours - ref).max())
        assert np.array_equal(reference_resize(image, recipe, scale), ref)


def test_target_sizes_follow_each_reference():
    cfcd = parse_scales("cfcd")
    assert cfcd.scales == (0.3535, 0.5, 0.7071, 1.0, 1.4142)
    assert cfcd.target_size(767, 1024, 0.5) == (384, 512)  # round(383.5) = 384 (half to even)
    assert cfcd.target_size(765, 1024, 0.5) == (382, 512)  # round(382.5) = 382
    assert cfcd.target_size(768, 1024, 1.4142) == (1086, 1448)
    dirt = parse_scales("dirtorch_relative")
    assert dirt.target_size(765, 1024, 0.5) == (383, 512)  # int(0.5 + 382.5)
    largest = parse_scales("dirtorch")  # Scale(S, largest=True): the longer side becomes S
    assert largest.target_size(765, 1024, 724) == (541, 724) and largest.target_size(300, 200, 1024) == (1024, 683)
    cirt = parse_scales("cirtorch")
    assert cirt.target_size(768, 1024, 1 / math.sqrt(2)) == (543, 724)  # floor
    x = torch.zeros(1, 3, 768, 1024)
    assert resize_on_device(x, cirt, 1 / math.sqrt(2)).shape[-2:] == (543, 724)
    custom = parse_scales("1, 0.7071 0.5", power=3.0)
    assert custom.scales == (1.0, 0.7071, 0.5) and custom.uses_power and custom.name == "custom"
    assert parse_scales("cfcd", power=2.0).name == "cfcd+custom"
    with pytest.raises(InputError, match="preset"):
        parse_scales("fast please")
    with pytest.raises(InputError):
        MultiScale((0.0,))


# ---------------------------------------------------------------------------------------------
# fast path == reference procedure


def _fast_vs_naive(model, images, recipe, *, batch_size=4):
    fast = Extractor(model, ExtractOptions(scales=recipe, batch_size=batch_size, workers=0)).describe_arrays(images)
    naive = Extractor(model, ExtractOptions(scales=recipe, mode="naive", workers=0)).describe_arrays(images)
    return fast, naive


@pytest.mark.parametrize("preset", ["cfcd", "cirtorch", "dirtorch_relative", "dirtorch_small"])
def test_fast_equals_reference_tiny_net(small_photos, preset):
    model = TinyNet()
    images = [im[..., ::-1].copy() for im in small_photos]  # BGR, as the model asks
    if preset == "dirtorch_small":  # the dirtorch rules (Pillow on uint8, longer side S) at small sizes
        recipe = MultiScale((256, 181), "power", 3.0, "largest", True, "x", power_rule="dirtorch", resample="pil")
    else:
        recipe = parse_scales(preset)
    fast, naive = _fast_vs_naive(model, images, recipe)
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)
    assert _cos(fast, naive).min() >= 0.99999


def test_power_combination_formula(small_photos):
    model = TinyNet()
    recipe = parse_scales("1 0.5", power=3.0)
    image = small_photos[0][..., ::-1].copy()
    got = describe_reference(model, image, recipe, model.preprocess)
    per_scale = [describe_reference(model, image, parse_scales([s]), model.preprocess) for s in (1.0, 0.5)]
    power = lambda v, p: np.sign(v) * np.abs(v) ** p  # noqa: E731 - a list of scales: cirtorch's rule
    expected = power((power(per_scale[0], 3) + power(per_scale[1], 3)) / 2, 1 / 3)
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    mean = (per_scale[0] + per_scale[1]) / 2
    got_mean = describe_reference(model, image, parse_scales("1 0.5"), model.preprocess)
    assert np.allclose(got_mean, mean / np.linalg.norm(mean), atol=1e-6)


def test_fast_equals_reference_real_models(small_photos):
    import cfcd.models

    torch.manual_seed(0)
    for name in ("cfcd_r50", "gem_efficientnet_lite0"):
        model = cfcd.models.create(name, weights=None if cfcd.models.has_embedded_weights(name) else "random")
        order = model.preprocess.channel_order
        images = [im[..., ::-1].copy() if order == "BGR" else im for im in small_photos]
        # two photos of the same size: batched together in the fast path, one by one in the reference
        fast, naive = _fast_vs_naive(model, images[:2], parse_scales("cfcd"))
        cos = _cos(fast, naive)
        assert cos.min() >= 0.9999, (name, cos)


def test_batching_does_not_change_descriptors(small_photos):
    model = TinyNet()
    images = [im[..., ::-1].copy() for im in small_photos]
    recipe = parse_scales("cfcd")
    one = Extractor(model, ExtractOptions(scales=recipe, batch_size=1, workers=0)).describe_arrays(images)
    many = Extractor(model, ExtractOptions(scales=recipe, batch_size=8, workers=0)).describe_arrays(images)
    assert np.abs(one - many).max() < 1e-5


def test_bf16_autocast_close_to_fp32(small_photos):
    model = TinyNet()
    images = [im[..., ::-1].copy() for im in small_photos]
    fp32 = Extractor(model, ExtractOptions(workers=0)).describe_arrays(images)
    bf16 = Extractor(model, ExtractOptions(workers=0, precision="bf16")).describe_arrays(images)
    assert _cos(fp32, bf16).min() > 0.99
    with pytest.raises(InputError, match="fp32"):
        ExtractOptions(mode="naive", precision="bf16")


# ---------------------------------------------------------------------------------------------
# stores: end to end from files, failures, resume, settings


def _bad_files(directory: Path, photos) -> dict[str, str]:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zero.jpg").write_bytes(b"")
    (directory / "text.png").write_text("not an image")
    raw = (directory.parent / "img").glob("*/*.jpg")
    first = sorted(raw)[0].read_bytes()
    (directory / "cut.jpg").write_bytes(first[: len(first) // 2])
    Image.fromarray(resize_rgb(photos["coffee"], 90, 60)).convert("L").save(directory / "gray.png")
    return {"bad/zero": "empty file", "bad/text": "not an image"}


def test_store_end_to_end_with_bad_images_and_resume(tmp_path, photos):
    root = tmp_path / "data"
    write_photo_dir(root / "img", count=10, long_side=96)
    _bad_files(root / "bad", photos)
    image_list = read_image_list(root)
    model = TinyNet()
    opts = dict(workers=2, batch_size=3, shard_size=4, progress=False)
    clean = extract_to_store(model, image_list, tmp_path / "clean", ExtractOptions(**opts))
    store = open_store(tmp_path / "clean")
    failed = {f["id"]: f["reason"] for f in store.meta["failures"]}
    assert set(failed) == {"bad/zero", "bad/text"} and "empty file" in failed["bad/zero"]
    assert store.ids == [i for i in image_list.ids if i not in failed]  # list order
    warnings = store.meta["extract"]["warnings"]
    assert [w["id"] for w in warnings] == ["bad/cut"]
    assert store.meta["extract"]["scales"]["scales"] == [0.3535, 0.5, 0.7071, 1.0, 1.4142]
    assert store.meta["extract"]["settings"]["model"]["state_sha256"]
    assert "round(h*s)" in store.meta["extract"]["resize"]
    # rows equal the in-memory extraction of the same list
    rows, fails, _ = Extractor(model, ExtractOptions(workers=0)).extract(image_list)
    keep = [i for i, image_id in enumerate(image_list.ids) if image_id not in failed]
    assert np.abs(np.asarray(store.descriptors) - rows[keep]).max() < 1e-6
    assert len(fails) == 2 and clean.count == len(keep)

    # a job stopped like a kill, then resumed, gives the same store
    out = tmp_path / "resumed"
    stopped = extract_to_store(model, image_list, out, ExtractOptions(**opts, stop_after=5))
    assert stopped.stopped and not (out / "meta.json").exists()
    assert len(list((out / ".partial" / "main").glob("shard-*.txt"))) >= 1
    resumed = extract_to_store(model, image_list, out, ExtractOptions(**opts))
    assert resumed.skipped >= 4 and resumed.count < clean.count
    again = open_store(out)
    assert again.ids == store.ids
    # Same ids, same order; rows equal up to float rounding (batches were composed differently).
    assert np.abs(np.asarray(again.descriptors) - np.asarray(store.descriptors)).max() < 1e-6
    assert {f["id"] for f in again.meta["failures"]} == set(failed)

    # other settings on a partial store: a clear error
    extract_to_store(model, image_list, tmp_path / "p2", ExtractOptions(**opts, stop_after=4))
    with pytest.raises(CfcdError, match="different settings.*scales"):
        extract_to_store(model, image_list, tmp_path / "p2", ExtractOptions(**opts, scales=parse_scales("single")))
    with pytest.raises(CfcdError, match="different settings"):
        extract_to_store(TinyNet(seed=1), image_list, tmp_path / "p2", ExtractOptions(**opts))
    # a complete store: same settings is a no-op, other settings an error
    assert extract_to_store(model, image_list, tmp_path / "clean", ExtractOptions(**opts)).skipped == len(keep)
    with pytest.raises(CfcdError, match="complete descriptor store with different settings"):
        extract_to_store(model, image_list, tmp_path / "clean", ExtractOptions(**opts, max_size=64))


def test_float16_store_and_query_crops(tmp_path):
    from _extract_helpers import write_revisitop

    from cfcd.data.gnd import load_gnd
    from cfcd.data.lists import gnd_image_list

    gnd_path = write_revisitop(tmp_path, "toyoxf", n_db=4, n_q=2, long_side=96)
    gnd = load_gnd(gnd_path)
    queries = gnd_image_list(gnd, root=tmp_path, queries=True)
    model = TinyNet()
    for rule in ("truncate", "round"):
        opts = ExtractOptions(workers=0, crop_rule=rule, dtype="float16", progress=False)
        extract_to_store(model, queries, tmp_path / rule, opts, queries=True)
    a, b = open_store(tmp_path / "truncate"), open_store(tmp_path / "round")
    assert a.ids == gnd.qimlist and a.descriptors.dtype == np.float16
    assert a.meta["extract"]["crop_rule"] == "truncate" and "int()" in a.meta["extract"]["query_crop"]
    assert b.meta["extract"]["crop_rule"] == "round"
    # boxes [10.5, 7.4, 84.5, 66.4]: truncation and rounding give different crops
    assert not np.array_equal(np.asarray(a.descriptors), np.asarray(b.descriptors))
    # the crop really is applied: an uncropped extraction differs
    full = Extractor(model, ExtractOptions(workers=0)).extract(gnd_image_list(gnd, root=tmp_path))[0]
    assert full.shape[0] == len(gnd.imlist)


# ---------------------------------------------------------------------------------------------
# two ranks (gloo) == one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    image_list = read_image_list(root)
    extract_to_store(TinyNet(), image_list, out, ExtractOptions(workers=0, batch_size=2, shard_size=3, progress=False))


def test_two_ranks_gloo_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    write_photo_dir(tmp_path / "img", count=9, long_side=80)
    image_list = read_image_list(tmp_path / "img")
    extract_to_store(TinyNet(), image_list, tmp_path / "single", ExtractOptions(workers=0, progress=False))
    mp.start_processes(
        _rank_main, args=(2, _free_port(), str(tmp_path / "img"), str(tmp_path / "ranks")), nprocs=2, start_method="fork"
    )
    single, ranks = open_store(tmp_path / "single"), open_store(tmp_path / "ranks")
    assert ranks.ids == single.ids == image_list.ids
    assert np.abs(np.asarray(ranks.descriptors) - np.asarray(single.descriptors)).max() < 1e-6
    assert ranks.meta["extract"]["world_size"] == 2
    assert json.loads(json.dumps(ranks.meta))  # meta is plain JSON


class _FailsOnLargeInputs(TinyNet):
    """Raises like a CUDA out-of-memory error when an input is larger than a limit."""

    def forward(self, x):
        if x.shape[-1] * x.shape[-2] > 100 * 100:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(x)


def test_a_model_error_fails_only_that_image(tmp_path):
    write_photo_dir(tmp_path / "img", count=6, long_side=64)
    from PIL import Image

    Image.fromarray(resize_rgb(real_photos()["coffee"], 120, 90)).save(tmp_path / "img" / "big.jpg")
    image_list = read_image_list(tmp_path / "img")
    model = _FailsOnLargeInputs()
    rows, failures, _ = Extractor(model, ExtractOptions(workers=0, batch_size=8, scales=parse_scales("1 0.5"))).extract(image_list)
    assert [f[0] for f in failures] == ["big"] and "model failed on the 120x90 image" in failures[0][1]
    good = [i for i, image_id in enumerate(image_list.ids) if image_id != "big"]
    assert np.isfinite(rows[good]).all() and np.isnan(rows[image_list.ids.index("big")]).all()


def test_store_meta_reads_back_the_options_that_made_the_store(tmp_path):
    """StoreMeta is the one reader of meta.json; ExtractOptions.from_settings inverts settings()."""
    from cfcd.extract.scales import parse_scales
    from cfcd.store import StoreMeta

    write_photo_dir(tmp_path / "img", count=3, long_side=64)
    image_list = read_image_list(tmp_path / "img")
    options = ExtractOptions(scales=parse_scales("cirtorch"), max_size=48, crop_rule="round", dtype="float16",
                             workers=0, progress=False)
    extract_to_store(TinyNet(), image_list, tmp_path / "s", options)
    meta = StoreMeta.of(open_store(tmp_path / "s"))
    assert meta.image_list == image_list.source and meta.failures == [] and not meta.queries
    assert meta.state_sha256 == meta.settings["model"]["state_sha256"]
    back = ExtractOptions.from_settings(meta.extract_options, workers=0)
    assert back.settings() == options.settings()
    assert back.scales == options.scales
    with pytest.raises(InputError, match="extraction settings"):
        ExtractOptions.from_settings(StoreMeta.of({"model": "x"}).extract_options)
