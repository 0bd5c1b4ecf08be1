"""One provenance check for every command that combines stores: the same refusal everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from cfcd.errors import InputError
from cfcd.store import check_compatible, open_store, write_store

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _eval_helpers import run_cli, tiny_gnd, unit_rows  # noqa: E402

DIM = 16
MESSAGE = "live in different embedding spaces"


def _meta(model: str, state: str = "s0") -> dict:
    return {"model": model, "weights_sha256": None, "extract": {"settings": {"model": {"state_sha256": state}}}}


@pytest.fixture()
def stores(tmp_path):
    gnd = tiny_gnd(tmp_path)
    rng = np.random.default_rng(0)
    db_ids = [f"img{i:03d}" for i in range(40)]
    q_ids = [f"q{i}" for i in range(4)]
    paths = {"gnd": gnd}
    for name, ids, meta in (("db", db_ids, _meta("cfcd_r50")), ("q", q_ids, _meta("cfcd_r50")),
                            ("q_dolg", q_ids, _meta("dolg_r50")), ("q_other_init", q_ids, _meta("cfcd_r50", "s1")),
                            ("extra_dolg", [f"x{i}" for i in range(5)], _meta("dolg_r50"))):
        paths[name] = tmp_path / name
        write_store(paths[name], ids, unit_rows(rng, len(ids), DIM), meta=meta)
    return paths


def test_check_compatible_names_both_sides(stores):
    check_compatible(open_store(stores["db"]), open_store(stores["q"]))
    with pytest.raises(InputError, match=MESSAGE) as info:
        check_compatible(open_store(stores["db"]), open_store(stores["q_dolg"]))
    assert "'dolg_r50'" in str(info.value) and "'cfcd_r50'" in str(info.value) and str(stores["q_dolg"]) in str(info.value)
    # the same model with another (e.g. random) initialisation: the state hash differs
    with pytest.raises(InputError, match="state_sha256"):
        check_compatible(open_store(stores["db"]), open_store(stores["q_other_init"]))
    # a plain matrix has no meta: nothing to compare
    np.save(stores["db"].parent / "plain.npy", unit_rows(np.random.default_rng(1), 4, DIM))
    check_compatible(open_store(stores["db"]), open_store(stores["db"].parent / "plain.npy"))


def test_every_command_refuses_mixed_models_with_one_message(stores, tmp_path, capsys):
    s = stores
    code, _, err = run_cli(capsys, "evaluate", "--gnd", s["gnd"], "-q", s["q_dolg"], "-x", s["db"])
    assert code == 2 and MESSAGE in err  # was: a silent mAP
    code, _, err = run_cli(capsys, "evaluate", "--gnd", s["gnd"], "-q", s["q"], "-x", s["db"],
                           "--distractors", s["extra_dolg"])
    assert code == 2 and MESSAGE in err
    code, out, err = run_cli(capsys, "evaluate", "--gnd", s["gnd"], "-q", s["q"], "-x", s["db"])
    assert code == 0, err
    # search
    assert run_cli(capsys, "index", "build", s["db"], "--out", tmp_path / "idx", "--type", "flat")[0] == 0
    code, _, err = run_cli(capsys, "search", tmp_path / "idx", "--queries", s["q_dolg"])
    assert code == 2 and MESSAGE in err
    # merge
    code, _, err = run_cli(capsys, "store", "merge", s["db"], s["extra_dolg"], "--out", tmp_path / "merged")
    assert code == 2 and MESSAGE in err
    # whiten --apply: a whitening learned on one model's store is not applied to another's
    assert run_cli(capsys, "whiten", "--store", s["db"], "--out", tmp_path / "pca.safetensors")[0] == 0
    code, _, err = run_cli(capsys, "whiten", "--apply", tmp_path / "pca.safetensors", "--store", s["q_dolg"],
                           "--out", tmp_path / "w")
    assert code == 2 and MESSAGE in err and not (tmp_path / "w").exists()
    assert run_cli(capsys, "whiten", "--apply", tmp_path / "pca.safetensors", "--store", s["q"],
                   "--out", tmp_path / "w")[0] == 0
    # cfcd benchmark's distractors: tests/test_cli_extract.py::test_benchmark_end_to_end


def test_lw_with_few_pairs_warns(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(40)]
    write_store(tmp_path / "s", ids, unit_rows(rng, 40, 32), meta={"model": "m"})
    (tmp_path / "pairs.txt").write_text("".join(f"i{2 * k} i{2 * k + 1}\n" for k in range(20)))
    code, _, err = run_cli(capsys, "whiten", "--store", tmp_path / "s", "--kind", "lw", "--pairs",
                           tmp_path / "pairs.txt", "--out", tmp_path / "lw.safetensors")
    assert code == 0
    assert "degenerate" in err and "20 pairs for 32-D" in err
