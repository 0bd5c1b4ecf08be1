"""``cfcd demo``: build data, evaluate the pretrained model, fine-tune (CFCD stage 1 + confusions +
stage 2), evaluate again, index, search and write the report -- resumable step by step.

Every step goes through the public API a user would call (``build_demo_data``,
``extract_to_store``, ``evaluate_files``, ``Trainer``, ``write_confusions``, ``build_index``), and
leaves its output in ``DIR`` so that every command of the README can run on it afterwards:

    DIR/cfcd-demo.json            what this directory is (mode, seed, model) and the step times
    DIR/data/                     benchmarks (revisitop layout) + training list (GLDv2 layout)
    DIR/stores/{before,after}/    descriptor stores of the test benchmark (queries, database)
    DIR/runs/stage1, stage2/      training runs (checkpoints, log.jsonl, final/ model)
    DIR/runs/landmark_scores.txt  stage-1 confusions (hard negatives of stage 2)
    DIR/index/                    FAISS flat index of the fine-tuned database (`cfcd index build`)
    DIR/report.html, summary.json

A rerun with the same ``--out`` skips finished steps and resumes the unfinished one (the
extraction and the trainer resume from what they wrote).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cfcd.models
from cfcd.data.gnd import load_gnd
from cfcd.demo.data import Sizes, build_demo_data, check_disjoint, load_demo_data
from cfcd.demo.report import write_report
from cfcd.errors import CfcdError, InputError
from cfcd.evaluation.benchmark import run_benchmark
from cfcd.extract import ExtractOptions, parse_scales
from cfcd.index import build_index
from cfcd.store import open_store
from cfcd.train.config import load_config
from cfcd.train.confusions import write_confusions
from cfcd.train.trainer import train
from cfcd.utils.io import atomic_write_json

MARKER = "cfcd-demo.json"
SETUPS = ("easy", "medium", "hard")


@dataclass
class Mode:
    """Everything a mode changes: data sizes, extraction scales, training length."""

    name: str
    max_side: int
    train_views: int
    scales: tuple[float, ...]
    s1_epochs: int
    s2_epochs: int
    im_size: int
    s2_im_size: int
    limits: dict = field(default_factory=dict)      # Sizes.max_* (tiny mode)
    s1: dict = field(default_factory=dict)          # extra recipe overrides
    s2: dict = field(default_factory=dict)


MODES: dict[str, Mode] = {
    # the test suite's end-to-end run: a few sources, one scale, one short epoch per stage
    "tiny": Mode("tiny", max_side=128, train_views=3, scales=(1.0,), s1_epochs=1, s2_epochs=1, im_size=96,
                 s2_im_size=128,
                 limits=dict(max_test=4, max_train=6, max_val=2, max_distractors=3),
                 s1={"train.global_batch": 16, "train.micro_batch": 16},
                 s2={"train.global_batch": 16, "train.micro_batch": 16, "train.max_steps_per_epoch": 1}),
    "quick": Mode("quick", max_side=256, train_views=8, scales=(0.7071, 1.0), s1_epochs=4, s2_epochs=1,
                  im_size=160, s2_im_size=224),
    "full": Mode("full", max_side=384, train_views=12, scales=(0.5, 0.7071, 1.0, 1.4142), s1_epochs=6,
                 s2_epochs=2, im_size=192, s2_im_size=224),
}

MODEL = "gem_efficientnet_lite0"
S1_RECIPE = "demo_lite0_s1"
S2_RECIPE = "demo_lite0_s2"


class Steps:
    """The marker file: mode, seed, finished steps and their times (atomic writes)."""

    def __init__(self, out: Path, mode: Mode, seed: int):
        self.path = out / MARKER
        self.state = {"kind": "cfcd-demo", "version": 1, "mode": mode.name, "seed": seed, "model": MODEL,
                      "done": {}, "seconds": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if (old.get("mode"), old.get("seed")) != (mode.name, seed):
                raise InputError(f"{out}: holds a `cfcd demo` run with mode {old.get('mode')!r} and seed "
                                 f"{old.get('seed')!r}, not {mode.name!r} and {seed!r}; use another --out, "
                                 "or --overwrite to start this one again")
            self.state.update(done=old.get("done", {}), seconds=old.get("seconds", {}))
        self.save()

    def done(self, step: str) -> bool:
        return bool(self.state["done"].get(step))

    def finish(self, step: str, seconds: float, **info) -> None:
        self.state["done"][step] = info or True
        self.state["seconds"][step] = round(float(seconds), 2)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.state)


def prepare_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``out`` must be new, empty, or a demo directory (``cfcd-demo.json``); nothing else is touched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise InputError(f"{out}: not empty and not a `cfcd demo` directory (no {MARKER}); "
                             "nothing was changed: choose another --out")
        if overwrite:
            for child in out.iterdir():  # only a demo directory gets here
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


class _Printer:
    def __init__(self, stream):
        self.stream = stream

    def __call__(self, message: str = "") -> None:
        print(message, file=self.stream, flush=True)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


# Every step computes on one torch thread: the training and extraction results depend on the thread
# count (reductions split differently), so a fixed count makes a run's numbers the same on any machine
# and at any load; the README's table is reproduced bit for bit. One thread is also the fastest on a busy
# machine, where OpenMP threads waiting for each other's time slices slow small convolutions many times.
THREADS = 1


# module -> what the demo needs it for (all in the `demo` extra)
DEMO_MODULES = {"skimage": "scikit-image (photos)", "sklearn": "scikit-learn (photos)",
                "matplotlib": "matplotlib (report plots)"}


def check_dependencies() -> None:
    """Refuse at once, not after every step, when an optional package of the demo is missing."""
    import importlib.util

    missing = []
    for module, what in DEMO_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(what)
    if missing:
        raise CfcdError(f"cfcd demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        'installed: pip install "cfcd[demo]" (make demo installs everything)')


def run_demo(out: str | os.PathLike, *, mode: str = "quick", seed: int = 0, overwrite: bool = False,
             stream=sys.stdout, progress: bool = True, runtime: str = "auto") -> dict:
    """Run (or resume) the whole demo in ``out``; returns the summary (also ``out/summary.json``)."""
    import torch

    check_dependencies()
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run_demo(out, mode=mode, seed=seed, overwrite=overwrite, threads=THREADS, stream=stream,
                         progress=progress, runtime=runtime)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out, *, mode: str, seed: int, overwrite: bool, threads: int, stream, progress: bool,
              runtime: str = "auto") -> dict:
    import torch

    if mode not in MODES:
        raise InputError(f"unknown demo mode {mode!r} (choose from {', '.join(MODES)})")
    m = MODES[mode]
    out = prepare_out_dir(out, overwrite=overwrite)
    steps = Steps(out, m, seed)
    say = _Printer(stream)
    total0 = time.perf_counter()
    torch.set_flush_denormal(True)
    say(f"cfcd demo ({m.name} mode, seed {seed}, {threads} thread(s)) in {out}")
    n_steps = 7

    # 1. data ------------------------------------------------------------------------------------

    data_root = out / "data"
    t0 = time.perf_counter()
    say(f"[1/{n_steps}] data: benchmark and disjoint training list from real photos")
    sizes = Sizes(max_side=m.max_side, train_views=m.train_views, **m.limits)
    if steps.done("data"):
        data = load_demo_data(data_root)
        say("      already built")
    else:
        data = build_demo_data(data_root, sizes, seed=seed, progress=progress)
        check_disjoint(data_root)
        steps.finish("data", time.perf_counter() - t0)
    roles = data.manifest["roles"]
    say(f"      {len(roles['test'])} test queries, {len(roles.get('distractor', []))} distractor photos, "
        f"{data.num_classes} training classes, {len(roles['val'])} validation queries"
        + ("" if data.manifest["opencv_doc"] else " (opencv-doc not installed: fewer photos)"))


    gnd = load_gnd(data.test_gnd, "demo")
    options = _extract_options(m, progress, runtime)

    # 2. baseline --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"[2/{n_steps}] baseline: extract and evaluate the embedded pretrained {MODEL}")

    pretrained = cfcd.models.create(MODEL)
    before = _extract_and_evaluate(pretrained, None, gnd, data, out / "stores" / "before", options, say)
    val_before = _val_map(pretrained, data, out / "stores" / "val_before", options, say)
    if not steps.done("baseline"):
        steps.finish("baseline", time.perf_counter() - t0)
    say(_table(before["metrics"], "pretrained"))

    # 3-5. fine-tune -----------------------------------------------------------------------------

    runs = out / "runs"
    over1 = _overrides(m, data, runs / "stage1", seed, m.s1_epochs, m.s1, im_size=m.im_size)
    cfg1 = load_config(S1_RECIPE, _nest(over1))
    t0 = time.perf_counter()
    say(f"[3/{n_steps}] fine-tune, stage 1: MadaCos ({S1_RECIPE}, {m.s1_epochs} epoch(s), "
        f"{data.num_classes} classes)")
    _train_step(steps, "stage1", cfg1, progress, t0, say)

    t0 = time.perf_counter()
    confusions = runs / "landmark_scores.txt"
    say(f"[4/{n_steps}] cfcd train confusions: stage-1 predictions on the training list (hard negatives)")
    if not steps.done("confusions"):
        summary = write_confusions(cfg1, runs / "stage1" / "final", data.train_list, data.train_root, confusions,
                                   batch_size=32, workers=0, device="cpu", progress=progress)
        steps.finish("confusions", time.perf_counter() - t0, top1=summary.get("top1"))
    say(f"      stage-1 classifier top-1 on the training list (eval mode, no margin, no augmentation): "
        f"{100 * steps.state['done']['confusions']['top1']:.1f}%")

    t0 = time.perf_counter()
    over2 = _overrides(m, data, runs / "stage2", seed, m.s2_epochs,
                       {**m.s2, "model.init": str(runs / "stage1" / "final"), "data.confusions": str(confusions)},
                       im_size=m.s2_im_size)
    cfg2 = load_config(S2_RECIPE, _nest(over2))
    say(f"[5/{n_steps}] fine-tune, stage 2: MadaCos + local triplets on tuples with hard negatives "
        f"({S2_RECIPE}, {m.s2_epochs} epoch(s))")
    _train_step(steps, "stage2", cfg2, progress, t0, say)

    # 6. evaluate the fine-tuned model -----------------------------------------------------------
    t0 = time.perf_counter()
    final = runs / "stage2" / "final"
    say(f"[6/{n_steps}] evaluate the fine-tuned model ({final})")
    tuned = cfcd.models.create(MODEL, weights=final)
    after = _extract_and_evaluate(tuned, final, gnd, data, out / "stores" / "after", options, say)
    if not steps.done("after"):
        steps.finish("after", time.perf_counter() - t0)
    say(_table(after["metrics"], "fine-tuned"))

    # 7. index, search, report -------------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"[7/{n_steps}] FAISS index of the fine-tuned database, search, report")

    index = build_index(out / "stores" / "after" / "database", "flat", out=out / "index")
    k = 8
    hits = {}
    # the pretrained model's index too, so that `cfcd serve --compare` shows both side by side
    index_before = build_index(out / "stores" / "before" / "database", "flat", out=out / "index_before")
    for name, idx in (("before", index_before), ("after", index)):
        hits[name] = _search(idx, out / "stores" / name / "queries", k)
    shown = hits["after"]
    for qid in list(shown)[:3]:
        labels = _labels(gnd, qid)
        say(f"      {qid}: " + ", ".join(f"{rid} ({labels.get(rid, 'negative')})" for rid, _ in shown[qid][:5]))
    seconds = dict(steps.state["seconds"])
    seconds["total"] = round(sum(v for k_, v in seconds.items() if k_ != "total"), 2)
    summary = {
        "mode": m.name, "seed": seed, "threads": threads, "model": MODEL, "opencv_doc": data.manifest["opencv_doc"],
        "before": _percent(before["metrics"]), "after": _percent(after["metrics"]),
        "val_before": val_before,
        # per protocol: queries whose AP the fine-tuned model raised / lowered against the pretrained baseline
        "queries_better_worse": _better_worse(before, after),
        "seconds": seconds,
    }
    commands = reproduce_commands(out, m, over1, over2)
    write_report(out, summary=summary, gnd=gnd, data=data, before=before, after=after, hits=hits,
                 runs=runs, commands=commands)
    atomic_write_json(out / "summary.json", summary)
    steps.finish("report", time.perf_counter() - t0)
    seconds = dict(steps.state["seconds"])
    seconds["total"] = round(sum(seconds.values()), 2)
    summary["seconds"] = seconds
    atomic_write_json(out / "summary.json", summary)

    say("")
    say(_comparison(summary))
    say("time per step: " + ", ".join(f"{k_} {_fmt_s(v)}" for k_, v in seconds.items() if k_ != "total")
        + f"; total {_fmt_s(seconds['total'])} (this run: {_fmt_s(time.perf_counter() - total0)})")
    say(f"report: {out / 'report.html'}")
    say("browse the fine-tuned index, with the pretrained model as its baseline (--compare):")
    say(f"  {commands['serve']}")
    return summary


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------


def _train_step(steps, name: str, cfg: dict, progress: bool, t0: float, say) -> None:
    """Train ``cfg`` unless the step is recorded as done (the trainer itself resumes a killed run)."""

    if steps.done(name):
        say("      already trained")
        return
    cfg.train.progress = progress
    train(cfg, device="cpu")
    steps.finish(name, time.perf_counter() - t0)


def _extract_options(m: Mode, progress: bool, runtime: str = "auto"):
    return ExtractOptions(scales=parse_scales(list(m.scales)), max_size=None, workers=0, crop_rule="round",
                          progress=progress, runtime=runtime, threads=THREADS)


def _extract_and_evaluate(model, weights, gnd, data, stores: Path, options, say) -> dict:
    def report(role, summary):
        if summary.count:
            rate = summary.count / max(summary.seconds, 1e-9)
            speed = f"{rate:.1f} img/s" if rate >= 1 else f"{1 / rate:.1f} s/img"
            say(f"      {role}: {summary.count} images in {summary.seconds:.1f} s ({speed})")

    result = run_benchmark(model, gnd, data.benchmarks, stores, options, weights=weights,
                           log=lambda message: say(f"      {message}"), on_part=report)
    record = {"metrics": result.plain.metrics(percent=True), "per_query": result.plain.per_query(percent=True)}
    atomic_write_json(stores / "evaluation.json", {**result.plain.to_dict(result.protocol)})
    return record


def _val_map(model, data, stores: Path, options, say) -> dict:
    """The held-out validation benchmark with the pretrained model: epoch 0 of the curves."""
    from dataclasses import replace


    gnd = load_gnd(data.val_gnd, "demoval")
    result = run_benchmark(model, gnd, data.benchmarks, stores, replace(options, progress=False),
                           log=lambda message: None)
    return {s: round(float(v["mAP"]), 2) for s, v in result.plain.metrics(percent=True).items()}


def _overrides(m: Mode, data, out_dir: Path, seed: int, epochs: int, extra: dict, *, im_size: int) -> dict:
    over = {
        "data.root": str(data.train_root),
        "data.train_list": str(data.train_list),
        "data.im_size": im_size,
        "data.test_size": im_size,
        "loss.num_classes": int(data.num_classes),
        "optim.epochs": int(epochs),
        "train.seed": int(seed),
        "train.out_dir": str(out_dir),
        "benchmark.root": str(data.benchmarks),
        "benchmark.scales": list(m.scales),
    }
    over.update(extra)
    return over


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _search(index, queries: Path, k: int) -> dict[str, list[tuple[str, float]]]:
    store = open_store(queries)
    hits = index.search(np.asarray(store.descriptors, dtype=np.float32), k=k, query_ids=store.ids)
    return {qid: list(zip(row, hits.scores[i].tolist())) for i, (qid, row) in enumerate(zip(hits.query_ids, hits.ids))}


def _labels(gnd, qid: str) -> dict[str, str]:
    entry = gnd.gnd[list(gnd.qimlist).index(qid)]
    return {gnd.imlist[j]: key for key in ("easy", "hard", "junk") for j in entry[key]}


def _percent(metrics: dict) -> dict:
    return {s: {k: (None if v is None else round(float(v), 2)) for k, v in metrics[s].items()} for s in SETUPS
            if s in metrics}


def _table(metrics: dict, title: str) -> str:
    rows = [f"      {title:<11} " + "  ".join(f"{s:>6}" for s in ("E", "M", "H"))]
    rows.append(f"      {'mAP':<11} " + "  ".join(f"{metrics[s]['mAP']:6.2f}" for s in SETUPS))
    return "\n".join(rows)


def _better_worse(before: dict, after: dict) -> dict:
    out = {}
    for setup in SETUPS:
        pairs = [(before["per_query"][q][setup]["AP"], after["per_query"][q][setup]["AP"]) for q in before["per_query"]]
        pairs = [(b, a) for b, a in pairs if a is not None and b is not None]
        out[setup] = {"better": sum(a > b for b, a in pairs), "worse": sum(a < b for b, a in pairs),
                      "queries": len(pairs)}
    return out


def _comparison(summary: dict) -> str:
    lines = ["mAP (%)        Easy    Medium  Hard",
             "pretrained   " + "".join(f"{summary['before'][s]['mAP']:8.2f}" for s in SETUPS),
             "fine-tuned   " + "".join(f"{summary['after'][s]['mAP']:8.2f}" for s in SETUPS),
             "change       " + "".join(f"{summary['after'][s]['mAP'] - summary['before'][s]['mAP']:+8.2f}"
                                       for s in SETUPS)]
    counts = summary.get("queries_better_worse")
    if counts:
        lines.append("queries better than the baseline / worse: "
                     + ", ".join(f"{s.capitalize()} {counts[s]['better']}/{counts[s]['worse']}" for s in SETUPS)
                     + f" (of {counts['hard']['queries']})")
    return "\n".join(lines)


def _cli_overrides(over: dict) -> str:
    def value(v):
        if isinstance(v, (list, tuple)):
            return "'[" + ", ".join(str(x) for x in v) + "]'"
        return str(v)
    return " ".join(f"{k}={value(v)}" for k, v in over.items())


def reproduce_commands(out: Path, m: Mode, over1: dict, over2: dict) -> dict[str, str]:
    """The CLI commands that redo each step by hand on the data in ``out`` (the demo's exact overrides)."""
    d = out / "data"
    bench = d / "benchmarks"
    scales = " ".join(str(s) for s in m.scales)
    s1, s2 = out / "runs" / "stage1", out / "runs" / "stage2"
    gnd = bench / "demo" / "gnd_demo.pkl"
    ext = f"--gnd {gnd} --root {bench / 'demo'} --scales '{scales}' --crop-rule round"
    st = {name: out / "stores" / name for name in ("before", "after")}
    return {
        "demo": f"cfcd demo --out {out}" + ("" if m.name == "full" else f" --{m.name}"),
        "extract_before": f"cfcd extract --model {MODEL} {ext} --queries --out {st['before'] / 'queries'} && "
                          f"cfcd extract --model {MODEL} {ext} --out {st['before'] / 'database'}",
        "evaluate_before": f"cfcd evaluate --gnd {gnd} --queries {st['before'] / 'queries'} "
                           f"--database {st['before'] / 'database'}",
        "stage1": f"cfcd train --config {S1_RECIPE} {_cli_overrides(over1)}",
        "confusions": f"cfcd train confusions --config {S1_RECIPE} {_cli_overrides(over1)} --weights {s1 / 'final'} "
                      f"--list {d / 'train' / 'train_list.txt'} --root {d / 'train'} "
                      f"--out {out / 'runs' / 'landmark_scores.txt'}",
        "stage2": f"cfcd train --config {S2_RECIPE} {_cli_overrides(over2)}",
        "extract_after": f"cfcd extract --model {MODEL} --weights {s2 / 'final'} {ext} --queries "
                         f"--out {st['after'] / 'queries'} && cfcd extract --model {MODEL} --weights {s2 / 'final'} "
                         f"{ext} --out {st['after'] / 'database'}",
        "evaluate_after": f"cfcd evaluate --gnd {gnd} --queries {st['after'] / 'queries'} "
                          f"--database {st['after'] / 'database'}",
        "index": f"cfcd index build {st['after'] / 'database'} --type flat --out {out / 'index'}",
        "search": f"cfcd search {out / 'index'} --queries {st['after'] / 'queries'} --k 10",
        "index_before": f"cfcd index build {st['before'] / 'database'} --type flat --out {out / 'index_before'}",
        "serve": f"cfcd serve {out / 'index'} --images {bench / 'demo' / 'jpg'} --gnd {gnd} "
                 f"--queries {st['after'] / 'queries'} --compare {out / 'index_before'} "
                 f"--compare-queries {st['before'] / 'queries'}",
    }
