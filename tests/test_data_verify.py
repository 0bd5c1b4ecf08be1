"""cfcd data download|verify|layout end to end, against a local mirror of the official layout.

The mirror serves generated data with the real structure: roxford5k and rparis6k with the
published numbers of images (4993 + 70, 6322 + 70) in nested tarballs, a gnd pickle each,
and the 100 R1M tarballs with a list that disagrees with them (as the official one does).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from _download_helpers import FileServer, gnd_bytes, jpeg_bytes, tar_bytes
from cfcd.cli import main
from cfcd.data.datasets import (
    DATASETS,
    check_image,
    download_dataset,
    get_dataset,
    load_manifest,
    resolve_url,
    verify_dataset,
)
from cfcd.data.download import ArchiveError, DownloadError, clash_name
from cfcd.errors import CfcdError, InputError

NO_GND_SHA = {"gnd_roxford5k.pkl": {"size": None, "sha256": None}, "gnd_rparis6k.pkl": {"size": None, "sha256": None}}
FAST = dict(backoff=0, progress=False, timeout=10)


def server_path(url: str) -> str:
    return urlsplit(url).path


@pytest.fixture(scope="module")
def content() -> dict:
    """Mirror content (server path -> bytes), built once."""
    pool = [jpeg_bytes(seed, size=(16, 12)) for seed in range(8)]
    files: dict[str, bytes] = {}
    info: dict = {}

    ox_db = [f"oxford_{i:06d}" for i in range(4993)]
    ox_q = [f"oxq_{i:03d}" for i in range(70)]
    members = {f"oxbuild/{'abc'[k % 3]}/{name}.jpg": pool[k % 8] for k, name in enumerate(ox_q + ox_db)}
    members["oxbuild/a/clash.jpg"] = pool[0]
    members["oxbuild/b/clash.jpg"] = pool[1]      # same name, other content -> renamed
    members["oxbuild/c/broken_000001.jpg"] = b"this is not a jpeg"  # unreadable, not in the gnd
    ox = DATASETS["roxford5k"]
    files[server_path(ox.archives[0].url)] = tar_bytes(members)
    files[server_path(ox.files[0].url)] = gnd_bytes(ox_db, ox_q)
    info["roxford5k"] = {"db": ox_db, "q": ox_q, "n_files": 5063 + 3}

    pa_db = [f"paris_{i:06d}" for i in range(6322)]
    pa_q = [f"parisq_{i:03d}" for i in range(70)]
    names = pa_q + pa_db
    pa = DATASETS["rparis6k"]
    half = len(names) // 2
    files[server_path(pa.archives[0].url)] = tar_bytes(
        {f"paris/defense/{n}.jpg": pool[k % 8] for k, n in enumerate(names[:half])})
    files[server_path(pa.archives[1].url)] = tar_bytes(
        {f"paris/louvre/{n}.jpg": pool[k % 8] for k, n in enumerate(names[half:])})
    files[server_path(pa.files[0].url)] = gnd_bytes(pa_db, pa_q)
    info["rparis6k"] = {"n_files": len(names)}

    r1m = DATASETS["revisitop1m"]
    listed = []
    for i, archive in enumerate(r1m.archives, 1):
        paths = [f"{i:03d}/r1m_{i:03d}_{j}.jpg" for j in range(3)]
        files[server_path(archive.url)] = tar_bytes({p: pool[(i + j) % 8] for j, p in enumerate(paths)})
        listed += paths
    listed.remove("100/r1m_100_2.jpg")       # in a tarball, not in the list
    listed.append("ghost/r1m_ghost.jpg")     # in the list, in no tarball
    files[server_path(r1m.files[0].url)] = ("\n".join(listed) + "\n").encode()
    info["revisitop1m"] = {"listed": len(listed), "found": 300}
    return {"files": files, "info": info}


@pytest.fixture
def mirror(content):
    with FileServer(dict(content["files"])) as server:
        yield server


@pytest.fixture
def manifest_file(tmp_path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(NO_GND_SHA))
    return path


def cli(*args) -> int:
    return main(["data", *map(str, args)])


def test_official_sources():
    ox, pa, r1m = DATASETS["roxford5k"], DATASETS["rparis6k"], DATASETS["revisitop1m"]
    assert [a.url for a in ox.archives] == ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"]
    assert [a.url for a in pa.archives] == [
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
    ]
    assert ox.files[0].url == "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"
    assert pa.files[0].url == "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl"
    assert [a.filename for a in r1m.archives] == [f"revisitop1m.{i}.tar.gz" for i in range(1, 101)]
    assert r1m.archives[0].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.1.tar.gz"
    assert r1m.files[0].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
    # The built-in gnd checksums agree with the ones the evaluation code trusts.
    from cfcd.data.gnd import KNOWN_GND

    for name in ("roxford5k", "rparis6k"):
        assert DATASETS[name].files[0].sha256 == KNOWN_GND[name]["sha256"]
    with pytest.raises(InputError, match="unknown dataset"):
        get_dataset("oxford105k")


def test_mirror_url(monkeypatch):
    url = DATASETS["roxford5k"].archives[0].url
    monkeypatch.delenv("CFCD_DATA_MIRROR", raising=False)
    assert resolve_url(url) == url
    assert resolve_url(url, "http://m.org/base/") == "http://m.org/base/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
    monkeypatch.setenv("CFCD_DATA_MIRROR", "http://env.mirror")
    assert resolve_url(url) == "http://env.mirror/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"


def test_download_then_verify_end_to_end(tmp_path, mirror, manifest_file, content, capsys):
    root = tmp_path / "data"
    rc = cli("download", "roxford5k", "rparis6k", "--root", root, "--base-url", mirror.url,
             "--manifest", manifest_file, "--backoff", 0, "--no-progress")
    assert rc == 0
    ox = root / "roxford5k"
    jpg = ox / "jpg"
    listing = sorted(p.name for p in jpg.iterdir())
    assert len(listing) == content["info"]["roxford5k"]["n_files"]
    assert all((jpg / p).is_file() for p in listing)              # flat, like the original
    renamed = clash_name("clash.jpg", "oxbuild_images-v1.tgz", "oxbuild/b/clash.jpg")
    assert "clash.jpg" in listing and renamed in listing
    assert (ox / "gnd_roxford5k.pkl").read_bytes() == mirror.files["/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"].data
    assert sorted(p.name for p in ox.iterdir()) == [".cfcd-download.json", ".cfcd-download.lock", ".cfcd-files",
                                                   "gnd_roxford5k.pkl", "jpg"]
    state = json.loads((ox / ".cfcd-download.json").read_text())
    assert state["images_complete"] is True
    record = state["files"]["oxbuild_images-v1.tgz"]
    assert record["extracted"] is True and len(record["sha256"]) == 64 and record["clashes"][0]["path"] == renamed
    assert len(list((root / "rparis6k" / "jpg").iterdir())) == content["info"]["rparis6k"]["n_files"]
    assert "1 name clashes renamed" in capsys.readouterr().out

    # Rerun: everything is complete, nothing is requested.
    n_requests = len(mirror.requests)
    assert cli("download", "roxford5k", "rparis6k", "--root", root, "--base-url", mirror.url,
               "--manifest", manifest_file, "--no-progress") == 0
    assert len(mirror.requests) == n_requests

    report_path = tmp_path / "verify.json"
    assert cli("verify", root, "--json", report_path, "--no-progress") == 0
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    by_name = {r["dataset"]: r for r in report["datasets"]}
    assert set(by_name) == {"roxford5k", "rparis6k"}
    rox = by_name["roxford5k"]
    assert rox["counts"]["queries"] == 70 and rox["counts"]["database"] == 4993 and rox["counts"]["missing"] == 0
    assert [u["path"] for u in rox["unreadable"]] == ["broken_000001.jpg"]   # reported, not fatal
    assert rox["counts"]["not_in_gnd"] == 3

    # Damage: one gnd image deleted, one query image overwritten with garbage.
    db, q = content["info"]["roxford5k"]["db"], content["info"]["roxford5k"]["q"]
    (jpg / f"{db[10]}.jpg").unlink()
    (jpg / f"{q[3]}.jpg").write_bytes(b"garbage" * 3)
    assert cli("verify", ox, "--json", report_path, "--no-progress") == 1   # DIR = the dataset dir
    out = capsys.readouterr().out
    assert "FAILED" in out and f"{db[10]}.jpg" in out
    report = json.loads(report_path.read_text())["datasets"]
    assert [r["dataset"] for r in report] == ["roxford5k"]
    rox = report[0]
    assert rox["ok"] is False and rox["missing"] == [f"{db[10]}.jpg"]
    assert {u["path"] for u in rox["unreadable"]} == {"broken_000001.jpg", f"{q[3]}.jpg"}
    assert [c["path"] for c in rox["changed"]] == [f"{q[3]}.jpg"]

    assert cli("layout", "--root", root) == 0
    out = capsys.readouterr().out
    assert f"{jpg}/  [present, {len(listing) - 1} files]" in out
    assert "revisitop1m.txt  [missing]" in out


def test_gnd_checksum_is_enforced(tmp_path, mirror, capsys):
    # The generated gnd is not the published file: without a manifest override it is refused.
    rc = cli("download", "roxford5k", "--root", tmp_path, "--base-url", mirror.url, "--backoff", 0, "--no-progress")
    assert rc == 2
    err = capsys.readouterr().err
    assert "gnd_roxford5k.pkl" in err and "149871 are expected" in err and "Traceback" not in err
    size_unknown = tmp_path / "m.json"
    size_unknown.write_text('{"gnd_roxford5k.pkl": {"size": null}}')   # the sha256 still applies
    rc = cli("download", "roxford5k", "--root", tmp_path, "--base-url", mirror.url, "--manifest", size_unknown,
             "--no-progress")
    assert rc == 2
    err = capsys.readouterr().err
    assert "gnd_roxford5k.pkl" in err and "sha256" in err and "--manifest" in err
    assert not (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").exists()
    assert not (tmp_path / "roxford5k" / "jpg").exists()


def test_corrupt_archive_keeps_finished_archives(tmp_path, mirror, content):
    pa = DATASETS["rparis6k"]
    second = server_path(pa.archives[1].url)
    good = mirror.files[second].data
    mirror.set(second, good[: len(good) // 3])      # truncated on the server
    with pytest.raises(ArchiveError, match="paris_2-v1.tgz") as info:
        download_dataset("rparis6k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
    assert "rerun" in str(info.value)
    ds = tmp_path / "rparis6k"
    assert not (ds / "jpg").exists()
    assert len(list((ds / ".jpg.partial").iterdir())) == 3196     # paris_1 stays extracted
    assert (ds / ".downloads" / "paris_2-v1.tgz.corrupt").exists()
    state = json.loads((ds / ".cfcd-download.json").read_text())
    assert state["files"]["paris_1-v1.tgz"]["extracted"] is True and "paris_2-v1.tgz" not in state["files"]

    mirror.set(second, good)
    mirror.requests.clear()
    summary = download_dataset("rparis6k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
    assert mirror.paths_requested() == [second]                    # only the broken archive again
    assert summary.downloaded == ["paris_2-v1.tgz"]
    assert len(list((ds / "jpg").iterdir())) == content["info"]["rparis6k"]["n_files"]
    assert not (ds / ".jpg.partial").exists()
    report = verify_dataset("rparis6k", tmp_path, workers=2)
    assert report.ok, report.summary()
    assert report.counts["missing"] == 0 and report.counts["unreadable"] == 0


def test_r1m_resumes_at_the_interrupted_tarball(tmp_path, mirror, content):
    r1m = DATASETS["revisitop1m"]
    fifth, sixth = server_path(r1m.archives[4].url), server_path(r1m.archives[5].url)
    mirror.files[fifth].statuses = [404]
    with pytest.raises(DownloadError, match="404"):
        download_dataset("revisitop1m", tmp_path, base_url=mirror.url, **FAST)
    ds = tmp_path / "revisitop1m"
    assert (ds / "revisitop1m.txt").exists()            # the list does not wait for the images
    assert not (ds / "jpg").exists()
    state = json.loads((ds / ".cfcd-download.json").read_text())
    assert [f for f, r in state["files"].items() if r.get("extracted")] == [
        f"revisitop1m.{i}.tar.gz" for i in range(1, 5)]

    mirror.requests.clear()
    mirror.files[sixth].drop_after = [200]              # and a dropped connection in the rerun
    download_dataset("revisitop1m", tmp_path, base_url=mirror.url, retries=1, **FAST)
    requested = mirror.paths_requested()
    assert requested[0] == fifth and not any(p.endswith((".1.tar.gz", ".2.tar.gz", ".4.tar.gz")) for p in requested)
    assert [r for p, r, _ in mirror.requests if p == sixth] == [None, "bytes=200-"]
    assert len(requested) == 97
    assert (ds / "jpg" / "001" / "r1m_001_0.jpg").is_file()   # tree kept as in the tarballs

    report = verify_dataset("revisitop1m", tmp_path, workers=2)
    assert report.ok, report.summary()
    assert report.counts["distractors_listed"] == content["info"]["revisitop1m"]["listed"]
    assert report.counts["distractors_found"] == 300
    assert report.missing == ["ghost/r1m_ghost.jpg"] and report.extra == ["100/r1m_100_2.jpg"]
    assert "ghost/r1m_ghost.jpg" in report.warnings[0]
    assert not verify_dataset("revisitop1m", tmp_path, strict=True, check_images=False).ok


def test_existing_manual_jpg_is_left_alone(tmp_path, mirror):
    jpg = tmp_path / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    (jpg / "mine.jpg").write_bytes(jpeg_bytes(0))
    summary = download_dataset("roxford5k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
    assert mirror.paths_requested() == ["/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"]
    assert "not created by" in summary.notes[0]
    assert sorted(p.name for p in jpg.iterdir()) == ["mine.jpg"]
    report = verify_dataset("roxford5k", tmp_path, check_images=False)
    assert not report.ok and report.counts["missing"] == 5063


def test_verify_without_data(tmp_path, capsys):
    assert cli("verify", tmp_path) == 2                               # nothing to verify: input error
    assert "no dataset directory" in capsys.readouterr().err
    assert cli("verify", tmp_path, "--dataset", "roxford5k", "--no-progress") == 1
    assert "run 'cfcd data download roxford5k" in capsys.readouterr().out
    (tmp_path / "revisitop1m").mkdir()
    report = verify_dataset("revisitop1m", tmp_path)
    assert not report.ok and any("revisitop1m.txt is missing" in e for e in report.errors)


def test_manifest_files(tmp_path, mirror, manifest_file):
    bad = tmp_path / "bad.json"
    for text, match in [("[1]", "JSON object"), ('{"a": {"sha256": "xyz"}}', "64 hex"),
                        ('{"a": {"size": -1}}', "non-negative"), ("{", "not a readable JSON")]:
        bad.write_text(text)
        with pytest.raises(InputError, match=match):
            load_manifest(bad)
    assert load_manifest(manifest_file) == NO_GND_SHA
    # A finished download's record becomes a manifest others can check against.
    assert cli("download", "rparis6k", "--root", tmp_path / "d", "--base-url", mirror.url,
               "--manifest", manifest_file, "--no-progress", "--keep-archives") == 0
    assert (tmp_path / "d" / "rparis6k" / ".downloads" / "paris_1-v1.tgz").exists()
    out = tmp_path / "shared.json"
    assert cli("manifest", "--root", tmp_path / "d", "--out", out) == 0
    shared = load_manifest(out)
    assert set(shared) == {"gnd_rparis6k.pkl", "paris_1-v1.tgz", "paris_2-v1.tgz"}
    mirror.set("/~vgg/data/parisbuildings/paris_1-v1.tgz", b"tampered")
    with pytest.raises(DownloadError, match="8 bytes"):
        download_dataset("rparis6k", tmp_path / "e", base_url=mirror.url, manifest=shared, **FAST)


def test_check_image_decode_catches_truncation(tmp_path):
    good = jpeg_bytes(3, size=(64, 48))
    path = tmp_path / "t.jpg"
    path.write_bytes(good[: len(good) // 2])
    assert check_image(path) is None                      # header and structure look fine
    assert "truncated" in check_image(path, decode=True)
    path.write_bytes(b"")
    assert check_image(path) == "empty file"
    path.write_bytes(good)
    assert check_image(path, decode=True) is None


def test_one_download_per_dataset_dir_and_stale_dirs_cleaned(tmp_path, mirror):
    fcntl = pytest.importorskip("fcntl")

    ds = tmp_path / "roxford5k"
    ds.mkdir()
    stale = ds / "..jpg.partial.extract-abc123"        # left by a killed extraction
    stale.mkdir()
    (stale / "x.jpg").write_bytes(b"x")
    with open(ds / ".cfcd-download.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)   # another download is running
        with pytest.raises(CfcdError, match="another 'cfcd data download'"):
            download_dataset("roxford5k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
        assert mirror.requests == [] and stale.exists()
    download_dataset("roxford5k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
    assert not stale.exists() and (ds / "jpg").is_dir()


def test_verify_hints_at_nested_images(tmp_path, mirror):
    download_dataset("roxford5k", tmp_path, base_url=mirror.url, manifest=NO_GND_SHA, **FAST)
    jpg = tmp_path / "roxford5k" / "jpg"
    (jpg / "sub").mkdir()
    moved = sorted(jpg.glob("oxford_0000*.jpg"))[:3]
    for path in moved:
        path.rename(jpg / "sub" / path.name)
    report = verify_dataset("roxford5k", tmp_path, check_images=False)
    assert not report.ok and report.counts["missing"] == 3
    assert "subdirectories" in report.errors[0]
