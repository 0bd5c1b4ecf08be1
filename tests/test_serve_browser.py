"""The page in a real browser: Debian's chromium driven by Playwright, against a real uvicorn on loopback.

One page load: upload a photo, see the expected first result, open the benchmark view and one
query, and look at it at 1280x800 and in a narrow window. Screenshots are saved under the test's
temporary directory (``search.png``, ``benchmark.png``, ``query.png``, ``narrow.png``).
"""

from __future__ import annotations

import shutil
import socket
import threading

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")

from _serve_helpers import built  # noqa: E402
from cfcd.serve.app import ServeConfig, create_app, load_state  # noqa: E402
from cfcd.serve.service import QueryImage  # noqa: E402


# every image inside the window has arrived and decoded (lazy ones below the fold are not asked for)
VISIBLE_IMAGES_LOADED = """() => [...document.images].filter((i) => {
  const r = i.getBoundingClientRect();
  return r.bottom > 0 && r.top < innerHeight && r.width > 0;
}).every((i) => i.complete && i.naturalWidth > 0)"""


def _settle(page) -> None:
    page.wait_for_load_state("networkidle")
    page.wait_for_function(VISIBLE_IMAGES_LOADED)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no system Chromium (Debian package 'chromium'; `make test` installs it when apt-get is available)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = built(tmp_path_factory)
    config = ServeConfig(index=data["index"], gnd=data["gnd"], queries=data["queries"],
                         cache_dir=tmp_path_factory.mktemp("browser-cache"))
    state = load_state(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn accepts: no start-up race
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(config, state=state), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/", state, data
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


def test_page_search_benchmark_and_query_in_chromium(server, tmp_path):
    base, state, data = server
    executable = _chromium()
    photo = data["jpg"] / "rocket_query.jpg"
    key = state.service.save_upload(photo.read_bytes())
    expected_first = state.service.search(QueryImage(upload=key), 1)["results"][0]["id"]
    worst = min(state.benchmark.summary()["queries"], key=lambda q: (q["AP"]["medium"], q["index"]))["id"]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(base)
            page.wait_for_selector("main[data-ready='1'] #dropzone")
            assert "gem_efficientnet_lite0" in page.inner_text("#status")

            # search by photo: the file input behind "Choose a photo"
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector(".results .grid .card")
            first = page.locator(".results .grid .card").first
            assert first.get_attribute("data-id") == expected_first
            assert "#1" in first.inner_text()
            assert "upload=" in page.url  # the URL holds the query
            _settle(page)
            page.screenshot(path=str(tmp_path / "search.png"))

            # explore from a result: clicking it searches with it
            page.locator(".results .grid .card").nth(1).click()
            page.wait_for_function("location.hash.includes('id=')")
            page.wait_for_selector("main[data-ready='1'] .results .grid .card")

            # the benchmark view, worst query first
            page.click("#tabs a[data-view='benchmark']")
            page.wait_for_selector("#query-table tbody tr")
            assert page.locator("#query-table tbody tr").first.get_attribute("data-query") == worst
            assert "Medium" in page.inner_text("table.metrics")
            _settle(page)
            page.screenshot(path=str(tmp_path / "benchmark.png"), full_page=True)

            page.locator("#query-table tbody tr").first.click()
            page.wait_for_selector(".qdetail .grid .card.cls")
            tags = page.locator(".qdetail .grid .card .tag").all_inner_texts()
            assert {t.lower() for t in tags} >= {"easy", "neg"}  # classes as text, not only colour
            assert page.locator("svg.prplot path.curve").count() == 1
            _settle(page)
            page.screenshot(path=str(tmp_path / "query.png"), full_page=True)

            # a narrow window: one column, nothing wider than the window
            page.set_viewport_size({"width": 390, "height": 800})
            page.evaluate("window.scrollTo(0, 0)")
            _settle(page)
            assert page.evaluate("document.documentElement.scrollWidth") <= 391
            page.screenshot(path=str(tmp_path / "narrow.png"))
            assert not errors, errors
        finally:
            browser.close()
    for name in ("search", "benchmark", "query", "narrow"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
