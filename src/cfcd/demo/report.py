"""The demo's report: one self-contained HTML file (plots and thumbnails embedded as data URIs).

Sections: the before/after table per protocol, per-query AP before vs after, the training curves
(loss, MadaCos scale and margin, the local triplet term, held-out mAP per epoch), the top results
of a few queries before and after with every result bordered by its class, and the commands that
reproduce each step.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from cfcd.train.logging import read_log
from cfcd.utils.io import atomic_write_text

COLOURS = {"query": "#1f77b4", "easy": "#2ca02c", "hard": "#ff7f0e", "junk": "#9467bd", "negative": "#d62728"}
SETUPS = ("easy", "medium", "hard")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumb(path: Path, box=None, side: int = 112) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(tuple(int(round(v)) for v in box))
        im.thumbnail((side, side))
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def training_history(runs: Path) -> list[dict]:
    """Epoch rows of both stages' ``log.jsonl``, numbered across the stages."""

    rows = []
    epoch = 0
    for stage in ("stage1", "stage2"):
        log = runs / stage / "log.jsonl"
        if not log.is_file():
            continue
        seen = {}
        for row in read_log(log, "epoch"):
            seen[int(row["epoch"])] = row  # a resumed run may have logged an epoch twice
        for e in sorted(seen):
            epoch += 1
            rows.append({**seen[e], "stage": stage, "x": epoch})
    return rows


def training_steps(runs: Path) -> list[dict]:
    """Per-step rows of both stages' ``log.jsonl``; ``x`` counts steps across the stages."""

    rows = []
    offset = 0
    for stage in ("stage1", "stage2"):
        log = runs / stage / "log.jsonl"
        if not log.is_file():
            continue
        seen = {int(row["step"]): row for row in read_log(log, "train")}
        for step in sorted(seen):
            rows.append({**seen[step], "stage": stage, "x": offset + step})
        offset += max(seen) if seen else 0
    return rows


def _curves(history: list[dict], steps: list[dict], val_before: dict) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    x = [r["x"] for r in steps]

    def series(rows, key):
        return [r.get(key) if isinstance(r.get(key), (int, float)) else np.nan for r in rows]

    stage2_from = next((r["x"] for r in steps if r["stage"] == "stage2"), None)
    ax = axes[0]
    ax.plot(x, series(steps, "loss"), ".-", label="total loss")
    ax.plot(x, series(steps, "loss_ce"), ".--", label="MadaCos CE")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, series(steps, "scale"), ".-", color="#1f77b4")
    ax.set_title("MadaCos scale s (blue), margin m (red)")
    ax2 = ax.twinx()
    ax2.plot(x, series(steps, "margin"), ".-", color="#d62728")
    ax = axes[2]
    local = [(xi, v) for xi, v in zip(x, series(steps, "loss_local")) if np.isfinite(v)]
    ax.plot([p[0] for p in local], [p[1] for p in local], ".-", color="#ff7f0e")
    ax.set_title("local triplet term (stage 2)")
    for ax in axes[:3]:
        ax.set_xlabel("step")
        if stage2_from is not None:
            ax.axvline(stage2_from - 0.5, color="grey", ls=":", lw=1)
    ax = axes[3]
    ex = [r["x"] for r in history]
    for setup, marker in zip(SETUPS, "o^s"):
        ys = [val_before.get(setup, np.nan)] + series(history, f"demoval_{setup}_mAP")
        ax.plot([0] + ex, ys, marker + "-", label=setup)
    ax.set_title("held-out validation mAP (%)")
    ax.set_xlabel("epoch (0: pretrained)")
    ax.legend(fontsize=8)
    e2 = next((r["x"] for r in history if r["stage"] == "stage2"), None)
    if e2 is not None:
        ax.axvline(e2 - 0.5, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _per_query_plot(before: dict, after: dict) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, setup in zip(axes, SETUPS):
        xs, ys = [], []
        for qid in before["per_query"]:
            b = before["per_query"][qid][setup]["AP"]
            a = after["per_query"][qid][setup]["AP"]
            if a is not None and b is not None:
                xs.append(b)
                ys.append(a)
        ax.scatter(xs, ys, s=28, color="#1f77b4")
        ax.plot([0, 100], [0, 100], color="grey", lw=1, ls="--")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("AP before (%)")
        ax.set_ylabel("AP after (%)")
        better = sum(y > x for x, y in zip(xs, ys))
        worse = sum(y < x for x, y in zip(xs, ys))
        ax.set_title(f"{setup}: {better} queries better than the baseline, {worse} worse (of {len(xs)})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _metric_table(summary: dict) -> str:
    keys = [k for k in summary["before"]["easy"]]
    head = "".join(f"<th colspan=3>{html.escape(s.capitalize())}</th>" for s in SETUPS)
    sub = "".join("<th>before</th><th>after</th><th>change</th>" for _ in SETUPS)
    rows = []
    for key in keys:
        cells = []
        for s in SETUPS:
            b, a = summary["before"][s][key], summary["after"][s][key]
            d = a - b
            cls = "up" if d > 0 else ("down" if d < 0 else "")
            cells.append(f"<td>{b:.2f}</td><td><b>{a:.2f}</b></td><td class='{cls}'>{d:+.2f}</td>")
        rows.append(f"<tr><th>{html.escape(key)}</th>{''.join(cells)}</tr>")
    return (f"<table class='metrics'><tr><th rowspan=2>metric (%)</th>{head}</tr><tr>{sub}</tr>"
            + "".join(rows) + "</table>")


def _per_query_table(gnd, before: dict, after: dict) -> str:
    rows = []
    for qid in gnd.qimlist:
        cells = []
        for s in SETUPS:
            b, a = before["per_query"][qid][s]["AP"], after["per_query"][qid][s]["AP"]
            if a is None or b is None:
                cells.append("<td>-</td><td>-</td>")
                continue
            cls = "up" if a > b else ("down" if a < b else "")
            cells.append(f"<td>{b:.1f}</td><td class='{cls}'>{a:.1f}</td>")
        rows.append(f"<tr><th>{html.escape(qid)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th colspan=2>{s.capitalize()}</th>" for s in SETUPS)
    return f"<table class='metrics'><tr><th>query</th>{head}</tr>" + "".join(rows) + "</table>"


def _grid(gnd, images: Path, hits: dict, queries: list[str], k: int) -> str:
    out = []
    for qid in queries:
        qi = list(gnd.qimlist).index(qid)
        entry = gnd.gnd[qi]
        labels = {gnd.imlist[j]: key for key in ("easy", "hard", "junk") for j in entry[key]}
        q = _thumb(images / f"{qid}.jpg", entry["bbx"])
        for name in ("before", "after"):
            cells = [f"<td><img src='{q}' style='border:4px solid {COLOURS['query']}'><br>query</td>"]
            for rank, (rid, score) in enumerate(hits[name][qid][:k], 1):
                grade = labels.get(rid, "negative")
                cells.append(f"<td><img src='{_thumb(images / f'{rid}.jpg')}' title='{html.escape(rid)}' "
                             f"style='border:4px solid {COLOURS[grade]}'><br>{rank}. {grade} {score:.3f}</td>")
            label = "pretrained" if name == "before" else "fine-tuned"
            out.append(f"<tr><th>{html.escape(qid)}<br><small>{label}</small></th>{''.join(cells)}</tr>")
    return "<table class='grid'>" + "".join(out) + "</table>"


def _pick_queries(gnd, before: dict, after: dict, n: int = 4) -> list[str]:
    """The queries whose Hard AP changed most (either way), then the rest in order."""
    def change(qid):
        b, a = before["per_query"][qid]["hard"]["AP"], after["per_query"][qid]["hard"]["AP"]
        return -abs((a or 0) - (b or 0))
    return sorted(gnd.qimlist, key=change)[:n]


def write_report(out: Path, *, summary: dict, gnd, data, before: dict, after: dict, hits: dict, runs: Path,
                 commands: dict[str, str]) -> Path:
    history = training_history(runs)
    images = data.benchmarks / "demo" / "jpg"
    legend = " ".join(f"<span class='chip' style='border-color:{c}'>{name}</span>" for name, c in COLOURS.items())
    seconds = summary["seconds"]
    times = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in seconds.items())
    cmds = "\n".join(f"# {html.escape(k)}\n{html.escape(v)}" for k, v in commands.items())
    roles = data.manifest["roles"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cfcd demo report</title>
<style>
body {{font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222}}
table.metrics {{border-collapse: collapse; margin: 1em 0}}
table.metrics td, table.metrics th {{border: 1px solid #ccc; padding: 3px 8px; text-align: right}}
td.up {{color: #2ca02c; font-weight: bold}} td.down {{color: #d62728}}
table.grid td {{text-align: center; font-size: 11px; padding: 2px; vertical-align: top}}
table.grid th {{text-align: left; font-size: 12px; padding-right: 8px}}
.chip {{border: 3px solid; padding: 0 6px; margin-right: 6px}}
pre {{background: #f6f6f6; padding: 1em; font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere}}
img.plot {{max-width: 100%}}
</style></head><body>
<h1>cfcd demo: fine-tuning {html.escape(summary['model'])} with CFCD</h1>
<p>Mode <b>{html.escape(summary['mode'])}</b>, seed {summary['seed']}, {summary.get('threads', 1)} torch thread(s)
(fixed, so the numbers are the same on any machine and at any load). Benchmark: {len(gnd.qimlist)} queries,
{len(gnd.imlist)} database images (revisitop protocol: Easy = easy positives, junk = hard + junk;
Medium = easy + hard, junk; Hard = hard positives, junk = easy + junk). Training list: {data.num_classes} classes
from other photos ({len(roles['train'])} sources; none of them, nor any view of them, is in the benchmark).
Real photos from scikit-image, scikit-learn{', opencv-doc' if summary['opencv_doc'] else ''}.</p>
<h2>Before and after fine-tuning</h2>
{_metric_table(summary)}
<h2>Per-query AP</h2>
<img class="plot" src="{_per_query_plot(before, after)}" alt="per-query AP before vs after">
{_per_query_table(gnd, before, after)}
<h2>Training</h2>
<p>Stage 1: MadaCos; stage 2 (after the dotted line): MadaCos + local triplets on tuples with hard negatives
from the stage-1 confusions. Validation: a separate benchmark of held-out photos (never the test queries);
epoch 0 is the pretrained model.</p>
<img class="plot" src="{_curves(history, training_steps(runs), summary.get('val_before', {}))}" alt="training curves">
<h2>Top results</h2>
<p>{legend}</p>
{_grid(gnd, images, hits, _pick_queries(gnd, before, after), 8)}
<h2>Time</h2>
<table class="metrics">{times}</table>
<h2>Reproduce and browse</h2>
<p>The last command (<code>serve</code>) serves the fine-tuned index, the model; <code>--compare</code> gives
its baseline, the pretrained model's index, and the page counts the queries better and worse than the
baseline.</p>
<pre>{cmds}</pre>
</body></html>
"""
    path = Path(out) / "report.html"
    atomic_write_text(path, page)
    return path
