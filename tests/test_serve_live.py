"""A running `cfcd serve` follows `cfcd index add` / `remove` without a restart (issue 20).

A real uvicorn on 127.0.0.1 (port 0) over an on-disk index, searched by threads all along: an
added image is found, a removed one disappears from results, id search, images and thumbnails,
and no request fails while the generations are swapped.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from _serve_helpers import built  # noqa: E402
from cfcd.cli.serve import bind_socket  # noqa: E402
from cfcd.serve.app import ServeConfig, create_app, load_state  # noqa: E402


def _poll(check, what: str, timeout: float = 20.0):
    """Wait until ``check()`` is truthy (bounded), returning its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


@pytest.fixture()
def live_server(tmp_path_factory, tmp_path):
    import cfcd.index

    data = built(tmp_path_factory)
    index_dir = tmp_path / "live-index"
    cfcd.index.build(data["db"], index_dir, workers=0, tune_queries=0)
    config = ServeConfig(index=index_dir, cache_dir=tmp_path / "cache")
    state = load_state(config)
    state.service.check_seconds = 0.2  # the default (2 s) only makes the test wait longer
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(config, state=state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _poll(lambda: server.started, "the server starts")
    try:
        yield data, index_dir, state, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_the_server_follows_index_add_and_remove(live_server):
    import cfcd.index

    data, index_dir, state, url = live_server
    photo = (data["jpg"] / "coffee_query.jpg").read_bytes()
    stop = threading.Event()
    failures: list[str] = []
    counts = [0]

    def searcher(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                if i % 2:
                    r = client.get("/api/search", params={"id": "chelsea_easy0", "k": 5})
                else:
                    r = client.post("/api/search", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"k": "30"})
                counts[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            first = weakref.ref(state.service.current().index)
            assert client.get("/api/search", params={"id": "rocket_query"}).status_code == 404
            assert client.get("/api/images/rocket_query").status_code == 404
            count = client.get("/api/health").json()["count"]

            # the query photos (not in the index) are added: found by id and in upload results
            cfcd.index.add(index_dir, data["queries"])
            found = _poll(lambda: (r := client.get("/api/search", params={"id": "rocket_query", "k": 5})).status_code == 200
                          and r.json(), "the added image is searchable")
            # (its row is the box crop of the query store, the id search describes the whole photo)
            assert "rocket_query" in [h["id"] for h in found["results"]]
            assert client.get("/api/health").json()["count"] == count + 4
            assert client.get("/api/images/rocket_query").status_code == 200
            assert client.get("/api/thumbs/rocket_query").status_code == 200
            listing = client.get("/api/images", params={"q": "_query"}).json()
            assert listing["total"] == 4

            # a removed image is gone from results, id search, the image and its (cached) thumbnail
            assert client.get("/api/thumbs/coffee_easy0").status_code == 200  # cached before the removal
            cfcd.index.remove(index_dir, ["coffee_easy0"])

            def gone():
                hits = client.post("/api/search", files={"image": ("p.jpg", photo, "image/jpeg")},
                                   data={"k": "50"}).json()["results"]
                return "coffee_easy0" not in [h["id"] for h in hits]

            _poll(gone, "the removed image leaves the results")
            for path in ("/api/images/coffee_easy0", "/api/thumbs/coffee_easy0"):
                r = client.get(path)
                assert r.status_code == 404 and "coffee_easy0" in r.json()["detail"], path
            r = client.get("/api/search", params={"id": "coffee_easy0"})
            assert r.status_code == 404 and "no image 'coffee_easy0' in the index" in r.json()["detail"]
            assert "coffee_easy0" not in client.get("/api/images", params={"q": "coffee", "limit": 500}).json()["ids"]
            assert client.get("/api/health").json()["count"] == count + 3
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert counts[0] >= 4
    # the first generation is released once no request holds it (its memory maps with it)
    _poll(lambda: gc.collect() is not None and first() is None, "the old index is freed")
