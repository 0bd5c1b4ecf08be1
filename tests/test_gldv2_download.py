"""cfcd data download|verify gldv2_*: a miniature mirror in the official layout on 127.0.0.1, a real
SIGKILL mid-run, a corrupt transfer, a subset of the tars, the size check, offline retries."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _download_helpers import FileServer, gldv2_mirror
from cfcd.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _images(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_train_parts_killed_and_corrupt_then_rerun_exact(tmp_path, capsys):
    mirror = gldv2_mirror(train_tars=11)
    root = tmp_path / "data"
    ds = root / "gldv2_train"
    with FileServer(mirror.files) as server:
        server.files["/train/images_002.tar"].corrupt = [True]  # first transfer: same length, one byte flipped
        held = server.files["/train/images_005.tar"]
        held.hold = threading.Event()  # half of tar 5 is sent, then the process is killed
        command = [sys.executable, "-m", "cfcd", "data", "download", "gldv2_train", "--root", str(root),
                   "--parts", "0-9", "--base-url", server.url + "/", "--workers", "2", "--backoff", "0",
                   "--no-progress"]
        env = {**os.environ, "PYTHONPATH": SRC}
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            while not held.requested.wait(0.05):  # until tar 5 is half sent (or the run ended: a failure)
                assert first.poll() is None, first.communicate()[0]
        finally:
            first.kill()  # SIGKILL: no handler, no cleanup
            printed_first = first.communicate()[0]
            held.hold.set()
        assert first.returncode == -9
        record = json.loads((ds / ".cfcd-download.json").read_text())["files"]
        assert "train/images_005.tar" not in record and len(record) < 3 + 10  # killed mid-run
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        gets = server.paths_requested()
    printed = printed_first + second.stdout
    assert "md5" in printed and "differs from the published" in printed and "fetching it again" in printed
    assert gets.count("/train/images_002.tar") == 2 and "/train/images_010.tar" not in gets
    assert "to download (HEAD Content-Length)" in second.stdout and "free in" in second.stdout

    expected = {m: data for key, members in mirror.tars.items()
                if key.startswith("train/") and int(key[-7:-4]) < 10 for m, data in members.items()}
    assert _images(ds / "train") == expected  # exactly the images of tars 0-9, byte for byte
    assert sorted(p.name for p in ds.iterdir() if not p.name.startswith(".")) == [
        "train", "train.csv", "train_clean.csv", "train_label_to_category.csv"]
    assert not (ds / ".downloads").exists() and not list(ds.glob(".train.extract-*"))

    capsys.readouterr()
    assert main(["data", "verify", str(root), "--dataset", "gldv2_train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "train_tars_extracted: 10" in out and "3 of the 33 images in train.csv" in out

    (ds / "train" / next(iter(expected))).write_bytes(b"not a jpeg")  # verify notices a changed image
    assert main(["data", "verify", str(root), "--dataset", "gldv2_train", "--no-progress"]) == 1


def test_size_check_refuses_unless_forced_and_retrieval_parts(tmp_path, capsys, monkeypatch):
    mirror = gldv2_mirror()
    root = tmp_path / "data"
    args = ["data", "download", "gldv2_retrieval", "--root", str(root), "--parts", "index:0-1", "--parts", "test:0",
            "--no-progress", "--backoff", "0"]
    # free: every tar fits, but not the tars and their extracted images together
    free = sum(len(mirror.files[f"/{key}"]) for key in mirror.tars if not key.startswith("train/"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    with FileServer(mirror.files) as server:
        assert main([*args, "--base-url", server.url]) == 2
        out = capsys.readouterr()
        assert f"are needed and {free / 1024:.1f} KiB are free" in out.err and "--force" in out.err
        assert not (root / "gldv2_retrieval" / "index").exists()
        assert main([*args, "--base-url", server.url, "--force"]) == 0
    ds = root / "gldv2_retrieval"
    for split in ("index", "test"):
        expected = {m: d for k, members in mirror.tars.items() if k.startswith(split + "/") for m, d in members.items()}
        assert _images(ds / split) == expected
    monkeypatch.undo()
    assert main(["data", "verify", str(root), "--dataset", "gldv2_retrieval", "--no-progress"]) == 0
    assert "queries: 7" in capsys.readouterr().out


def test_offline_retries_say_why(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["data", "download", "roxford5k", "--root", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}",
                 "--retries", "2", "--backoff", "0", "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    retries = [line for line in out.out.splitlines() if "retry" in line]
    assert len(retries) == 2 and all("connection refused" in line for line in retries)
    assert "retry 1/2" in retries[0] and "retry 2/2" in retries[1]
    assert "connection refused" in out.err
    with pytest.raises(SystemExit):
        main(["data", "download", "roxford5k", "--root", str(tmp_path), "--workers", "x"])
    assert main(["data", "download", "roxford5k", "--root", str(tmp_path), "--parts", "0"]) == 2
    assert "--parts selects tar parts of GLDv2" in capsys.readouterr().err
