"""`cfcd serve --dataset`: the benchmark view on a registered dataset (GLDv2 retrieval on a
miniature mirror; a revisitop dataset), with the dataset's setups, metrics and image paths."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from _download_helpers import FileServer, gldv2_mirror  # noqa: E402
from _serve_helpers import built  # noqa: E402
from cfcd.cli import main as cfcd_main  # noqa: E402
from cfcd.errors import InputError  # noqa: E402
from cfcd.serve.app import ServeConfig, create_app, load_state  # noqa: E402
from cfcd.serve.service import ImageRoot  # noqa: E402

FAST = ["--model", "gem_efficientnet_lite0", "--scales", "single", "--max-size", "64", "--workers", "0",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def gldv2(tmp_path_factory):
    """The mirror's index and test tars in ROOT/gldv2_retrieval/, its stores from `cfcd benchmark`
    and a flat index of the database store."""
    from cfcd.index import build_index

    tmp = tmp_path_factory.mktemp("gldv2-serve")
    mirror = gldv2_mirror()
    root, bench = tmp / "data", tmp / "bench"
    with FileServer(mirror.files) as server:
        assert cfcd_main(["data", "download", "gldv2_retrieval", "--root", str(root), "--base-url", server.url,
                          "--parts", "index:0-1", "--parts", "test:0", "--no-progress", "--backoff", "0"]) == 0
    assert cfcd_main(["benchmark", "--dataset", "gldv2_retrieval", "--root", str(root), "--out", str(bench),
                      *FAST]) == 0
    build_index(bench / "database", "flat", out=tmp / "index")
    return {"mirror": mirror, "root": root, "bench": bench, "index": tmp / "index", "cache": tmp / "cache"}


@pytest.fixture(scope="module")
def served(gldv2):
    config = ServeConfig(index=gldv2["index"], dataset="gldv2_retrieval", root=gldv2["root"], cache_dir=gldv2["cache"])
    state = load_state(config)
    with TestClient(create_app(config, state=state), base_url="http://127.0.0.1") as client:
        yield client, state


def test_gldv2_benchmark_view_equals_cfcd_evaluate(served, gldv2, tmp_path):
    client, state = served
    queries = state.benchmark.query_store  # described at start-up: whole test images, in the cache
    assert queries.is_relative_to(gldv2["cache"])
    report = tmp_path / "e.json"
    assert cfcd_main(["evaluate", "--dataset", "gldv2_retrieval", "--root", str(gldv2["root"]), "-q", str(queries),
                      "-x", str(gldv2["bench"] / "database"), "--json", str(report)]) == 0
    expected = json.loads(report.read_text())
    body = client.get("/api/benchmark").json()
    assert body["dataset"] == "gldv2_retrieval" and body["metric"] == "AP@100"
    assert body["setups"] == ["public", "private", "all"]
    for setup in body["setups"]:
        assert set(body["metrics"][setup]) == {"mAP@100", "mPrecision@100"}
        for name, value in expected[setup].items():
            assert body["metrics"][setup][name] == pytest.approx(value, abs=1e-6)
    assert body["metrics"]["all"]["mAP@100"] > 0
    assert [q["id"] for q in body["queries"]] == list(expected["per_query"])
    for q in body["queries"]:
        assert q["bbx"] is None
        for setup in body["setups"]:
            want = expected["per_query"][q["id"]][setup]["AP@100"]
            assert q["AP"][setup] == (None if want is None else pytest.approx(want, abs=1e-6))


def test_gldv2_query_detail_tags_positives_public_or_private(served, gldv2):
    client, _ = served
    solution = [row for row in gldv2["mirror"].solution if row[2] != "Ignored"]
    usage = {"Public": "public", "Private": "private"}
    for query, images, kind in solution[:2]:  # one Public, one Private
        detail = client.get(f"/api/benchmark/{query}", params={"k": 1000}).json()
        assert detail["setup"] == "public" and detail["metric"] == "AP@100"  # no "medium": the first setup
        assert len(detail["ranked"]) == 16 and [r["rank"] for r in detail["ranked"]] == list(range(1, 17))
        classes = {r["id"]: r["class"] for r in detail["ranked"]}
        positives = set(images.split(" "))
        assert {i for i, c in classes.items() if c != "negative"} == positives
        assert {classes[i] for i in positives} == {usage[kind]}
        in_setup = client.get(f"/api/benchmark/{query}", params={"setup": usage[kind], "k": 1000}).json()
        assert {r["id"] for r in in_setup["ranked"] if r["role"] == "positive"} == positives
        assert in_setup["positives"] == 2 and in_setup["pr"][-1]["recall"] == pytest.approx(1.0)
        r = client.get(f"/api/benchmark/{query}", params={"setup": "medium"})
        assert r.status_code == 400 and "public, private, all" in r.json()["detail"]


def test_gldv2_query_and_database_images_are_served_from_their_splits(served, gldv2):
    from cfcd.data.datasets.gldv2 import gldv2_path

    client, _ = served
    query, images, _ = gldv2["mirror"].solution[0]
    database_id = images.split(" ")[0]
    split_dir = gldv2["root"] / "gldv2_retrieval"
    for image_id, split in ((database_id, "index"), (query, "test")):
        r = client.get(f"/api/images/{image_id}")
        assert r.status_code == 200, r.text
        assert r.content == (split_dir / split / gldv2_path(image_id)).read_bytes()
    thumb = client.get(f"/api/benchmark/{query}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.get("/api/images/no_such_image").status_code == 404


def test_image_root_serves_a_mapped_path_only_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"jpg")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"jpg")
    (root / "link.jpg").symlink_to(outside)
    images = ImageRoot(root, set(), paths={"inside": root / "a" / "x.jpg"})
    images.add_paths({"outside": outside, "link": root / "link.jpg", "missing": root / "a" / "y.jpg"})
    assert images.path("inside") == (root / "a" / "x.jpg").resolve()
    assert images.path("outside") is None and images.path("link") is None and images.path("missing") is None
    assert "outside" in images and "x" not in images


def test_revisitop_dataset_by_name_gives_the_numbers_of_its_gnd(tmp_path_factory):
    """--dataset NAME --root DATA of a revisitop dataset (roxford5k's rules, registered here as
    "tiny": the real one refuses a 23-image gnd) reads DATA/tiny/gnd_tiny.pkl and serves its jpg/
    images: the same view as --gnd on that file."""
    from cfcd.data.datasets import DATASETS, RevisitopDataset, register_dataset

    data = built(tmp_path_factory)
    root = tmp_path_factory.mktemp("revisitop-root")
    shutil.copytree(data["jpg"], root / "tiny" / "jpg")
    shutil.copy(data["gnd"], root / "tiny" / "gnd_tiny.pkl")
    by_gnd = load_state(ServeConfig(index=data["index"], gnd=data["gnd"], queries=data["queries"]))
    register_dataset(RevisitopDataset(name="tiny", description="the serve tests' benchmark", archives=(),
                                      files=(), flatten=False))
    try:
        config = ServeConfig(index=data["index"], dataset="tiny", root=root, queries=data["queries"])
        state = load_state(config)
    finally:
        DATASETS.unregister("tiny")
    with TestClient(create_app(config, state=state), base_url="http://127.0.0.1") as client:
        body = client.get("/api/benchmark").json()
        assert body["metric"] == "AP" and body["setups"] == ["easy", "medium", "hard"]
        assert body["metrics"] == by_gnd.benchmark.summary()["metrics"]
        assert body["per_query"] == by_gnd.benchmark.summary()["per_query"]
        detail = client.get("/api/benchmark/rocket_query").json()
        assert detail["setup"] == "medium" and {r["class"] for r in detail["ranked"]} >= {"easy", "hard", "junk"}
        r = client.get("/api/images/rocket_query")
        assert r.status_code == 200 and r.content == (root / "tiny" / "jpg" / "rocket_query.jpg").read_bytes()


def test_dataset_errors(gldv2):
    with pytest.raises(InputError, match="needs --root"):
        load_state(ServeConfig(index=gldv2["index"], dataset="gldv2_retrieval"))
    with pytest.raises(InputError, match="pass one of them"):
        load_state(ServeConfig(index=gldv2["index"], dataset="gldv2_retrieval", root=gldv2["root"],
                               gnd=gldv2["root"] / "gnd.pkl"))
    with pytest.raises(InputError, match="no_such_set"):
        load_state(ServeConfig(index=gldv2["index"], dataset="no_such_set", root=gldv2["root"]))
