"""``cfcd extract`` and ``cfcd benchmark`` end to end on generated data with the real lite0 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _extract_helpers import write_photo_dir, write_revisitop  # noqa: E402

from cfcd.cli import main  # noqa: E402
from cfcd.store import open_store  # noqa: E402

MODEL = ["--model", "gem_efficientnet_lite0"]
FAST = ["--workers", "0", "--no-progress", "--scales", "1 0.7071"]
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_extract_directory_resume_and_errors(tmp_path, capsys):
    images = tmp_path / "photos"
    write_photo_dir(images, count=7, long_side=64)
    (images / "a" / "broken.jpg").write_bytes(b"")
    clean = tmp_path / "clean"
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(clean), *FAST, "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "7 descriptors" in printed and "1 failed" in printed and "a/broken: empty file" in printed
    store = open_store(clean)
    assert len(store.ids) == 7 and store.descriptors.shape[1] == 1280
    meta = store.meta
    assert meta["model"] == "gem_efficientnet_lite0" and meta["extract"]["scales"]["scales"] == [1.0, 0.7071]
    assert meta["preprocess"]["channel_order"] == "RGB" and meta["failures"][0]["id"] == "a/broken"
    assert meta["extract"]["precision"] == "fp32" and meta["extract"]["max_size"].startswith("none")
    assert meta["extract"]["runtime"] == "onnx"  # --runtime auto on a CPU

    # killed after 3 images (in a real subprocess), rerun: the same store as the clean run
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "cfcd", "extract", *MODEL, "--images", str(images), "--out", str(out), *FAST,
           "--batch-size", "2", "--shard-size", "2"]
    first = subprocess.run([*cmd, "--stop-after", "3"], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stderr
    assert not (out / "meta.json").exists() and list((out / ".partial").glob("*/shard-*.npy"))
    assert main(cmd[3:]) == 0  # the rerun, in this process
    assert "resuming" in capsys.readouterr().err
    resumed = open_store(out)
    assert resumed.ids == store.ids
    assert np.abs(np.asarray(resumed.descriptors) - np.asarray(store.descriptors)).max() < 1e-5

    # other scales on that complete store: exit 2 with a message naming the store
    code = main(["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST[:-2], "--scales", "single"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "different settings" in err
    # bad arguments: clear errors, no traceback
    assert main(["extract", *MODEL, "--out", str(tmp_path / "x")]) == 2
    assert main(["extract", "--model", "no_such_model", "--images", str(images), "--out", str(tmp_path / "y")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(tmp_path / "z"), "--scales", "big"]) == 2
    capsys.readouterr()


def test_extract_refuses_silent_random_weights(tmp_path, capsys):
    images = tmp_path / "photos"
    write_photo_dir(images, count=2, long_side=48)
    out = tmp_path / "s"
    assert main(["extract", "--model", "gem_resnet18", "--images", str(images), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no embedded weights" in err and "--weights random" in err and not out.exists()
    assert main(["extract", "--model", "gem_resnet18", "--weights", "random", "--images", str(images),
                 "--out", str(out), *FAST]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    meta = open_store(out).meta
    assert meta["weights"] == "random" and meta["weights_sha256"] is None


def test_benchmark_end_to_end(tmp_path, capsys):
    FAST = ["--workers", "0", "--no-progress", "--scales", "single"]  # noqa: N806
    root = tmp_path / "data"
    write_revisitop(root, "toyoxf", n_db=8, n_q=3, long_side=72)
    distractor_dir = tmp_path / "r1m"
    write_photo_dir(distractor_dir, count=5, long_side=72)
    dis = tmp_path / "dis"
    assert main(["extract", *MODEL, "--images", str(distractor_dir), "--out", str(dis), *FAST]) == 0
    out = tmp_path / "bench"
    code = main(["benchmark", *MODEL, "--dataset", "toyoxf", "--root", str(root), "--out", str(out),
                 "--distractors", str(dis), *FAST])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| model" in printed and "toyoxf-M | +1M" in printed
    report = json.loads((out / "benchmark.json").read_text())
    row = printed.strip().splitlines()[-3]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "gem_efficientnet_lite0" and all(c != "-" for c in cells[1:])
    medium = report["without_distractors"]["medium"]["mAP"]
    assert cells[1] == f"{medium:.2f}" and 0 <= medium <= 100
    assert report["with_distractors"]["protocol"]["num_distractors"] == 5
    queries = open_store(out / "queries")
    assert queries.ids == ["query_00", "query_01", "query_02"]
    # lite0 is not a cfcd model: revisitop's rounding crop by default, recorded in the protocol
    assert queries.meta["extract"]["crop_rule"] == "round"
    assert "round" in report["without_distractors"]["protocol"]["query_crop"]
    # cfcd extract --gnd --queries: the same crops, here with the CFCD truncation rule
    gnd_file = root / "toyoxf" / "gnd_toyoxf.pkl"
    assert main(["extract", *MODEL, "--gnd", str(gnd_file), "--queries", "--crop-rule", "truncate",
                 "--out", str(tmp_path / "q"), *FAST]) == 0
    q = open_store(tmp_path / "q")
    assert q.ids == queries.ids and q.meta["extract"]["crop_rule"] == "truncate"
    assert q.meta["gnd"]["dataset"] == "toyoxf" and len(q.meta["gnd"]["sha256"]) == 64
    assert main(["extract", *MODEL, "--queries", "--images", str(root), "--out", str(tmp_path / "bad")]) == 2
    capsys.readouterr()
    # a second run resumes from the complete stores and prints the same row
    assert main(["benchmark", *MODEL, "--dataset", "toyoxf", "--root", str(root), "--out", str(out),
                 "--distractors", str(dis), *FAST]) == 0
    again = capsys.readouterr().out
    assert "already complete" in again and again.strip().splitlines()[-3] == row
    # distractors extracted with other settings are refused
    other = tmp_path / "dis2"
    assert main(["extract", *MODEL, "--images", str(distractor_dir), "--out", str(other), *FAST, "--max-size", "64"]) == 0
    assert main(["benchmark", *MODEL, "--dataset", "toyoxf", "--root", str(root), "--out", str(out),
                 "--distractors", str(other), *FAST]) == 2
    err = capsys.readouterr().err
    assert "live in different embedding spaces" in err and "max_size" in err


def test_torchrun_two_ranks(tmp_path):
    images = tmp_path / "photos"
    write_photo_dir(images, count=5, long_side=48)
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    args = [*MODEL, "--images", str(images), *FAST, "--device", "cpu"]
    assert main(["extract", *args, "--out", str(single)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cfcd", "extract", *args, "--out", str(ranks)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = open_store(single), open_store(ranks)
    assert a.ids == b.ids
    assert np.abs(np.asarray(a.descriptors) - np.asarray(b.descriptors)).max() < 1e-5
    assert b.meta["extract"]["world_size"] == 2


def test_extract_with_converted_weights_dir_and_timm_name(tmp_path, capsys):
    """`cfcd convert` output (a directory) and `gem_<timm name>` models work in `cfcd extract`,
    and the store records the sha256 of the converted weights."""
    import torch

    import cfcd.models
    from cfcd.utils.io import sha256_file

    photos = tmp_path / "photos"
    write_photo_dir(photos, count=4, long_side=64)
    model = cfcd.models.create("gem_resnet18", weights="random")
    src = tmp_path / "resnet18_gem.pth"
    torch.save(model.state_dict(), src)
    converted = tmp_path / "converted"
    assert main(["convert", str(src), "--model", "gem_resnet18", "--out", str(converted)]) == 0
    out = tmp_path / "store"
    rc = main(["extract", "--model", "gem_resnet18", "--weights", str(converted), "--images", str(photos),
               "--out", str(out), "--scales", "single", "--workers", "0", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    store = open_store(out)
    assert store.meta["weights_sha256"] == sha256_file(converted / "model.safetensors")
    assert main(["extract", "--model", "gem_no_such_net", "--images", str(photos), "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'gem_no_such_net'" in capsys.readouterr().err


def test_killed_extraction_keeps_work_flushed_by_time(tmp_path, capsys):
    # default --shard-size 1024: before, a kill at 3 of 6 images left nothing on disk
    images = tmp_path / "photos"
    write_photo_dir(images, count=6, long_side=48)
    out = tmp_path / "s"
    args = ["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST, "--flush-seconds", "0"]
    assert main([*args, "--stop-after", "3"]) == 3
    capsys.readouterr()
    assert main(["store", "info", str(out)]) == 0
    assert "3 rows" in capsys.readouterr().out
    assert main(args) == 0
    assert "resuming, 3 image(s) of this rank already done, 3 to go" in capsys.readouterr().err
    assert len(open_store(out)) == 6


def test_extraction_where_every_image_fails(tmp_path, capsys):
    images = tmp_path / "bad"
    images.mkdir()
    for name in ("a.jpg", "b.png"):
        (images / name).write_bytes(b"not an image")
    out = tmp_path / "s"
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "FAILED" in err and "every one of the 2 image(s) failed" in err and "fix the inputs" in err
    assert main(["store", "info", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_resume_with_other_settings_names_what_differs(tmp_path, capsys):
    images = tmp_path / "photos"
    write_photo_dir(images, count=3, long_side=48)
    out = tmp_path / "s"
    base = ["extract", *MODEL, "--images", str(images), "--out", str(out), "--workers", "0", "--no-progress",
            "--shard-size", "1"]
    assert main([*base, "--scales", "1 0.7071", "--stop-after", "1"]) == 3  # a partial store
    capsys.readouterr()
    assert main([*base, "--scales", "single", "--max-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "scales: 1 0.7071 -> single" in err and "max_size: None -> 32" in err
    assert len(err) < 400  # the settings by name, not two dicts of every field


def test_out_a_file_and_a_file_name_with_a_line_break(tmp_path, capsys):
    images = tmp_path / "photos"
    write_photo_dir(images, count=2, long_side=48)
    (tmp_path / "taken").write_text("x")
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(tmp_path / "taken"), *FAST]) == 2
    assert "taken: exists and is not a directory" in capsys.readouterr().err
    # one file whose name holds a line break: recorded as failed, the others are stored
    first = next(images.rglob("*.jpg"))
    (images / "odd\nname.jpg").write_bytes(first.read_bytes())
    out = tmp_path / "s"
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST]) == 0
    store = open_store(out)
    assert len(store.ids) == 2
    [failure] = store.meta["failures"]
    assert failure["id"] == "odd\nname" and "line break" in failure["reason"]


def test_a_second_extraction_into_the_same_store_is_refused_at_once(tmp_path, capsys):
    import fcntl

    images = tmp_path / "photos"
    write_photo_dir(images, count=2, long_side=48)
    out = tmp_path / "s"
    (out / ".partial").mkdir(parents=True)
    with open(out / ".partial" / "lock", "a") as held:  # another job writing the store
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"{out}: another extraction is writing this store" in err
        assert not list(out.rglob("shard-*"))  # refused before any work
    assert main(["extract", *MODEL, "--images", str(images), "--out", str(out), *FAST]) == 0  # lock released


@pytest.mark.parametrize("limit, stage", [(3000, "shards"), (9000, "finalise")])
def test_full_disk_is_named_nothing_half_written_and_a_rerun_completes(tmp_path, limit, stage):
    """RLIMIT_FSIZE makes writes past ``limit`` bytes fail with EFBIG, like ENOSPC on a full disk:
    a 1280-D shard row is 5.2 kB (fails at the first shard), the 3-row store 15.5 kB (fails at finalising)."""
    import resource
    import signal

    images = tmp_path / "photos"
    write_photo_dir(images, count=3, long_side=48)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "cfcd", "extract", *MODEL, "--images", str(images), "--out", str(out), *FAST,
           "--shard-size", "1", "--flush-seconds", "0"]

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=full_disk)
    assert done.returncode == 2, done.stderr
    assert f"disk full while writing {out}: free" in done.stderr and "rerun to resume" in done.stderr
    assert "Traceback" not in done.stderr
    shards = list(out.rglob("shard-*.npy"))
    assert (len(shards) == 3) == (stage == "finalise") and not (out / "meta.json").exists()
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name.endswith(".tmp")]  # no temp file left
    assert main(cmd[3:]) == 0
    assert len(open_store(out).ids) == 3


def test_default_model_and_a_folder_path_given_to_the_api(tmp_path, capsys):
    import cfcd.models
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.models.registry import DEFAULT_MODEL

    images = tmp_path / "photos"
    write_photo_dir(images, count=2, long_side=48)
    assert main(["extract", "--images", str(images), "--out", str(tmp_path / "s"), "--workers", "0", "--no-progress",
                 "--scales", "single"]) == 0
    assert open_store(tmp_path / "s").meta["model"] == DEFAULT_MODEL == "gem_efficientnet_lite2"
    capsys.readouterr()
    # the API takes a folder path like the command line; the progress bar shows the label
    model = cfcd.models.create("gem_efficientnet_lite0")
    options = ExtractOptions(scales=parse_scales("single"), workers=0, progress=True)
    summary = extract_to_store(model, str(images), tmp_path / "api" / "0000", options, label="photos")
    assert len(summary.store.ids) == 2
    assert "extract photos" in capsys.readouterr().err


def test_a_long_job_gets_one_line_with_its_estimate_and_the_option_that_shortens_it():
    from cfcd.extract import ExtractOptions, parse_scales
    from cfcd.extract.engine import long_job_note

    slow = long_job_note(3, 36.0, 200, ExtractOptions(workers=0))  # 12 s/image, the default 5 scales
    assert slow.startswith("about 40 min more for 200 image(s) at 12.0 s/image") and "--max-size 1024" in slow
    capped = long_job_note(3, 36.0, 200, ExtractOptions(max_size=1024, workers=0))
    assert "--scales single" in capped
    assert long_job_note(3, 3.0, 200, ExtractOptions(workers=0)) is None  # 200 s: no line
    assert long_job_note(0, 0.0, 200, ExtractOptions(workers=0)) is None
    assert "a GPU" in long_job_note(1, 10.0, 100, ExtractOptions(max_size=512, scales=parse_scales("single"), workers=0))
