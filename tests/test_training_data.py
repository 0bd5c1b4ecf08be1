"""Training data: lists, the GLDv2-clean converter, the reference augmentation and the dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfcd.cli import main as cli_main
from cfcd.train.data import EIG_VALS, EIG_VECS, LabelledList, TrainingDataset, TrainTransform, ValTransform, center_crop, gldv2_image_path, make_gldv2_lists, pca_lighting, random_sized_crop, read_confusions, read_labelled_list, scale_short_side
from cfcd.errors import InputError


def _photo():
    import skimage.data

    return skimage.data.astronaut()[:, :, ::-1].copy()  # BGR, as cv2.imread


# ---------------------------------------------------------------- lists and converter


def test_read_list_and_errors(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("# comment\na/b.jpg 3\n\nc d/e.jpg 0\n")
    lst = read_labelled_list(p, tmp_path)
    assert lst.paths == ["a/b.jpg", "c d/e.jpg"] and lst.labels.tolist() == [3, 0]
    assert lst.full_path(0) == tmp_path / "a/b.jpg"
    for bad, msg in [("x.jpg\n", "expected 'path label'"), ("x.jpg a\n", "not an integer"),
                     ("x.jpg -1\n", "negative")]:
        p.write_text(bad)
        with pytest.raises(InputError, match=msg) as e:
            read_labelled_list(p)
        assert str(p) in str(e.value)
    p.write_text("x.jpg 5\n")
    with pytest.raises(InputError, match=">= num_classes"):
        read_labelled_list(p, num_classes=5)


def _write_csv(path, rows):
    path.write_text("landmark_id,images\n" + "".join(f"{lid},{' '.join(ids)}\n" for lid, ids in rows))


def test_make_gldv2_lists_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for lid in [7, 3, 100, 55, 9, 12]:
        n = int(rng.integers(1, 30))
        rows.append((lid, [f"{rng.integers(16**15):016x}" for _ in range(n)]))
    rows.append((999, ["abcdef0123456789"]))  # a single image: dropped by min_images=2
    csv = tmp_path / "train_clean.csv"
    _write_csv(csv, rows)
    info = make_gldv2_lists(csv, tmp_path / "a", val_fraction=0.2, seed=1)
    make_gldv2_lists(csv, tmp_path / "b", val_fraction=0.2, seed=1)
    make_gldv2_lists(csv, tmp_path / "c", val_fraction=0.2, seed=2)
    a_train = (tmp_path / "a/train_list.txt").read_text()
    assert a_train == (tmp_path / "b/train_list.txt").read_text()
    assert (tmp_path / "a/val_list.txt").read_text() != (tmp_path / "c/val_list.txt").read_text()
    train = read_labelled_list(tmp_path / "a/train_list.txt")
    val = read_labelled_list(tmp_path / "a/val_list.txt")
    kept = sorted(lid for lid, ids in rows if len(ids) >= 2)
    assert info["num_classes"] == len(kept) and info["dropped_landmarks"] == 1
    assert set(train.labels.tolist()) == set(range(len(kept)))  # contiguous, every class in train
    assert np.bincount(train.labels).min() >= 2
    assert not set(train.paths) & set(val.paths)
    assert len(train) + len(val) == sum(len(ids) for lid, ids in rows if len(ids) >= 2)
    assert abs(len(val) - round(0.2 * (len(train) + len(val)))) <= 3
    # labels follow landmark-id order; path layout train/a/b/c/id.jpg
    label_map = (tmp_path / "a/label_map.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[1]) for r in label_map] == kept
    ids_of = {lid: set(ids) for lid, ids in rows}
    for p, c in zip(train.paths, train.labels):
        image_id = p.split("/")[-1][:-4]
        assert p == gldv2_image_path(image_id) and image_id in ids_of[kept[c]]


def test_make_list_cli_and_bad_csv(tmp_path, capsys):
    csv = tmp_path / "c.csv"
    _write_csv(csv, [(1, ["aaa1", "aaa2", "aab3"]), (2, ["bbb1", "bbb2"])])
    rc = cli_main(["train", "make-list", "--csv", str(csv), "--out", str(tmp_path / "o"), "--val-fraction", "0"])
    assert rc == 0 and (tmp_path / "o/train_list.txt").read_text().startswith("train/a/a/a/aaa1.jpg 0\n")
    (tmp_path / "bad.csv").write_text("id,url\n1,x\n")
    assert cli_main(["train", "make-list", "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "p")]) == 2
    assert "landmark_id,images" in capsys.readouterr().err


def test_read_confusions(tmp_path):
    lst = LabelledList(["a.jpg", "b.jpg"], np.array([0, 1]), tmp_path / "l.txt")
    f = tmp_path / "s.txt"
    f.write_text("b.jpg 1 0 0.6\na.jpg 0 0 0.99\n")
    gt, pred = read_confusions(f, lst)
    assert gt.tolist() == [0, 1] and pred.tolist() == [0, 0]
    f.write_text("a.jpg 0 0 0.99\n")
    with pytest.raises(InputError, match="no entry for training image 'b.jpg'"):
        read_confusions(f, lst)
    f.write_text("a.jpg 1 0 0.99\nb.jpg 1 1 1\n")
    with pytest.raises(InputError, match="has gt 1 but label 0"):
        read_confusions(f, lst)


# ---------------------------------------------------------------- transforms


def test_random_sized_crop_matches_reference_semantics():
    """Same numbers as pycls with the same draws: replay the draws and crop by hand."""
    import cv2

    im = _photo().astype(np.float32)
    for seed in range(20):
        out = random_sized_crop(im, 64, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        h, w = im.shape[:2]
        expected = None
        for _ in range(10):
            area = rng.uniform(0.08, 1.0) * h * w
            ar = rng.uniform(3 / 4, 4 / 3)
            wc, hc = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if rng.uniform() < 0.5:
                wc, hc = hc, wc
            if hc <= h and wc <= w:
                y = 0 if hc == h else int(rng.integers(0, h - hc))
                x = 0 if wc == w else int(rng.integers(0, w - wc))
                expected = cv2.resize(im[y:y + hc, x:x + wc], (64, 64), interpolation=cv2.INTER_LINEAR)
                break
        np.testing.assert_array_equal(out, expected)


def test_crop_fallback_and_val_transform():
    im = np.zeros((20, 400, 3), np.uint8)  # extreme aspect: every try fails -> scale + center crop
    im[:, 190:210] = 255
    out = random_sized_crop(im, 16, np.random.default_rng(0))
    assert out.shape == (16, 16, 3)
    ref = center_crop(scale_short_side(im.astype(np.float32), 16), 16)
    np.testing.assert_array_equal(out, ref)
    # val: short side -> 24 (floor of the long side), center crop 16 with ceil offsets
    s = scale_short_side(np.zeros((30, 45, 3), np.float32), 24)
    assert s.shape == (24, 36, 3)
    v = ValTransform(16, 24)(np.full((30, 45, 3), 128, np.uint8))
    assert v.shape == (3, 16, 16) and v.dtype == np.float32


def test_pca_lighting_bgr_reversal():
    x = np.zeros((3, 2, 2), np.float32)
    pca_lighting(x, np.random.default_rng(3), 0.1)
    alpha = np.random.default_rng(3).normal(0, 0.1, 3)
    rgb = (EIG_VECS * alpha * EIG_VALS).sum(axis=1)  # the reference's formula
    np.testing.assert_allclose(x[:, 0, 0], rgb[::-1], rtol=1e-6)  # BGR channel i gets rgb[2-i]


def test_train_transform_normalisation_orders():
    im = _photo()
    bgr = TrainTransform(32, {"channel_order": "BGR", "mean": (0.406, 0.456, 0.485), "std": (0.225, 0.224, 0.229)},
                         lighting=0.0, flip=0.0)
    rgb = TrainTransform(32, {"channel_order": "RGB", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
                         lighting=0.0, flip=0.0)
    a = bgr(im, np.random.default_rng(1))
    b = rgb(im, np.random.default_rng(1))
    np.testing.assert_allclose(a[::-1], b, rtol=1e-5, atol=1e-5)  # same pixels, channels reversed
    # default preprocess (None) is the CFCD BGR one
    np.testing.assert_array_equal(TrainTransform(32, None, lighting=0.0, flip=0.0)(im, np.random.default_rng(1)), a)


# ---------------------------------------------------------------- dataset


def test_dataset_determinism_and_bad_images(tmp_path, caplog):
    import cv2

    im = _photo()
    paths = []
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), im[i * 50:i * 50 + 200, :200])
        paths.append(f"{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths.append("bad.jpg")
    lst = LabelledList(paths + ["missing.jpg"], np.array([0, 0, 1, 1, 0, 1]), root=tmp_path)
    ds = TrainingDataset(lst, TrainTransform(32), seed=5)
    x1, y1, i1 = ds[(3, 2)]
    x2, _, _ = ds[(3, 2)]
    x3, _, _ = ds[(4, 2)]
    assert x1.shape == (3, 32, 32) and y1 == 1 and i1 == 2
    assert np.array_equal(x1.numpy(), x2.numpy()) and not np.array_equal(x1.numpy(), x3.numpy())
    # the unreadable images are replaced by readable images of the same class, reported once
    with caplog.at_level("WARNING", logger="cfcd.train.data"):
        xb, yb, ib = ds[(0, 4)]
        ds[(1, 4)]
        xm, ym, _ = ds[(0, 5)]
    assert yb == 0 and ib == 4 and xb.shape == (3, 32, 32) and ym == 1
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 2 and any("bad.jpg" in w for w in warned)
    # a class with no readable image at all is a clear error
    only_bad = LabelledList(["bad.jpg", "missing.jpg"], np.array([0, 0]), root=tmp_path)
    with pytest.raises(InputError, match="no readable image of class 0"):
        TrainingDataset(only_bad, TrainTransform(32))[0]


def test_make_list_keeps_the_images_on_disk(tmp_path, capsys):
    """A partial GLDv2 download: only the images present under --root are listed, the missing ones
    counted; labels 0..N-1 over the landmarks left, the mapping saved; train.csv gives the same lists."""
    import json

    rows = [(5, ["a01x", "a02x", "a03x", "b01x"]), (9, ["c01x", "c02x", "c03x"]), (2, ["d01x", "d02x"])]
    present = {"a01x", "a02x", "b01x", "c01x", "d01x", "d02x"}  # landmark 9 keeps one image: dropped
    root = tmp_path / "gldv2"
    for image_id in present:
        p = root / "train" / gldv2_image_path(image_id, prefix="")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"jpeg")
    (root / "train" / "a" / "0" / "1" / "stray.jpg").write_bytes(b"not in the layout")
    clean = tmp_path / "train_clean.csv"
    _write_csv(clean, rows)
    rc = cli_main(["train", "make-list", "--csv", str(clean), "--root", str(root), "--out", str(tmp_path / "lists"),
                   "--val-fraction", "0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"3 of the csv's 9 images are not under {root}: listed the 6 present" in captured.err
    info = json.loads(captured.out)
    assert info["missing_images"] == 3 and info["csv_images"] == 9 and info["num_classes"] == 2
    assert info["dropped_landmarks"] == 1 and info["csv_format"] == "train_clean"
    train = read_labelled_list(tmp_path / "lists/train_list.txt", root)
    assert all(train.full_path(i).is_file() for i in range(len(train)))
    assert sorted(train.paths) == sorted(f"train/{gldv2_image_path(i, prefix='')}" for i in present - {"c01x"})
    assert json.loads((tmp_path / "lists/label_map.json").read_text()) == {"2": 0, "5": 1}
    assert dict(zip(train.paths, train.labels.tolist()))["train/d/0/1/d01x.jpg"] == 0
    # the same images from train.csv (id,url,landmark_id)
    full = tmp_path / "train.csv"
    full.write_text("id,url,landmark_id\n" + "".join(f"{i},http://x/{i}.jpg,{lid}\n" for lid, ids in rows for i in ids))
    info2 = make_gldv2_lists(full, tmp_path / "lists2", root=root, val_fraction=0)
    assert info2["csv_format"] == "train" and info2["missing_images"] == 3
    assert (tmp_path / "lists2/train_list.txt").read_text() == (tmp_path / "lists/train_list.txt").read_text()
    # nothing there: an error that says where it looked
    with pytest.raises(InputError, match="none of the 9 images"):
        make_gldv2_lists(clean, tmp_path / "lists3", root=tmp_path / "gldv2", prefix="train/a/0/1")
    with pytest.raises(InputError, match="no such directory"):
        make_gldv2_lists(clean, tmp_path / "lists3", root=tmp_path / "nowhere")
