"""The offline demo: its benchmark is a valid revisitop layout, and own-photo search finds the scene."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cfcd.data.gnd import load_gnd
from cfcd.demo import _view, build_demo_benchmark, run_own_photos_demo


def test_demo_benchmark_is_a_valid_revisitop_layout(tmp_path):
    gnd_path = build_demo_benchmark(tmp_path, max_side=96)
    gnd = load_gnd(gnd_path, dataset="demo")
    assert len(gnd.qimlist) == 8 and len(gnd.imlist) > 40
    for name in gnd.qimlist + gnd.imlist:
        assert (tmp_path / "jpg" / f"{name}.jpg").is_file()
    for entry in gnd.gnd:
        easy, hard, junk = set(entry["easy"]), set(entry["hard"]), set(entry["junk"])
        assert easy and hard and junk and not (easy & hard) and not (easy & junk) and not (hard & junk)
        assert max(easy | hard | junk) < len(gnd.imlist)
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2


def test_own_photos_search_ranks_a_view_of_the_query_scene_first(tmp_path, real_photos):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("coffee", "astronaut", "chelsea", "rocket", "china"):
        Image.fromarray(real_photos[name]).resize((160, 120)).save(photos / f"{name}.jpg")
    query = tmp_path / "query.jpg"
    view = _view(np.asarray(Image.open(photos / "rocket.jpg")), crop=0.8, angle=0, gain=0.9, rng=rng)
    Image.fromarray(view).save(query)
    out = io.StringIO()
    ranked = run_own_photos_demo(photos, query, tmp_path / "work", model_name="gem_efficientnet_lite0",
                                 scales="single", max_size=None, k=3, out=out)
    assert ranked[0][0] == "rocket"
    assert ranked[0][1] > ranked[1][1]
    assert "rocket" in out.getvalue()
