"""Small command-line promises: help texts, placeholders, quiet pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cfcd.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_and_evaluate_share_the_missing_value_placeholder():
    from cfcd.cli.benchmark import format_row
    from cfcd.evaluation import MISSING, format_percent

    row = format_row("m", "roxford5k", None, None).splitlines()[-1]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == [MISSING] * 4
    assert format_percent(float("nan")).strip() == MISSING and format_percent(0.5).strip() == "50.00"
    assert "nan" not in row


def test_help_texts():
    assert "finalize" in build_parser("store").format_help()
    from cfcd.cli import COMMANDS

    assert "finalize" in COMMANDS["store"][1]
    export_help = build_parser("export").format_help()
    assert "ONNX opset" in " ".join(export_help.split())
    extract_help = " ".join(build_parser("extract").format_help().split())
    assert "default gem_efficientnet_lite2" in extract_help and "--max-size 1024 is several times faster" in extract_help
    search_help = " ".join(build_parser("search").format_help().split())
    assert "an image file, a folder of images or a text list" in search_help


def test_selfcheck_names_no_file_it_deleted(capsys):
    import re

    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "deleted at the end; --keep DIR keeps it" in out and "report:" not in out
    root = re.search(r"generated benchmark in (\S+)", out).group(1)
    assert not Path(root).exists()


def test_makefile_quiets_apt_and_gitignore_has_the_demo_directory():
    makefile = (REPO / "Makefile").read_text()
    recipes = makefile.split("\n\n")
    for target in ("chromium:", "demo: "):
        [recipe] = [r for r in recipes if target in r and "apt-get install" in r]
        # apt's output goes to a log file, not the screen (make test printed 500 lines of it)
        assert "> $(APT_LOG) 2>&1" in recipe and "-qq chromium) ||" not in recipe
    assert "/cfcd-demo/" in (REPO / ".gitignore").read_text().split()


def test_closed_pipe_exits_quietly(tmp_path):
    from cfcd.store import write_store

    write_store(tmp_path / "s", [f"id{i}" for i in range(2000)], np.ones((2000, 4), np.float32),
                meta={"model": "m", "failures": [{"id": f"f{i}", "reason": "x" * 50} for i in range(2000)]})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(f"{sys.executable} -m cfcd store info {tmp_path / 's'} --json --failures 2000 | head -c 20",
                          shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.startswith("{") and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert main(["store", "info", str(tmp_path / "s")]) == 0
