"""Ground-truth loading: the real revisitop files, the restricted unpickler, malformed files."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfcd.data.gnd import (
    KNOWN_GND,
    GroundTruth,
    UnsafePickleError,
    find_gnd,
    load_gnd,
    safe_load_pickle,
    safe_loads_pickle,
)
from cfcd.errors import InputError

from _eval_helpers import tiny_gnd, write_gnd

# totals from the published files (revisitop gnd_roxford5k.pkl / gnd_rparis6k.pkl)
TOTALS = {
    "roxford5k": dict(db=4993, easy=3029, hard=2497, junk=1356, empty_easy=[11, 66]),
    "rparis6k": dict(db=6322, easy=6874, hard=10350, junk=7153, empty_easy=[]),
}


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_real_ground_truth(revisitop_gnd_dir, dataset):
    gt = load_gnd(revisitop_gnd_dir / f"gnd_{dataset}.pkl")
    want = TOTALS[dataset]
    assert isinstance(gt, GroundTruth)
    assert gt.dataset == dataset and gt.revisited and gt.official
    assert gt.sha256 == KNOWN_GND[dataset]["sha256"]
    assert gt.num_database == want["db"] and gt.num_queries == 70 == len(gt.gnd)
    for key in ("easy", "hard", "junk"):
        assert sum(len(g[key]) for g in gt.gnd) == want[key]
    assert [i for i, g in enumerate(gt.gnd) if not g["easy"]] == want["empty_easy"]
    assert not set(gt.qimlist) & set(gt.imlist)  # queries are not in the database
    for g in gt.gnd:
        assert all(type(i) is int for k in ("easy", "hard", "junk") for i in g[k])
        assert len(g["bbx"]) == 4 and g["bbx"][2] > g["bbx"][0]
        assert not (set(g["easy"]) & set(g["hard"])) and not (set(g["junk"]) & set(g["easy"] + g["hard"]))
    # the restricted loader returns the same data as a plain (trusted) pickle.load
    with open(gt.path, "rb") as handle:
        plain = pickle.load(handle)  # noqa: S301 - the published file, to compare against
    assert plain["imlist"] == gt.imlist and [g["easy"] for g in plain["gnd"]] == [g["easy"] for g in gt.gnd]


class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("protocol", [0, 2, 3, 5])
def test_malicious_pickle_is_rejected_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "gnd_roxford5k.pkl"
    evil.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [_SystemCall(marker)]}, protocol=protocol))
    with pytest.raises(UnsafePickleError) as info:
        safe_load_pickle(evil)
    assert str(evil) in str(info.value) and "system" in str(info.value)
    with pytest.raises(InputError):
        load_gnd(evil)
    assert not marker.exists()
    # and the same file really is dangerous: the plain unpickler runs it
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(evil)!r}, 'rb'))"], check=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        _Reduce(builtins.eval, ("1+1",)),
        _Reduce(builtins.getattr, ("abc", "upper")),
        _Reduce(subprocess.check_output, (["true"],)),
        collections.Counter("abc"),
        _Reduce(np.load, ("x.npy",)),  # numpy functions other than array reconstruction
    ],
    ids=["eval", "getattr", "subprocess", "class", "np.load"],
)
def test_only_plain_data_is_allowed(payload):
    with pytest.raises(UnsafePickleError):
        safe_loads_pickle(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_containers_are_allowed(tmp_path, protocol):
    obj = {
        "imlist": np.array(["a", "b", "c", "d"]),
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": np.array([0.5, 1, 2, 3.5]), "easy": np.array([0, 2], dtype=np.int64),
             "hard": np.array([], dtype=np.int32), "junk": [np.int64(3)]},
            {"bbx": (0, 0, 1, 1), "easy": [1], "hard": [], "junk": []},
        ],
        "extra": collections.OrderedDict(a={1, 2}, b=frozenset([3]), c=b"bytes", d=1.5 + 2j, e=None),
    }
    back = safe_loads_pickle(pickle.dumps(obj, protocol=protocol))
    assert back["extra"] == obj["extra"]
    path = tmp_path / "gnd_custom.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    gt = load_gnd(path)
    assert gt.dataset == "custom" and gt.imlist == ["a", "b", "c", "d"] and not gt.official
    assert gt.gnd[0] == {"bbx": [0.5, 1.0, 2.0, 3.5], "easy": [0, 2], "hard": [], "junk": [3]}
    assert all(type(i) is int for i in gt.gnd[0]["easy"] + gt.gnd[0]["junk"])


def test_classic_format(tmp_path):
    path = write_gnd(tmp_path / "gnd_mini.pkl", ["a", "b", "c"], ["q"], [{"bbx": [0, 0, 1, 1], "ok": [0, 2], "junk": [1]}])
    gt = load_gnd(path)
    assert not gt.revisited and gt.gnd[0]["ok"] == [0, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is not a pickle at all", "not a valid pickle"),
        ("truncate", "truncated"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({"imlist": ["a"], "gnd": []}), "missing key(s) 'qimlist'"),
        (pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": []}), "'gnd' has 0 entries but 'qimlist' has 1"),
        (pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [1], "hard": [], "junk": []}]}),
         "index 1 is out of range for 1 database images"),
        (pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0.0], "hard": [], "junk": []}]}),
         "expected integer indices"),
        (pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"hard": [], "junk": []}]}),
         "missing key(s) 'easy'"),
        (pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q", "r"],
                       "gnd": [{"easy": [0], "hard": [], "junk": []}, {"ok": [1], "junk": []}]}), "mixes"),
        (pickle.dumps({"imlist": ["a", 3], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}),
         "expected an image name"),
        (pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [1, 2], "easy": [0], "hard": [], "junk": []}]}),
         "'bbx' must be [x1, y1, x2, y2]"),
    ],
    ids=["empty", "garbage", "truncated", "list", "no-qimlist", "count", "range", "float-index", "no-easy",
         "mixed", "name", "bbx"],
)
def test_malformed_ground_truth(tmp_path, content, message):
    path = tmp_path / "gnd_bad.pkl"
    if content == "truncate":
        good = tiny_gnd(tmp_path).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_gnd(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_wrong_file_for_dataset(revisitop_gnd_dir):
    with pytest.raises(InputError, match="wrong ground-truth file"):
        load_gnd(revisitop_gnd_dir / "gnd_rparis6k.pkl", dataset="roxford5k")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_gnd(tmp_path / "gnd_nothing.pkl")
    with pytest.raises(InputError, match="is a directory"):
        load_gnd(tmp_path)


def test_find_gnd_layouts(tmp_path):
    source = tiny_gnd(tmp_path, name="src.pkl").read_bytes()
    for rel in ("roxford5k/gnd_roxford5k.pkl", "gnd_roxford5k.pkl", "datasets/roxford5k/gnd_roxford5k.pkl",
                "test/roxford5k/gnd_roxford5k.pkl"):
        root = tmp_path / rel.replace("/", "_")
        target = root / rel
        target.parent.mkdir(parents=True)
        target.write_bytes(source)
        assert find_gnd("roxford5k", root) == target
    with pytest.raises(InputError, match="no ground truth for rparis6k"):
        find_gnd("rparis6k", tmp_path)
    with pytest.raises(InputError, match="data root not found"):
        find_gnd("rparis6k", tmp_path / "nope")
