"""benchmarks/gpu_check.py, the prepared device check, in its CPU mode (``--device cpu --quick``): every
correctness line PASSes and the JSON holds every figure, so the script cannot rot while no GPU is around.
On the CPU the "device" paths run in the GPU's layouts (channels_last, bf16 autocast, batches)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cfcd_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cpu_quick_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert lines and all(line.startswith("PASS ") for line in lines), "\n".join(lines)

    result = json.loads(out.read_text())
    script = load_script()
    checks = {c["name"]: c for c in result["checks"]}
    assert all(c["status"] == "PASS" for c in checks.values())
    assert result["summary"]["FAIL"] == 0 and result["summary"]["skipped_sections"] == 0
    assert [s["status"] for s in result["sections"]] == ["OK"] * 9
    # every correctness line of the issue is there
    for model in ("cfcd_r50", "dolg_r50", "gem_efficientnet_lite2"):
        for what in ("cpu fp32 == CPU fp32", "cpu fp32 channels_last == CPU fp32", "cpu bf16 autocast channels_last ~ CPU fp32"):
            assert f"model {model} {what}" in checks
    names = " | ".join(checks)
    for fragment in ("multi-scale fast fp32 == reference", "multi-scale fast bf16 == reference",
                     "multi-scale describe_batch bf16 channels_last", "train step MadaCos cfcd_r50 cpu fp32",
                     "train step MadaCos cfcd_r50 cpu bf16 autocast + channels_last", "exact search cpu top-100",
                     "torchrun 1 process extract == plain extract"):
        assert fragment in names, fragment
    step = next(c for c in checks.values() if "bf16 autocast + channels_last == plain" in c["name"])
    assert step["values"]["grad_cos"] >= script.TRAIN_TOL["bf16"]["grad_cos"]
    # every figure, measured (GPU-only ones say why they are missing)
    figures = result["figures"]
    assert set(script.FIGURES) <= set(figures)
    for key in script.FIGURES:
        if key in script.OPTIONAL_FIGURES:
            assert figures[key] is not None or result["notes"][key]
        else:
            assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["extract.cfcd_r50.min_cosine"] >= 0.9999
    env_info = result["env"]
    for key in ("torch", "cuda", "device", "cpu_count", "timm", "faiss"):
        assert key in env_info
    assert set(result["targets"]) == set(script.TARGETS)


def test_a_failing_or_hanging_section_is_recorded_and_the_run_goes_on(tmp_path):
    import argparse

    script = load_script()
    out = tmp_path / "run.json"
    args = argparse.Namespace(device="cpu", budget=600.0, out=str(out))
    run = script.Run(args, script.QUICK)

    def spin(_run):
        while True:  # a hung section: the SIGALRM limit ends it
            pass

    run.section("boom", lambda r: 1 / 0, kind="correctness", need_s=0, limit_s=30)
    run.section("hang", spin, kind="correctness", need_s=0, limit_s=1)
    run.section("fine", lambda r: r.check("fine", True, "ok"), kind="correctness", need_s=0, limit_s=30)
    run.section("optional", lambda r: 1 / 0, kind="optional", need_s=0, limit_s=30)
    run.section("train", lambda r: r.figure("train.cfcd_r50.speedup", 9.0), kind="speed", need_s=10_000, limit_s=30)
    saved = json.loads(out.read_text())
    assert [s["status"] for s in saved["sections"]] == ["FAIL", "FAIL", "OK", "WARN", "SKIP"]
    assert [(c["name"], c["status"]) for c in saved["checks"]] == [
        ("boom (section)", "FAIL"), ("hang (section)", "FAIL"), ("fine", "PASS")]
    assert "ZeroDivisionError" in saved["checks"][0]["detail"] and "timed out" in saved["checks"][1]["detail"]
    assert saved["figures"]["train.cfcd_r50.speedup"] is None and "skipped" in saved["notes"]["train.cfcd_r50.speedup"]
    assert saved["summary"]["FAIL"] == 2 and "ZeroDivisionError" in saved["notes"]["optional"]
