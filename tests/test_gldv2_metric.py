"""GLDv2 retrieval scoring against DELF's metrics (tests/_reference_delf.py): prediction lists with
repeated ids and unscored (None) queries, and the descriptor evaluation of cfcd evaluate|benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from _reference_delf import delf_mean_average_precision, delf_mean_precisions, delf_read_solution
from cfcd.data.datasets import get_dataset
from cfcd.data.datasets.gldv2 import parse_parts, read_retrieval_solution
from cfcd.errors import InputError
from cfcd.evaluation import evaluate
from cfcd.evaluation.gldv2 import gldv2_metrics, score_predictions


def _solution_rows(rng, index: list[str], n: int) -> list[tuple[str, str, str]]:
    rows = []
    for q in range(n):
        usage = str(rng.choice(["Public", "Private", "Ignored"], p=[0.4, 0.4, 0.2]))
        size = int(rng.integers(1, 130))  # some queries with more than 100 positives: divisor min(n, 100)
        images = "None" if usage == "Ignored" else " ".join(rng.choice(index, size=size, replace=False))
        rows.append((f"q{q:03d}", images, usage))
    return rows


def _write_solution(path, rows) -> None:
    path.write_text("id,images,Usage\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))


def test_score_predictions_equals_delf_with_repeats_and_none(tmp_path):
    rng = np.random.default_rng(0)
    index = [f"i{j:04d}" for j in range(400)]
    rows = _solution_rows(rng, index, 80)
    _write_solution(tmp_path / "solution.csv", rows)
    public, private, ignored = read_retrieval_solution(tmp_path / "solution.csv")
    assert (public, private) == delf_read_solution(rows)
    assert ignored == [r[0] for r in rows if r[2] == "Ignored"] and ignored
    predictions = {}
    for query, images, usage in rows:
        if usage == "Ignored" or rng.random() < 0.15:
            continue  # no prediction: counts 0 in the mean over the solution
        pool = images.split(" ") + list(rng.choice(index, size=60))
        ranked = list(rng.choice(pool, size=int(rng.integers(0, 160))))  # with repeats, sometimes > 100
        predictions[query] = ranked
    assert any(len(set(p)) < len(p) for p in predictions.values())
    for solution in (public, private):
        chosen = {k: v for k, v in predictions.items() if k in solution}
        ours = score_predictions(chosen, solution)
        assert ours["mAP@100"] == pytest.approx(delf_mean_average_precision(chosen, solution), abs=1e-4)
        assert ours["mPrecision@100"] == pytest.approx(delf_mean_precisions(chosen, solution)[99], abs=1e-4)
        assert ours["mAP@100"] > 0.01
    with pytest.raises(InputError, match="not in the solution"):
        score_predictions(predictions, public)


def test_descriptor_evaluation_equals_delf_on_the_exact_top_100(tmp_path):
    rng = np.random.default_rng(1)
    n_index, dim = 500, 16
    index = [f"{j:016x}" for j in range(n_index)]
    rows = _solution_rows(rng, index, 40)
    ds_dir = tmp_path / "gldv2_retrieval"
    ds_dir.mkdir()
    (ds_dir / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in index))
    _write_solution(ds_dir / "retrieval_solution_v2.1.csv", rows)
    dataset = get_dataset("gldv2_retrieval")
    gnd = dataset.ground_truth(tmp_path)
    public, private = delf_read_solution(rows)
    assert gnd.qimlist == list(public) + list(private) and gnd.imlist == index

    x = rng.standard_normal((n_index, dim)).astype(np.float32)
    q = rng.standard_normal((len(gnd.qimlist), dim)).astype(np.float32)
    for i, query in enumerate(gnd.qimlist):  # pull each query towards some of its positives
        solution = public.get(query) or private[query]
        q[i] += 0.6 * x[[index.index(s) for s in solution[:3]]].sum(axis=0)
    result = evaluate(q, x, gnd, setups=dataset.setups, metrics=dataset.metrics)
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :100]
    predictions = {query: [index[j] for j in order[i]] for i, query in enumerate(gnd.qimlist)}
    everything = {**public, **private}
    for name, solution in (("public", public), ("private", private), ("all", everything)):
        chosen = {k: predictions[k] for k in solution}
        values = result.setups[name].values
        assert values["mAP@100"] == pytest.approx(delf_mean_average_precision(chosen, solution), abs=1e-4)
        assert values["mPrecision@100"] == pytest.approx(delf_mean_precisions(chosen, solution)[99], abs=1e-4)
        assert result.setups[name].num_evaluated == len(solution)
    assert 0.05 < result.setups["all"].values["mAP@100"] < 0.95
    assert [m.name for m in gldv2_metrics()] == ["mAP@100", "mPrecision@100"]


def test_solution_and_parts_errors(tmp_path):
    _write_solution(tmp_path / "bad.csv", [("q1", "a b", "Hidden")])
    with pytest.raises(InputError, match=r"bad.csv:2: Usage 'Hidden'"):
        read_retrieval_solution(tmp_path / "bad.csv")
    splits = get_dataset("gldv2_retrieval").splits
    assert parse_parts(["index:0-2,5", "test:1"], splits) == {"index": [0, 1, 2, 5], "test": [1]}
    assert parse_parts(["3"], splits) == {"index": [3], "test": [3]}
    with pytest.raises(InputError, match="test has 20 tars"):
        parse_parts(["0-30"], splits)
    with pytest.raises(InputError, match="unknown split 'train'"):
        parse_parts(["train:0"], splits)
