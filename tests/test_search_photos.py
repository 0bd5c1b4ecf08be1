"""`cfcd search INDEX --queries PHOTO|FOLDER|LIST`: photos described with the index's own model and settings."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cfcd.cli import main as cli


def test_search_by_photo_file_folder_and_list(tmp_path, real_photos, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ("coffee", "astronaut", "chelsea", "rocket")
    for name in names:
        Image.fromarray(real_photos[name]).resize((96, 72)).save(photos / f"{name}.png")
    store, index = tmp_path / "store", tmp_path / "index"
    assert cli(["extract", "--model", "gem_efficientnet_lite0", "--images", str(photos), "--out", str(store),
                "--scales", "1 0.7071067811865476", "--workers", "0", "--no-progress"]) == 0
    assert cli(["index", "build", str(store), "--type", "flat", "--out", str(index), "--no-progress"]) == 0
    capsys.readouterr()

    # one photo: its own image first, with the score of identical descriptors
    assert cli(["search", str(index), "--queries", str(photos / "chelsea.png"), "--k", "3",
                "--json", str(tmp_path / "one.json")]) == 0
    printed = capsys.readouterr().out
    assert "scales 1, 0.7071, max size none" in printed  # 4 significant digits
    [one] = json.loads((tmp_path / "one.json").read_text())["queries"]
    assert one["query"] == "chelsea" and one["results"][0]["id"] == "chelsea"
    assert abs(one["results"][0]["score"] - 1.0) < 1e-4

    # a folder and a list (saved with a byte-order mark): every photo finds itself first
    (tmp_path / "list.txt").write_text("\n".join(f"photos/{n}.png" for n in names), encoding="utf-8-sig")
    for queries in (photos, tmp_path / "list.txt"):
        out = tmp_path / "all.json"
        assert cli(["search", str(index), "--queries", str(queries), "--k", "2", "--json", str(out)]) == 0
        result = json.loads(out.read_text())["queries"]
        # ids as `cfcd extract` gives them: relative to the folder, or as written in the list
        own = {q["query"].rsplit("/", 1)[-1]: q["results"][0]["id"] for q in result}
        assert own == {n: n for n in names}
    # the same descriptors as the stored ones: searching the store directly (exact) agrees
    assert cli(["search", str(store), "--queries", str(photos / "rocket.png"), "--k", "1"]) == 0
    assert "rocket" in capsys.readouterr().out.splitlines()[-1]


def test_search_by_photo_refuses_an_index_without_source_meta(tmp_path, real_photos, capsys):
    from cfcd.index import build_index

    x = np.eye(4, 8, dtype=np.float32)
    build_index(x, "flat", ids=[f"p{i}" for i in range(4)], out=tmp_path / "ix")
    Image.fromarray(real_photos["coffee"]).resize((64, 48)).save(tmp_path / "q.jpg")
    assert cli(["search", str(tmp_path / "ix"), "--queries", str(tmp_path / "q.jpg")]) == 2
    assert "records no source store meta" in capsys.readouterr().err
    assert cli(["search", str(tmp_path / "ix"), "--queries", str(tmp_path / "missing.jpg")]) == 2
    assert "no such query store, photo, folder or image list" in capsys.readouterr().err
