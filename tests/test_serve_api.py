"""`cfcd serve`'s JSON API against the real app over a real small index of real photos.

Search by upload must give what `cfcd extract` + `cfcd search` give for the same file, the
benchmark endpoints what `cfcd evaluate --json` gives; every bad input gets its status code and
a message naming the problem, and the server keeps serving.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import build_index_dir, built  # noqa: E402
from cfcd.cli import main as cfcd_main  # noqa: E402
from cfcd.errors import InputError  # noqa: E402
from cfcd.serve.app import ServeConfig, create_app, load_state  # noqa: E402
from cfcd.serve.service import Limits, ImageRoot, SearchService  # noqa: E402

MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return built(tmp_path_factory)


@pytest.fixture(scope="module")
def served(data, tmp_path_factory):
    """The app with the benchmark view; its query store is described at start-up (not --queries)."""
    cache = tmp_path_factory.mktemp("serve-cache")
    config = ServeConfig(index=data["index"], gnd=data["gnd"], cache_dir=cache,
                         limits=Limits(max_upload_bytes=MAX_BYTES, max_upload_pixels=4_000_000))
    state = load_state(config)
    with TestClient(create_app(config, state=state), base_url="http://127.0.0.1") as client:
        yield client, state, cache


def _snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _upload(client, data: bytes, **fields):
    return client.post("/api/search", files={"image": ("photo.jpg", data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


# --------------------------------------------------------------------------- search


def test_search_by_upload_equals_cfcd_extract_and_search(served, data, tmp_path, capsys):
    client, state, _ = served
    photo_dir = tmp_path / "photo"
    photo_dir.mkdir()
    source = data["jpg"] / "rocket_query.jpg"  # a photo that is not in the index
    (photo_dir / "rocket_query.jpg").write_bytes(source.read_bytes())
    store, out = tmp_path / "q.store", tmp_path / "hits.json"
    assert cfcd_main(["extract", "--model", "gem_efficientnet_lite0", "--images", str(photo_dir), "--out", str(store),
                      "--scales", "single", "--crop-rule", "truncate", "--workers", "0", "--device", "cpu",
                      "--no-progress"]) == 0
    assert cfcd_main(["search", str(data["index"]), "--queries", str(store), "--k", "10", "--json", str(out)]) == 0
    expected = json.loads(out.read_text())["queries"][0]["results"]

    response = _upload(client, source.read_bytes(), k=10)
    assert response.status_code == 200, response.text
    body = response.json()
    got = body["results"]
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    assert [r["rank"] for r in got] == list(range(1, 11))
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], rtol=0, atol=1e-6)
    assert got[0]["id"].startswith("rocket_")
    assert body["query"]["kind"] == "upload" and body["query"]["descriptor_source"] == "extracted"
    assert body["descriptor"]["scales"]["scales"] == [1.0] and body["descriptor"]["model"] == "gem_efficientnet_lite0"

    # the same upload again by its key (a shared link) gives the same list
    again = client.get("/api/search", params={"upload": body["query"]["upload"], "k": 10}).json()
    assert again["results"] == got


def test_upload_with_a_box_is_described_like_a_revisitop_query(served, data):
    """The box crop is the query crop of `cfcd extract --gnd --queries` (same rule, same numbers)."""
    from cfcd.data.gnd import load_gnd
    from cfcd.store import open_store
    from cfcd.index import open_index

    client, _, _ = served
    gnd = load_gnd(data["gnd"])
    qi = gnd.qimlist.index("chelsea_query")
    box = ",".join(repr(float(v)) for v in gnd.bbx(qi))
    body = _upload(client, (data["jpg"] / "chelsea_query.jpg").read_bytes(), k=5, box=box).json()
    qstore = open_store(data["queries"])
    expected = open_index(data["index"]).search(np.asarray(qstore.descriptors[qi : qi + 1], dtype=np.float32), 5)
    assert [r["id"] for r in body["results"]] == expected.ids[0]
    np.testing.assert_allclose([r["score"] for r in body["results"]], expected.scores[0], atol=1e-6)
    assert body["query"]["box"] == [float(v) for v in gnd.bbx(qi)]


def test_search_by_id_uses_the_indexed_descriptor(served, data):
    from cfcd.store import open_store
    from cfcd.index import open_index

    client, _, _ = served
    body = client.get("/api/search", params={"id": "coffee_easy0", "k": 5}).json()
    assert body["query"] == {"kind": "id", "id": "coffee_easy0", "box": None, "descriptor_source": "stored",
                             "downscaled": None}
    assert body["results"][0]["id"] == "coffee_easy0"
    db = open_store(data["db"])
    row = db.ids.index("coffee_easy0")
    expected = open_index(data["index"]).search(np.asarray(db.descriptors[row : row + 1], dtype=np.float32), 5)
    assert [r["id"] for r in body["results"]] == expected.ids[0]
    # with a box the image is decoded and described again, cropped
    boxed = client.get("/api/search", params={"id": "coffee_easy0", "k": 5, "box": "10,10,90,80"}).json()
    assert boxed["query"]["descriptor_source"] == "extracted" and boxed["query"]["box"] == [10, 10, 90, 80]
    assert boxed["results"][0]["score"] < body["results"][0]["score"]


def test_concurrent_searches_give_the_serial_results(served, data):
    client, _, _ = served
    photos = [(data["jpg"] / f"{n}_query.jpg").read_bytes() for n in ("coffee", "astronaut", "chelsea", "rocket")]
    serial = [_upload(client, p, k=8).json()["results"] for p in photos]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            r = _upload(client, photos[i % 4], k=8)
            assert r.status_code == 200, r.text
            results[i] = r.json()["results"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, got in results.items():
        assert [r["id"] for r in got] == [r["id"] for r in serial[i % 4]]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in serial[i % 4]], atol=1e-6)


def test_health_and_image_listing(served):
    client, state, _ = served
    health = client.get("/api/health").json()
    assert health["model"] == "gem_efficientnet_lite0" and health["index_type"] == "flat"
    assert health["count"] == len(state.service.index) == 23 and health["dim"] == 1280
    assert health["version"] and health["benchmark"] == {"dataset": "tiny", "queries": 4}
    assert health["runtime"] == "onnx"  # ServeConfig's default: auto, i.e. onnxruntime on a CPU
    listing = client.get("/api/images", params={"q": "coffee", "limit": 2}).json()
    assert listing["total"] == 4 and listing["ids"] == ["coffee_easy0", "coffee_easy1"]


# --------------------------------------------------------------------------- benchmark


def test_benchmark_endpoints_equal_cfcd_evaluate_json(served, data, tmp_path):
    from cfcd.evaluation import protocol_setups, reference_compute_ap

    client, state, _ = served
    report = tmp_path / "report.json"
    assert cfcd_main(["evaluate", "--gnd", str(data["gnd"]), "-q", str(data["queries"]), "-x", str(data["db"]),
                      "--json", str(report)]) == 0
    expected = json.loads(report.read_text())
    body = client.get("/api/benchmark").json()
    # the query store described at start-up equals `cfcd extract --queries`: the numbers are identical
    for setup in ("easy", "medium", "hard"):
        assert body["metrics"][setup] == expected[setup]
    assert body["per_query"] == expected["per_query"]
    assert [q["id"] for q in body["queries"]] == list(expected["per_query"])
    assert body["metrics"]["hard"]["mAP"] < 100  # the tiny benchmark is not trivial

    from cfcd.data.gnd import load_gnd

    gnd = load_gnd(data["gnd"])
    setups = protocol_setups(gnd)
    for qi, query in enumerate(gnd.qimlist):
        for setup in ("easy", "medium", "hard"):
            detail = client.get(f"/api/benchmark/{query}", params={"setup": setup, "k": 1000}).json()
            assert detail["AP"][setup] == pytest.approx(expected["per_query"][query][setup]["AP"])
            ranked = detail["ranked"]
            assert len(ranked) == len(gnd.imlist) and [r["rank"] for r in ranked] == list(range(1, 24))
            entry = gnd.gnd[qi]
            for r in ranked:
                j = gnd.imlist.index(r["id"])
                want = next((key for key in ("easy", "hard", "junk") if j in entry[key]), "negative")
                assert r["class"] == want
            # the ranking shown is the ranking scored: revisitop's AP of it is the AP reported
            ok_keys, junk_keys = setups[setup]
            ok = [gnd.imlist[j] for key in ok_keys for j in entry[key]]
            junk = {gnd.imlist[j] for key in junk_keys for j in entry[key]}
            kept = [r["id"] for r in ranked if r["id"] not in junk]
            pos = np.array(sorted(kept.index(i) for i in ok))
            assert 100 * reference_compute_ap(pos, len(ok)) == pytest.approx(detail["AP"][setup])
            assert detail["pr"][-1]["recall"] == pytest.approx(1.0)
            assert [p["precision"] for p in detail["pr"]] == pytest.approx([(i + 1) / (p + 1) for i, p in enumerate(pos)])


def test_the_benchmark_query_store_is_described_once_and_reused(served, data):
    """The page's query store is cfcd.evaluation.benchmark's queries part, in the cache; a second start reuses it."""
    from cfcd.data.gnd import load_gnd
    from cfcd.store import open_store
    from cfcd.serve.benchmark import query_store_for

    _, state, cache = served
    service = state.service
    first = state.benchmark.query_store
    assert first.is_relative_to(cache) and first.name == "queries"
    before = (first / "descriptors.npy").stat().st_mtime_ns
    again = query_store_for(service, load_gnd(data["gnd"]), image_root=service.images.root)
    assert again == first and (first / "descriptors.npy").stat().st_mtime_ns == before
    store = open_store(again)
    assert store.ids == load_gnd(data["gnd"]).qimlist and store.meta["benchmark_part"] == "queries"


def test_benchmark_query_lists_missed_positives_after_the_top_k(served):
    client, _, _ = served
    full = client.get("/api/benchmark/rocket_query", params={"setup": "hard", "k": 1000}).json()
    hard_rank = next(r["rank"] for r in full["ranked"] if r["class"] == "hard")
    assert hard_rank > 1
    top = client.get("/api/benchmark/rocket_query", params={"setup": "hard", "k": hard_rank - 1}).json()
    assert len(top["ranked"]) == hard_rank - 1
    assert [m["rank"] for m in top["missed"]] == [hard_rank] and top["missed"][0]["class"] == "hard"
    assert client.get("/api/benchmark/rocket_query/thumb").headers["content-type"] == "image/jpeg"


def test_benchmark_errors(served):
    client, _, _ = served
    r = client.get("/api/benchmark/no_such_query")
    assert r.status_code == 404 and "no query 'no_such_query'" in r.json()["detail"]
    r = client.get("/api/benchmark/rocket_query", params={"setup": "extreme"})
    assert r.status_code == 400 and "unknown setup 'extreme'" in r.json()["detail"]
    r = client.get("/api/compare")
    assert r.status_code == 404 and "--compare" in r.json()["detail"]


# --------------------------------------------------------------------------- bad input


def _bomb_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (3000, 2000)).save(buffer, format="PNG")  # 6 M pixels in a few kB
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"", 400, "empty (0 bytes)"),
        (b"this is not an image at all", 400, "not an image"),
        ("truncated", 400, "truncated JPEG"),
        ("bomb", 413, "decoded pixels"),
        (b"\xff\xd8" + b"\x00" * (MAX_BYTES + 1), 413, f"over the limit of {MAX_BYTES} bytes"),
    ],
    ids=["zero-bytes", "not-an-image", "truncated", "pixel-bomb", "too-many-bytes"],
)
def test_bad_uploads_get_their_status_and_reason(served, data, payload, status, message):
    client, _, _ = served
    if payload == "truncated":
        whole = (data["jpg"] / "coffee_query.jpg").read_bytes()
        payload = whole[: len(whole) // 2]
    elif payload == "bomb":
        payload = _bomb_png()
    r = _upload(client, payload)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    # and the server keeps serving
    assert client.get("/api/search", params={"id": "chelsea_easy0", "k": 1}).json()["results"][0]["id"] == "chelsea_easy0"


def test_bad_requests(served, data):
    client, _, _ = served
    photo = (data["jpg"] / "coffee_query.jpg").read_bytes()
    cases = [
        (client.get("/api/search", params={"id": "coffee_easy0", "k": 0}), 400, "k must be between 1 and 1000"),
        (client.get("/api/search", params={"id": "coffee_easy0", "k": 5000}), 400, "k must be between 1 and 1000"),
        (client.get("/api/search"), 400, "exactly one of id"),
        (client.get("/api/search", params={"id": "nope"}), 404, "no image 'nope' in the index"),
        (client.get("/api/search", params={"id": "coffee_easy0", "box": "1,2,3"}), 400, "four finite numbers"),
        (client.get("/api/search", params={"id": "coffee_easy0", "box": "50,50,10,10"}), 400, "is empty"),
        (client.get("/api/search", params={"id": "coffee_easy0", "box": "500,500,900,900"}), 400, "empty inside"),
        (client.get("/api/search", params={"upload": "0" * 32}), 404, "not in the cache"),
        (_upload(client, photo, k="many"), 400, "k must be an integer"),
        (client.post("/api/search", content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"}),
         400, "multipart/form-data"),
        (client.post("/api/search", files={"other": ("a.txt", b"x", "text/plain")}), 400, "field 'image'"),
        (client.get("/api/thumbs/coffee_easy0", params={"size": 999}), 400, "thumbnail size must be one of"),
        (client.get("/api/nothing/here"), 404, "no API route"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"], response.text
    raw = client.post("/api/search?k=3", content=photo, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and len(raw.json()["results"]) == 3


def test_paths_outside_the_image_root_are_404(served, data):
    client, _, _ = served
    secret = data["bench"] / "gnd_tiny.pkl"  # a file just above the image root
    assert secret.is_file()
    for url in ("/api/images/..%2Fgnd_tiny.pkl", "/api/images/../gnd_tiny.pkl", "/api/images/%2Fetc%2Fpasswd",
                "/api/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/thumbs/..%2Fgnd_tiny", "/api/images/coffee_easy0%00",
                "/api/images/not_in_the_index", "/api/uploads/..%2F..%2Fgnd_tiny.pkl", "/api/uploads/abc/thumb",
                "/static/..%2F..%2Fservice.py"):
        r = client.get(url)
        assert r.status_code == 404, url
    ok = client.get("/api/images/coffee_easy0")
    assert ok.status_code == 200 and ok.content == (data["jpg"] / "coffee_easy0.jpg").read_bytes()


def test_image_root_never_leaves_the_root_through_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"secret")
    (root / "sub").mkdir()
    (root / "sub" / "inside.jpg").write_bytes(b"inside")
    os.symlink(outside / "secret.jpg", root / "evil.jpg")
    os.symlink(outside, root / "linked", target_is_directory=True)
    os.symlink(root / "sub" / "inside.jpg", root / "alias.jpg")
    images = ImageRoot(root, ["evil", "linked/secret", "sub/inside", "alias", "../outside/secret"])
    assert images.path("evil") is None
    assert images.path("linked/secret") is None
    assert images.path("../outside/secret") is None
    assert images.path("sub/inside") == (root / "sub" / "inside.jpg").resolve()
    assert images.path("alias") == (root / "sub" / "inside.jpg").resolve()  # a link that stays inside
    assert images.path("not-listed") is None


# --------------------------------------------------------------------------- thumbnails and writes


def test_thumbnails_are_cached_with_cache_headers(served, data):
    from PIL import Image

    client, state, cache = served
    r = client.get("/api/thumbs/astronaut_easy0", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"]
    thumb = Image.open(io.BytesIO(r.content))
    original = Image.open(data["jpg"] / "astronaut_easy0.jpg")
    assert max(thumb.size) == min(128, max(original.size))
    cached = list((cache / "thumbs" / "128").rglob("*.jpg"))
    assert cached and any(p.read_bytes() == r.content for p in cached)
    assert client.get("/api/thumbs/astronaut_easy0", params={"size": 128}).content == r.content


def test_requests_write_only_under_the_cache_directory(served, data):
    client, _, cache = served
    before = _snapshot(data["index"], data["bench"], data["db"])
    _upload(client, (data["jpg"] / "rocket_query.jpg").read_bytes(), k=3)
    client.get("/api/thumbs/rocket_easy0", params={"size": 512})
    client.get("/api/benchmark/rocket_query/thumb", params={"size": 512})
    client.get("/api/benchmark")
    assert _snapshot(data["index"], data["bench"], data["db"]) == before
    assert list((cache / "uploads").glob("*.img"))


# --------------------------------------------------------------------------- start-up checks


def test_a_model_that_does_not_match_the_index_is_refused(data, tmp_path):
    with pytest.raises(InputError, match="does not match .* extracted with 'gem_efficientnet_lite0'"):
        SearchService.open(data["index"], model_name="gem_efficientnet_lite1", cache_dir=tmp_path)


def test_other_weights_for_the_same_model_are_refused(data, tmp_path):
    import torch
    from safetensors.torch import save_file

    import cfcd.models

    model = cfcd.models.create("gem_efficientnet_lite0")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.dtype == torch.float32 and v.numel() > 1)
    state[first] = state[first] + 0.01
    weights = tmp_path / "other.safetensors"
    save_file(state, str(weights))
    with pytest.raises(InputError, match="does not match .*state_sha256"):
        SearchService.open(data["index"], model_name="gem_efficientnet_lite0", weights=str(weights), cache_dir=tmp_path)


def test_cfcd_serve_refuses_to_start_with_a_clear_message(data, tmp_path, capsys):
    code = cfcd_main(["serve", str(data["index"]), "--model", "gem_efficientnet_lite1", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "does not match the index" in capsys.readouterr().err


# --------------------------------------------------------------------------- compare


def test_compare_sorts_two_models_by_ap_difference(data, tmp_path):
    """The served index is the model, --compare its baseline (same database, other scales): per-query
    APs of both and diff = model - baseline."""
    import cfcd.models
    from cfcd.data.gnd import load_gnd
    from cfcd.data.lists import gnd_image_list
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.index import build_index

    gnd = load_gnd(data["gnd"])
    options = ExtractOptions(scales=parse_scales("0.5 0.7071"), workers=0, progress=False)
    other_db = tmp_path / "db2.store"
    extract_to_store(cfcd.models.create("gem_efficientnet_lite0"), gnd_image_list(gnd, root=data["bench"]), other_db,
                     options, log=lambda m: None)
    other = build_index(other_db, "flat", out=tmp_path / "index2")
    config = ServeConfig(index=data["index"], gnd=data["gnd"], queries=data["queries"], compare=tmp_path / "index2",
                         cache_dir=tmp_path / "cache")
    state = load_state(config)
    with TestClient(create_app(config, state=state), base_url="http://127.0.0.1") as client:
        cmp = client.get("/api/compare").json()
        model = client.get("/api/benchmark").json()
        baseline = client.get("/api/benchmark", params={"side": "b"}).json()
        assert cmp["model"]["metrics"] == model["metrics"] and cmp["baseline"]["metrics"] == baseline["metrics"]
        assert cmp["model"]["name"] == "index" and cmp["baseline"]["name"] == "index2" and len(other) == 23
        assert cmp["diff"] == "model - baseline"
        changed = 0
        for row in cmp["queries"]:
            for s in ("easy", "medium", "hard"):
                ap_model = model["per_query"][row["id"]][s]["AP"]
                ap_baseline = baseline["per_query"][row["id"]][s]["AP"]
                assert row["AP"]["model"][s] == ap_model and row["AP"]["baseline"][s] == ap_baseline
                assert row["diff"][s] == pytest.approx(ap_model - ap_baseline)
                changed += abs(row["diff"][s]) > 1e-9
        assert changed  # the two indexes differ somewhere, so the sign of diff is checked
        detail_b = client.get("/api/benchmark/rocket_query", params={"side": "b", "setup": "hard"}).json()
        assert detail_b["AP"]["hard"] == baseline["per_query"]["rocket_query"]["hard"]["AP"]
        assert client.get("/api/search", params={"id": "rocket_easy0", "side": "b", "k": 1}).json()["results"][0]["id"] == "rocket_easy0"


def test_the_extractor_scopes_cudnn_benchmark_to_its_forward():
    """Extractor no longer sets cudnn.benchmark for the whole process (concurrent users share it)."""
    import torch

    import cfcd.models
    from cfcd.extract import ExtractOptions, Extractor
    from cfcd.extract.engine import _cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        Extractor(cfcd.models.create("gem_efficientnet_lite0"), ExtractOptions(workers=0, cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark is False
        with _cudnn_benchmark(True):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError), _cudnn_benchmark(True):
            raise RuntimeError("a failing forward still restores the flag")
        assert torch.backends.cudnn.benchmark is False
        with _cudnn_benchmark(None):  # CPU extractors leave it alone
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_multipart_bytes_arrive_unchanged():
    """Binary uploads with CR/LF runs and boundary-like lines survive the multipart parser byte for byte."""
    import httpx

    from cfcd.serve.app import _parse_multipart

    rng = np.random.default_rng(0)
    for _ in range(5):
        data = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes() + b"\r\n\r\n--boundary\n\r\r\n\x00"
        request = httpx.Request("POST", "http://127.0.0.1/", files={"image": ("a.jpg", data, "image/jpeg")},
                                data={"k": "5", "box": "1,2,3,4"})
        message = _parse_multipart(request.headers["content-type"], request.read())
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                 for p in message.iter_parts()}
        assert parts == {"image": data, "k": b"5", "box": b"1,2,3,4"}


def test_too_many_waiting_searches_get_503(served, data):
    client, state, _ = served
    limits = state.service.limits
    saved = limits.max_waiting
    try:
        limits.max_waiting = 0  # no room in the queue: every search that needs the model is refused
        r = _upload(client, (data["jpg"] / "coffee_query.jpg").read_bytes())
        assert r.status_code == 503 and "server busy" in r.json()["detail"]
        # a collection image searched whole uses its indexed descriptor: no model, no queue
        assert client.get("/api/search", params={"id": "coffee_easy0", "k": 1}).status_code == 200
    finally:
        limits.max_waiting = saved
    assert _upload(client, (data["jpg"] / "coffee_query.jpg").read_bytes()).status_code == 200


def test_a_whitened_index_serves_its_benchmark_with_queries_whitened_the_same_way(data, tmp_path):
    """The benchmark view of a whitened index whitens the queries it describes with --whiten and
    gives the numbers of `cfcd evaluate` on the whitened stores."""
    from cfcd.postprocess import learn_pca_whitening, load_whitening, whiten_store
    from cfcd.store import load_descriptors

    db = load_descriptors(data["db"], role="database")
    saved = learn_pca_whitening(np.asarray(db.descriptors), whitenp=0.5, dim=8).save(tmp_path / "pca8")
    whitening = load_whitening(saved)  # as `cfcd whiten --apply` reads it: the file's hash is in the meta
    whiten_store(data["db"], tmp_path / "db8", whitening)
    whiten_store(data["queries"], tmp_path / "q8", whitening)
    assert cfcd_main(["index", "build", str(tmp_path / "db8"), "--out", str(tmp_path / "index8"), "--type", "flat"]) == 0
    report = tmp_path / "report.json"
    assert cfcd_main(["evaluate", "--gnd", str(data["gnd"]), "-q", str(tmp_path / "q8"), "-x", str(tmp_path / "db8"),
                      "--json", str(report)]) == 0
    expected = json.loads(report.read_text())
    config = ServeConfig(index=tmp_path / "index8", gnd=data["gnd"], whiten=str(saved),
                         cache_dir=tmp_path / "cache")
    state = load_state(config)
    with TestClient(create_app(config, state=state), base_url="http://127.0.0.1") as client:
        body = client.get("/api/benchmark").json()
    for setup in ("easy", "medium", "hard"):
        assert body["metrics"][setup]["mAP"] == pytest.approx(expected[setup]["mAP"], abs=1e-6)
