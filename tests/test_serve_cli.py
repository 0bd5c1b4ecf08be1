"""`cfcd serve` as a process: --port 0 says the port it got; a port in use is said before the model loads."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serve_helpers import built  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _serve(index, cache, *extra):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "cfcd", "serve", str(index), "--cache-dir", str(cache),
                             "--device", "cpu", *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)


def test_port_0_prints_the_port_it_got(tmp_path_factory, tmp_path):
    data = built(tmp_path_factory)
    proc = _serve(data["index"], tmp_path / "cache", "--port", "0")
    try:
        lines = []
        for line in proc.stderr:  # ends when the process does: no wait without a bound
            lines.append(line)
            if line.startswith("open http://"):
                break
        match = re.search(r"open http://127\.0\.0\.1:(\d+)/", "".join(lines))
        assert match, "".join(lines)
        port = int(match.group(1))
        assert port != 0
        r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=60)
        assert r.status_code == 200 and r.json()["count"] == 23
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_port_in_use_is_said_before_the_model_loads(tmp_path_factory, tmp_path):
    data = built(tmp_path_factory)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _serve(data["index"], tmp_path / "cache", "--port", str(port))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert f"port {port} is in use: pick another with --port" in err
    assert "loading the index" not in err and "Traceback" not in err  # refused before the model loads
