"""The offline demo: consistent, disjoint data; the tiny end-to-end run with its report; resuming;
refusing a foreign directory; the own-photos search with its incremental cache."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfcd.data.gnd import load_gnd
from cfcd.train.data import read_labelled_list
from cfcd.demo.data import Sizes, build_demo_data, check_disjoint, synthetic_view
from cfcd.errors import InputError

TINY = Sizes(max_side=96, train_views=2, max_test=3, max_train=4, max_val=2, max_distractors=2)


def _sources(manifest: dict, part: str) -> set[str]:
    return {src for image, src in manifest["images"].items() if (image.split("/", 1)[0] == "train") == (part == "train")}


def test_demo_data_is_consistent_and_training_sources_are_disjoint(tmp_path):
    data = build_demo_data(tmp_path, TINY, seed=0)
    for gnd_path, name in ((data.test_gnd, "demo"), (data.val_gnd, "demoval")):
        gnd = load_gnd(gnd_path, name)
        assert set(gnd.qimlist).isdisjoint(gnd.imlist)  # no query among the database, hence its positives
        for q, entry in enumerate(gnd.gnd):
            easy, hard, junk = set(entry["easy"]), set(entry["hard"]), set(entry["junk"])
            assert easy and hard and junk and not (easy & hard or easy & junk or hard & junk)
            source = data.manifest["images"][f"{name}/{gnd.qimlist[q]}"]
            # every positive and junk image is a view of the query's own source photo
            assert {data.manifest["images"][f"{name}/{gnd.imlist[i]}"] for i in easy | hard | junk} == {source}
        for image in gnd.qimlist + gnd.imlist:
            assert (tmp_path / "benchmarks" / name / "jpg" / f"{image}.jpg").is_file()
    train = read_labelled_list(data.train_list, data.train_root)
    assert train.num_classes == data.num_classes == 4
    assert all(train.full_path(i).is_file() for i in range(len(train)))
    # one class per source photo, and no training source in any benchmark
    by_class = {}
    for path, label in zip(train.paths, train.labels.tolist()):
        by_class.setdefault(label, set()).add(data.manifest["images"][f"train/{path}"])
    assert all(len(s) == 1 for s in by_class.values()) and len(set().union(*by_class.values())) == 4
    assert _sources(data.manifest, "train").isdisjoint(_sources(data.manifest, "benchmark"))
    check_disjoint(tmp_path)
    # the check catches a training image drawn from a benchmark photo
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["images"]["train/leak/000.jpg"] = manifest["roles"]["test"][0]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="both in the training list and a benchmark"):
        check_disjoint(tmp_path)


def test_synthetic_views_get_smaller_and_blurrier_with_severity(real_photos):
    image = real_photos["astronaut"]
    rng = np.random.default_rng(0)
    area = {g: np.mean([synthetic_view(image, g, rng).shape[0] * synthetic_view(image, g, rng).shape[1]
                        for _ in range(3)]) for g in ("easy", "hard", "junk")}
    assert area["easy"] > area["hard"] > area["junk"]


def test_tiny_demo_end_to_end_report_summary_resume_and_checkpoint(tmp_path):
    import cfcd.models
    from cfcd.demo.pipeline import MODEL, run_demo
    from cfcd.index import open_index

    import torch

    out = tmp_path / "demo"
    log = io.StringIO()
    torch.set_num_threads(2)
    summary = run_demo(out, mode="tiny", seed=0, stream=log, progress=False)
    assert torch.get_num_threads() == 2  # restored after the demo
    text = log.getvalue()
    assert text.count("mAP (%)") == 1 and "[7/7]" in text and "total" in text
    # the served index is the fine-tuned model, --compare its pretrained baseline
    assert f"cfcd serve {out / 'index'} " in text and f"--compare {out / 'index_before'} " in text
    assert "queries better than the baseline / worse: Easy" in text

    saved = json.loads((out / "summary.json").read_text())
    assert saved["seed"] == 0 and saved["threads"] == 1
    assert saved["queries_better_worse"]["hard"]["queries"] == 4
    assert saved["before"].keys() == saved["after"].keys() == {"easy", "medium", "hard"}
    for when in ("before", "after"):
        for setup in ("easy", "medium", "hard"):
            for key, value in saved[when][setup].items():
                assert 0.0 <= value <= 100.0, (when, setup, key, value)
    assert {"data", "baseline", "stage1", "confusions", "stage2", "after", "report", "total"} <= set(saved["seconds"])
    assert saved["after"] == summary["after"]

    page = (out / "report.html").read_text()
    assert "Before and after fine-tuning" in page and page.count("<table class='metrics'>") >= 2
    assert len(re.findall(r"src=\"data:image/png;base64,", page)) == 2  # per-query AP and training curves
    assert page.count("data:image/jpeg;base64,") >= 2 * 2 * 9  # grids: 2 models x queries x (query + 8)
    for colour in ("#2ca02c", "#d62728"):  # easy and negative borders
        assert f"border:4px solid {colour}" in page
    assert not re.search(r"(src|href)=['\"]https?://", page)  # self-contained
    assert "cfcd serve" in page and "cfcd train confusions" in page

    # the stage-2 log has the local triplet term; the checkpoint loads with cfcd.models.create
    epochs = [json.loads(line) for line in (out / "runs/stage2/log.jsonl").read_text().splitlines()]
    assert any("train_loss_local" in row for row in epochs if row["kind"] == "epoch")
    tuned = cfcd.models.create(MODEL, weights=out / "runs/stage2/final")
    pretrained = cfcd.models.create(MODEL)
    changed = [k for k, v in tuned.state_dict().items() if not np.array_equal(v.numpy(), pretrained.state_dict()[k].numpy())]
    assert changed and not any(k.startswith("backbone.blocks.0.") for k in changed)  # frozen stage unchanged
    n_database = len(load_gnd(out / "data/benchmarks/demo/gnd_demo.pkl", "demo").imlist)
    assert len(open_index(out / "index")) == len(open_index(out / "index_before")) == n_database
    assert "--compare " in page

    # rerun with the same --out: every step is found done, the figures are the same
    log = io.StringIO()
    again = run_demo(out, mode="tiny", seed=0, stream=log, progress=False)
    assert "already trained" in log.getvalue() and "complete store with the same settings" in log.getvalue()
    assert again["after"] == summary["after"] and again["before"] == summary["before"]
    # another mode in the same directory is refused
    with pytest.raises(InputError, match="mode 'tiny'"):
        run_demo(out, mode="quick", stream=io.StringIO())

    # a run started with another torch thread count gives the very same numbers (the demo fixes it)
    torch.set_num_threads(1)
    try:
        other = run_demo(tmp_path / "demo1", mode="tiny", seed=0, stream=io.StringIO(), progress=False)
    finally:
        torch.set_num_threads(2)
    assert other["before"] == summary["before"] and other["after"] == summary["after"]
    assert other["queries_better_worse"] == summary["queries_better_worse"]


def test_demo_without_matplotlib_stops_at_once_and_names_the_extra(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo"
    code = ("import sys; sys.modules['matplotlib'] = None; from cfcd.cli import main; "
            f"sys.exit(main(['demo', '--tiny', '--out', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "matplotlib (report plots)" in done.stderr and 'pip install "cfcd[demo]"' in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()  # refused before any step


def test_demo_refuses_a_non_empty_foreign_directory(tmp_path):
    from cfcd.demo.pipeline import run_demo

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a `cfcd demo` directory"):
        run_demo(tmp_path, mode="tiny", stream=io.StringIO(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def _photo_folder(tmp_path: Path, real_photos) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "astronaut", "chelsea", "rocket"):
        Image.fromarray(real_photos[name]).resize((96, 72)).save(photos / f"{name}.jpg")
    return photos


def test_own_photos_index_is_cached_and_updated_incrementally(tmp_path, real_photos):
    from cfcd.demo.photos import PhotoLibrary, search_photos

    photos = _photo_folder(tmp_path, real_photos)
    query = tmp_path / "query.jpg"
    view = synthetic_view(np.asarray(Image.open(photos / "rocket.jpg")), "easy", np.random.default_rng(0))
    Image.fromarray(view).save(query)
    cache = tmp_path / "cache"
    kw = dict(model_name="gem_efficientnet_lite0", scales="single", max_size=None, cache=cache, progress=False)

    out = io.StringIO()
    ranked = search_photos(photos, query, k=3, out=out, **kw)
    assert ranked[0][0] == "rocket.jpg" and ranked[0][1] > ranked[1][1]
    assert "4 added" in out.getvalue()

    # second query: nothing described again
    out = io.StringIO()
    assert search_photos(photos, query, k=3, out=out, **kw) == ranked
    assert "0 added, 0 changed, 0 removed" in out.getvalue() and "describing" not in out.getvalue()

    # one photo added, one removed, one unreadable: only the new files are described
    Image.fromarray(real_photos["china"]).resize((96, 72)).save(photos / "china.jpg")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "coffee.jpg").unlink()
    library = PhotoLibrary(photos, **kw)
    assert library.options.runtime == "auto"  # onnxruntime on a CPU, like cfcd extract
    said = []
    index = library.update(said.append)
    u = library.last_update
    # the counts add up: 4 before + 1 added - 1 removed = 4; the unreadable one is not "added"
    assert (u.added, u.changed, u.removed, u.failed, u.total) == (1, 0, 1, 1, 4)
    assert any("describing 2 new or changed photo(s)" in line for line in said)
    assert sorted(index.ids) == ["astronaut.jpg", "chelsea.jpg", "china.jpg", "rocket.jpg"]
    # the index directory is a normal `cfcd index build` output
    assert (library.dir / "index" / "index.json").is_file()


def test_own_photos_query_that_is_not_an_image_fails_before_indexing(tmp_path, real_photos):
    from cfcd.demo.photos import search_photos

    photos = _photo_folder(tmp_path, real_photos)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(InputError, match="notes.txt: not a readable image"):
        search_photos(photos, bad, cache=tmp_path / "cache", progress=False, out=io.StringIO())
    assert not (tmp_path / "cache").exists()
    with pytest.raises(InputError, match="query photo not found"):
        search_photos(photos, tmp_path / "missing.jpg", cache=tmp_path / "cache", out=io.StringIO())


def test_recipe_frozen_prefixes_are_checked():
    import cfcd.models
    from cfcd.train.config import load_config
    from cfcd.train.trainer import freeze_parameters

    with pytest.raises(InputError, match="model.frozen must be a list"):
        load_config("demo_lite0_s1", {"model": {"frozen": "backbone.blocks.0"}})
    model = cfcd.models.create("gem_efficientnet_lite0", pretrained=False)
    with pytest.raises(InputError, match="no parameter of the model starts with"):
        freeze_parameters(model, ["backbone.block.0"])  # typo: blocks
    n = freeze_parameters(model, load_config("demo_lite0_s1").model.frozen)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) and "backbone.blocks.3.0.conv_pw.weight" in frozen
    assert not any(name.startswith("backbone.blocks.4") for name in frozen)
