"""Robust image decoding and image lists, on generated files and real photos."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _extract_helpers import real_photos, write_photo_dir  # noqa: E402

from cfcd.data.images import ImageInfo, ImageLoadError, capped_size, crop_box, load_image  # noqa: E402
from cfcd.data.lists import gnd_image_list, read_image_list, read_list_file, scan_directory  # noqa: E402
from cfcd.errors import CfcdError, InputError  # noqa: E402


@pytest.fixture(scope="module")
def photos():
    return real_photos()


def _save(path: Path, array: np.ndarray, **kw) -> Path:
    Image.fromarray(array).save(path, **kw)
    return path


def test_plain_jpeg_identical_to_cv2_imread(tmp_path, photos):
    # The CFCD reference decodes with cv2.imread (BGR); our Pillow decoder must give the same pixels.
    for name, image in list(photos.items())[:4]:
        for quality in (75, 95):
            path = _save(tmp_path / f"{name}_{quality}.jpg", image, quality=quality)
            ours = load_image(path, channel_order="BGR")
            ref = cv2.imread(str(path), cv2.IMREAD_COLOR)
            assert ours.shape == ref.shape and ours.dtype == np.uint8
            assert np.array_equal(ours, ref), f"{name} q{quality}: Pillow and cv2 decodes differ"
    rgb = load_image(tmp_path / f"{name}_95.jpg", channel_order="RGB")
    assert np.array_equal(rgb, ours[..., ::-1])


def test_zero_bytes_and_not_an_image(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG at all\n" * 20)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.jpg")
    assert isinstance(ImageLoadError("x", "y"), CfcdError)


def test_truncated_jpeg_decoded_like_cv2_with_a_warning(tmp_path, photos):
    from PIL import ImageFile

    path = _save(tmp_path / "full.jpg", photos["astronaut"], quality=90)
    raw = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[: len(raw) // 2])
    info = ImageInfo()
    ours = load_image(cut, channel_order="BGR", info=info)
    assert info.warnings and "truncated" in info.warnings[0]
    ref = cv2.imread(str(cut), cv2.IMREAD_COLOR)  # libjpeg recovery: missing blocks grey
    assert np.array_equal(ours, ref)
    assert (ours[-8:] == 128).all()  # the lost bottom rows are grey
    full = load_image(path, channel_order="BGR")
    assert np.array_equal(ours[:64], full[:64])  # what is there is decoded exactly
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never set globally
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(cut, truncated="fail")
    # a truncated PNG cannot be recovered reliably: a failure
    png = _save(tmp_path / "full.png", photos["coffee"])
    raw = png.read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ImageLoadError):
        load_image(tmp_path / "cut.png")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return path


def test_pixel_bomb_refused_before_decoding(tmp_path, photos):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageLoadError, match="20000x20000|bomb"):
        load_image(bomb)
    # Our own cap, below Pillow's: refused from the header with the size in the message.
    path = _save(tmp_path / "photo.jpg", photos["coffee"])
    with pytest.raises(ImageLoadError, match="600x400 = 240000 pixels, over the cap of 100000"):
        load_image(path, max_pixels=100_000)
    assert load_image(path, max_pixels=240_000).shape == (400, 600, 3)
    # A header over our cap but under Pillow's limit: refused by size before any pixel is decoded.
    big = _png_header_only(tmp_path / "big.png", 12000, 9000)
    with pytest.raises(ImageLoadError, match="12000x9000"):
        load_image(big, max_pixels=50_000_000)


def test_cmyk_grayscale_rgba_palette(tmp_path, photos):
    rgb = photos["chelsea"]
    # CMYK JPEG -> RGB, close to the original colours
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 6
    # greyscale -> 3 identical channels
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    _save(tmp_path / "gray.png", gray)
    out = load_image(tmp_path / "gray.png")
    assert out.shape == (*gray.shape, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    # RGBA: alpha dropped by default (cv2.imread behaviour), composited on white on request
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 255
    rgba = np.dstack([rgb, alpha])
    _save(tmp_path / "rgba.png", rgba)
    dropped = load_image(tmp_path / "rgba.png")
    assert np.array_equal(dropped, rgb)
    assert np.array_equal(dropped[..., ::-1], cv2.imread(str(tmp_path / "rgba.png"), cv2.IMREAD_COLOR))
    white = load_image(tmp_path / "rgba.png", alpha="white")
    assert np.array_equal(white[:, : rgb.shape[1] // 2], rgb[:, : rgb.shape[1] // 2])
    assert (white[:, rgb.shape[1] // 2 :] == 255).all()
    # palette with transparency
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    out = load_image(tmp_path / "pal.png")
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 20


def test_16bit_png_reduced_to_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (40, 50, 3)
    assert np.array_equal(out[..., 0], (gray16 >> 8).astype(np.uint8))
    rgb16 = rng.integers(0, 65536, size=(30, 20, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16)  # cv2 writes BGR
    out = load_image(tmp_path / "c16.png", channel_order="BGR")
    assert np.array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_exif_orientation_applied_like_cv2(tmp_path, photos):
    rgb = photos["coffee"]  # 400 x 600
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    out = load_image(tmp_path / "rot.jpg", channel_order="BGR")
    assert out.shape == (600, 400, 3)
    assert np.array_equal(out, cv2.imread(str(tmp_path / "rot.jpg"), cv2.IMREAD_COLOR))
    info = ImageInfo()
    load_image(tmp_path / "rot.jpg", info=info)
    assert info.original_size == (400, 600)


def test_crop_rules_and_size_cap(tmp_path, photos):
    bbx = [136.5, 34.1, 648.5, 955.7]  # roxford5k query 0
    assert crop_box(bbx, 1024, 1024, "truncate") == (136, 34, 648, 955)
    assert crop_box(bbx, 1024, 1024, "round") == (136, 34, 648, 956)  # half to even, like PIL crop
    assert crop_box([2.5, 3.5, 10.2, 20.9], 100, 100, "round") == (2, 4, 10, 21)
    assert crop_box([-5, -3, 500, 400], 300, 200, "truncate") == (0, 0, 300, 200)
    with pytest.raises(CfcdError, match="empty"):
        crop_box([50, 50, 50, 60], 100, 100)
    rgb = photos["astronaut"]
    path = _save(tmp_path / "a.png", rgb)
    box = [10.6, 20.5, 200.4, 301.5]
    ours = load_image(path, bbx=box, crop_rule="round")
    pil = np.asarray(Image.open(path).convert("RGB").crop(box))  # revisitop's Python crop
    assert np.array_equal(ours, pil)
    assert np.array_equal(load_image(path, bbx=box, crop_rule="truncate"), rgb[20:301, 10:200])
    # cap: thumbnail of the full image; a crop gets the factor the full image gets (cirtorch)
    assert load_image(path, max_size=256).shape == (256, 256, 3)
    assert capped_size(1024, 768, 512) == (512, 384) and capped_size(300, 200, 512) == (300, 200)
    crop = load_image(path, bbx=[0, 0, 256, 128], max_size=256, crop_rule="truncate")
    assert crop.shape == (64, 128, 3)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(path, bbx=[600, 600, 700, 700])


def test_image_lists(tmp_path):
    ids = write_photo_dir(tmp_path / "imgs", count=6, long_side=64)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / ".hidden.jpg").write_bytes(b"")
    scanned = scan_directory(tmp_path / "imgs")
    assert scanned.ids == ids and all(p.is_file() for p in scanned.paths)
    assert read_image_list(tmp_path / "imgs").ids == ids
    assert scan_directory(tmp_path / "imgs", id_rule="path").ids == [i + ".jpg" for i in ids]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n" + "\n".join(f"{i}.jpg {k}" for k, i in enumerate(reversed(ids))) + "\n\n")
    from_list = read_list_file(listing, root=tmp_path / "imgs")
    assert from_list.ids == list(reversed(ids))
    assert all(p.is_file() for p in from_list.paths)
    # saved by an editor that writes a UTF-8 byte-order mark: the first image is not lost
    bom = tmp_path / "bom.txt"
    bom.write_text("\n".join(f"{i}.jpg" for i in ids), encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    from_bom = read_list_file(bom, root=tmp_path / "imgs")
    assert from_bom.ids == ids and all(p.is_file() for p in from_bom.paths)
    dup = tmp_path / "dup.txt"
    dup.write_text("a/x.jpg\na/x.png\n")
    with pytest.raises(InputError, match="duplicate"):
        read_list_file(dup)
    with pytest.raises(InputError, match="no such"):
        read_image_list(tmp_path / "nope.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no image files"):
        read_image_list(tmp_path / "emptydir")


def test_gnd_image_list(tmp_path):
    from _extract_helpers import write_revisitop

    from cfcd.data.gnd import load_gnd

    gnd_path = write_revisitop(tmp_path, "toyoxf", n_db=5, n_q=2, long_side=64)
    gnd = load_gnd(gnd_path)
    db = gnd_image_list(gnd, root=tmp_path / "toyoxf")
    q = gnd_image_list(gnd, root=tmp_path, queries=True)
    assert db.ids == gnd.imlist and db.boxes is None and all(p.is_file() for p in db.paths)
    assert q.ids == gnd.qimlist and len(q.boxes) == 2 and all(p.is_file() for p in q.paths)


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_decodes_a_large_jpeg_reduced_close_to_the_full_decode(tmp_path, photos, orientation):
    """draft=True: libjpeg's reduced decode, then the same crop and cap as a full decode."""
    big = cv2.resize(photos["astronaut"], (2048, 1536), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=92, exif=exif.tobytes())
    box = [300.4, 200.6, 1500.2, 1200.8]  # original (displayed) pixels
    for bbx in (None, box):
        full_info, draft_info = ImageInfo(), ImageInfo()
        full = load_image(path, max_size=256, bbx=bbx, info=full_info)
        reduced = load_image(path, max_size=256, bbx=bbx, info=draft_info, draft=True)
        assert draft_info.original_size == full_info.original_size  # the original size, oriented
        assert abs(reduced.shape[0] - full.shape[0]) <= 1 and abs(reduced.shape[1] - full.shape[1]) <= 1
        h, w = min(reduced.shape[0], full.shape[0]), min(reduced.shape[1], full.shape[1])
        diff = np.abs(reduced[:h, :w].astype(int) - full[:h, :w].astype(int)).mean()
        assert diff < 1.5, f"bbx={bbx}: mean abs difference {diff:.1f} to the full decode"
    # a small image is read exactly as without draft
    small = _save(tmp_path / "small.jpg", photos["coffee"], quality=90)
    assert np.array_equal(load_image(small, max_size=1024, draft=True), load_image(small, max_size=1024))
