"""`cfcd serve` under hostile and heavy use (issue 21): big photos are described at a bounded size,
foreign hosts and origins are refused, an overloaded server refuses uploads before reading them,
the cache stays within its budget and keeps no refused upload, a vanished file is a JSON 404."""

from __future__ import annotations

import asyncio
import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import built  # noqa: E402
from cfcd.serve.app import ServeConfig, create_app, load_state  # noqa: E402
from cfcd.serve.service import Limits  # noqa: E402

QUERY_SIZE = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The test index with its images copied (so a test may delete one) and a 64 px query cap."""
    data = built(tmp_path_factory)
    root = tmp_path_factory.mktemp("images")
    for path in data["jpg"].glob("*.jpg"):
        shutil.copy(path, root / path.name)
    cache = tmp_path_factory.mktemp("hostile-cache")
    config = ServeConfig(index=data["index"], images=root, cache_dir=cache, allow_hosts=("photos.lan",),
                         limits=Limits(max_query_size=QUERY_SIZE, max_upload_pixels=4_000_000))
    state = load_state(config)
    app = create_app(config, state=state)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, state, app, root, cache


def _jpeg(size=(400, 300), fmt="JPEG") -> bytes:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _upload(client, payload: bytes, headers=None, **fields):
    return client.post("/api/search", files={"image": ("p.jpg", payload, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()}, headers=headers or {})


def _files(cache, sub: str) -> list:
    return [p for p in (cache / sub).rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- bounded size


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_photo_is_described_at_the_query_size(served, tmp_path, fmt):
    from PIL import Image

    client, state, _, _, _ = served
    service = state.service
    payload = _jpeg((400, 300), fmt)
    r = _upload(client, payload, k=23)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["downscaled"] == {"from": [400, 300], "to": [64, 48]}
    assert body["descriptor"]["max_query_size"] == QUERY_SIZE
    # the model saw the downscaled image: the scores are those of describing it
    path = tmp_path / "photo"
    path.write_bytes(payload)
    array, info = service.decode_query(path, upload=True)
    assert array.shape == (48, 64, 3) and info == body["query"]["downscaled"]
    expected = service.index.search(service.describe_array(array), 23)
    assert [h["id"] for h in body["results"]] == [service.index.ids[j] for j in expected.indices[0]]
    np.testing.assert_allclose([h["score"] for h in body["results"]], expected.scores[0], atol=1e-5)
    # and that image is the photo resized (Lanczos from the full decode), up to the JPEG draft's rounding
    full = Image.open(io.BytesIO(payload)).convert("RGB").resize((64, 48), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(full, dtype=np.float32) - array.astype(np.float32)).mean()
    assert diff < 6.0, diff
    # a box (original pixels) is cropped at the reduced size and gets the factor of the whole photo
    boxed = _upload(client, payload, k=3, box="100,50,300,250").json()
    assert boxed["query"]["box"] == [100, 50, 300, 250]
    crop, _ = service.decode_query(path, (100, 50, 300, 250), upload=True)
    assert max(crop.shape[:2]) == 32  # 200 px of 400, at 64/400


def test_a_photo_within_the_query_size_is_read_as_cfcd_extract_reads_it(served, tmp_path):
    from cfcd.data.images import load_image

    client, state, _, _, _ = served
    payload = _jpeg((64, 40))
    body = _upload(client, payload, k=3).json()
    assert body["query"]["downscaled"] is None
    path = tmp_path / "small.jpg"
    path.write_bytes(payload)
    array, info = state.service.decode_query(path, upload=True)
    assert info is None
    np.testing.assert_array_equal(array, load_image(path, **state.service.extractor.load_kwargs()))


# --------------------------------------------------------------------------- hosts and origins


def test_foreign_hosts_and_cross_site_uploads_are_refused(served):
    client, _, _, _, _ = served
    payload = _jpeg((64, 48))
    r = client.get("/api/health", headers={"Host": "attacker.example"})
    assert r.status_code == 421 and "attacker.example" in r.json()["detail"]
    r = client.get("/", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 421
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "photos.lan:8000"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    r = _upload(client, payload, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert _upload(client, payload, headers={"Origin": "null"}).status_code == 403
    assert _upload(client, payload, headers={"Origin": "http://127.0.0.1:9999"}).status_code == 403  # other port
    # the page's own origin, and scripts that send no Origin, are served
    assert _upload(client, payload, headers={"Origin": "http://127.0.0.1"}).status_code == 200
    assert _upload(client, payload, headers={"Host": "localhost:8000", "Origin": "http://localhost:8000"}).status_code == 200
    assert _upload(client, payload).status_code == 200
    # reading is not state-changing: a foreign Origin on a GET is answered (the browser guards the reply)
    assert client.get("/api/health", headers={"Origin": "http://evil.example"}).status_code == 200


# --------------------------------------------------------------------------- overload


def test_an_overloaded_server_refuses_an_upload_before_reading_it(served):
    client, state, app, _, _ = served
    limits = state.service.limits
    saved = limits.max_waiting
    read = []
    sent = []

    async def receive():
        read.append(True)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/search", "raw_path": b"/api/search", "root_path": "",
             "query_string": b"", "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "app": app, "state": {},
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"multipart/form-data; boundary=x"),
                         (b"content-length", b"1000")]}
    try:
        limits.max_waiting = 0
        asyncio.run(app(scope, receive, send))
        r = _upload(client, _jpeg((64, 48)))
    finally:
        limits.max_waiting = saved
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 503 and not read  # answered without reading the body
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "server busy" in r.json()["detail"]
    assert state.service._waiting == 0  # every slot was given back
    assert _upload(client, _jpeg((64, 48))).status_code == 200


# --------------------------------------------------------------------------- the cache


def test_refused_uploads_are_never_kept(served):
    client, _, _, _, cache = served
    before = _files(cache, "uploads")
    whole = _jpeg((300, 200))
    for payload in (b"not an image", whole[: len(whole) // 2], b""):
        assert _upload(client, payload).status_code in (400, 413)
    assert _files(cache, "uploads") == before


def test_the_cache_stays_within_its_budget(served):
    client, state, _, _, cache = served
    budget = state.service.budget
    saved = budget.max_bytes
    try:
        budget.max_bytes = 40_000
        for i in range(30):  # distinct boxes: a new thumbnail each
            key = _upload(client, _jpeg((200 + i, 150))).json()["query"]["upload"]
            r = client.get(f"/api/uploads/{key}/thumb", params={"size": 256, "box": f"{i},0,{100 + i},100"})
            assert r.status_code == 200
            total = sum(p.stat().st_size for sub in ("uploads", "thumbs") for p in _files(cache, sub))
            assert total <= budget.max_bytes, (i, total)
        # the most recent upload is still there; the oldest ones went
        assert len(_files(cache, "uploads")) < 30
    finally:
        budget.max_bytes = saved


def test_a_vanished_image_file_is_a_json_404(served):
    client, _, _, root, _ = served
    assert client.get("/api/images/moon").status_code == 200
    assert client.get("/api/thumbs/moon", params={"size": 128}).status_code == 200
    (root / "moon.jpg").unlink()
    for path in ("/api/images/moon", "/api/thumbs/moon?size=128"):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", path
        assert "moon" in r.json()["detail"]


def test_the_api_schema_is_served_and_no_cdn_docs_page(served):
    client, _, _, _, _ = served
    assert client.get("/api/openapi.json").json()["info"]["title"] == "cfcd serve"
    assert client.get("/api/docs").status_code == 404
