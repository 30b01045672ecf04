"""The report's quality section: what the in-training quality evaluation (train/quality.py) found.

- one chart per quality metric over the steps, with the base model's score (step 0) as a dashed
  reference line, so a user sees at a glance whether fine-tuning helped at all;
- the table of checkpoints (checkpoints.json) with the scores each one recorded, the chosen best
  (checkpoint.best_metric) marked;
- the clips of the best and of the last checkpoint side by side (quality/step-<N>/wavs/).

`report.render_report` calls `quality_section` when the run has quality/history.json.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from higgs_tune.app.charts import PALETTE, Series, svg_line_chart
from higgs_tune.runfs import INDEX_FILE, QUALITY_DIR, RESULTS_JSON
from higgs_tune.train.quality import history_path, read_history

# metric key -> (chart title, y label); the order of the charts and of the table's columns
QUALITY_CHARTS = (
    ("cer", "Character error rate (ASR)", "CER"),
    ("wer", "Word error rate (ASR)", "WER"),
    ("sim", "Speaker similarity to the voice prompt", "cosine"),
    ("sim_gt", "Speaker similarity to the ground truth", "cosine"),
    ("duration_ratio", "Duration ratio (output / ground truth)", "ratio"),
    ("stop_rate", "Stop rate (ended by itself)", "share"),
    ("silence_share", "Silence share (20 ms frames below -40 dBFS)", "share"),
    ("clipped_share", "Clipped share (samples at full scale)", "share"),
)


@dataclass
class QualityData:
    history: dict  # quality/history.json: {"baseline": {...} | None, "evals": [...]}
    index: dict | None  # checkpoints.json, when the run saved checkpoints


def collect_quality(run_dir: Path) -> QualityData | None:
    """The run's quality history and checkpoint index; None when the run had no quality evaluation."""
    if not history_path(run_dir).is_file():
        return None
    index_path = Path(run_dir) / INDEX_FILE
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            index = None  # derived data: the table is left out, the curves still show
    return QualityData(read_history(run_dir), index)


def _num(v, digits: int = 4) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "&ndash;"


def quality_charts(q: QualityData) -> list[str]:
    """One SVG chart per logged quality metric; the base model's score as a reference line."""
    base = q.history.get("baseline") or {}
    evals = q.history.get("evals") or []
    charts = []
    for key, title, y_label in QUALITY_CHARTS:
        points = [(e["step"], e.get(key)) for e in evals]
        ref = base.get(key)
        if not any(isinstance(v, (int, float)) for _, v in points) and ref is None:
            continue
        pts = [(s, float(v) if v is not None else None) for s, v in points]
        series = [Series("fine-tuned", pts, PALETTE[0], markers=True)]
        hlines = [(float(ref), f"base model (step 0): {ref:.3f}")] if isinstance(ref, (int, float)) else []
        charts.append(svg_line_chart(title, series, hlines=hlines, y_label=y_label))
    return charts


def checkpoint_table(q: QualityData) -> str:
    """Each checkpoint with its eval loss and the quality scores it recorded; the best marked."""
    if not q.index or not q.index.get("checkpoints"):
        return '<p class="muted">No checkpoint was saved yet.</p>'
    best = q.index.get("best") or {}
    cols = [k for k, _, _ in QUALITY_CHARTS]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in cols)
    rows = []
    base = q.history.get("baseline")
    if base:
        cells = "".join(f"<td class='num'>{_num(base.get(k))}</td>" for k in cols)
        rows.append(f"<tr><td>base model</td><td class='num'>0</td><td class='num'>&ndash;</td>{cells}<td></td></tr>")
    for c in q.index["checkpoints"]:
        m = c.get("metrics") or {}
        cells = "".join(f"<td class='num'>{_num(m.get(f'quality_{k}'))}</td>" for k in cols)
        is_best = c.get("name") == best.get("name")
        mark = '<span class="ok">best</span>' if is_best else ""
        row_class = ' class="warn"' if is_best else ""
        rows.append(
            f"<tr{row_class}><td>{html.escape(str(c.get('name')))}</td>"
            f"<td class='num'>{_num(c.get('step'), 0) if c.get('step') is not None else '&ndash;'}</td>"
            f"<td class='num'>{_num(c.get('eval_loss'))}</td>{cells}<td>{mark}</td></tr>"
        )
    chosen = (
        f"<p>best by <b>{html.escape(str(best.get('metric')))}</b>: {html.escape(str(best.get('name')))} "
        f"(step {html.escape(str(best.get('step')))}, value {_num(best.get('value'))})"
        + (f", linked as {html.escape(str(best.get('folder')))}/" if best.get("folder") else "")
        + "</p>"
        if best
        else '<p class="muted">No best checkpoint yet (no save had the metric).</p>'
    )
    return (
        f'{chosen}<table class="quality-checkpoints"><tr><th>checkpoint</th><th>step</th><th>eval loss</th>{head}'
        f"<th></th></tr>{''.join(rows)}</table>"
    )


def best_vs_last(q: QualityData, run_dir: Path, player: Callable[[Path, str], str]) -> str:
    """The quality clips of the best checkpoint's evaluation and of the last one, side by side."""
    evals = q.history.get("evals") or []
    if not evals:
        return ""
    best = (q.index or {}).get("best") or {}
    best_step = None
    for c in (q.index or {}).get("checkpoints", []):
        if c.get("name") == best.get("name"):
            best_step = (c.get("metrics") or {}).get("quality_step")
    last_step = evals[-1]["step"]
    columns = [("best", best_step), ("last", last_step)] if best_step is not None else [("last", last_step)]
    results = {}
    for _, step in columns:
        path = Path(run_dir) / QUALITY_DIR / f"step-{step}" / RESULTS_JSON
        results[step] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"clips": []}
    head = "".join(f"<th>{label} (step {step})</th>" for label, step in columns)
    rows = []
    for clip in results[last_step]["clips"]:
        cells = []
        for _, step in columns:
            match = next((c for c in results[step]["clips"] if c["id"] == clip["id"]), None)
            wav = Path(run_dir) / QUALITY_DIR / f"step-{step}" / match["wav"] if match else None
            if wav is not None and wav.is_file():
                label = f"CER {_num(match.get('cer'), 3)} · SIM {_num(match.get('speaker_similarity'), 3)}"
                cells.append(f"<td>{player(wav, label)}</td>")
            else:
                cells.append('<td class="muted">no file</td>')
        rows.append(f"<tr><td class='txt'><bdi>{html.escape(str(clip.get('text')))}</bdi></td>{''.join(cells)}</tr>")
    table = f'<table class="quality-clips"><tr><th>text</th>{head}</tr>{"".join(rows)}</table>'
    return "<h3>Best and last side by side</h3>" + table


def quality_section(q: QualityData, run_dir: Path, player: Callable[[Path, str], str]) -> str:
    """The whole section: charts, checkpoint table, best vs last."""
    base = q.history.get("baseline")
    note = (
        '<p class="muted">The dashed line is the base model scored on the same clips before training '
        + ("(taken from the cache)." if base and base.get("cached") else "(step 0).")
        + "</p>"
        if base
        else '<p class="muted">No base-model score (train.quality_baseline: false, or a --resume-weights-only run).</p>'
    )
    charts = quality_charts(q)
    body = '<div class="charts">' + "".join(charts) + "</div>" if charts else '<p class="muted">No scores yet.</p>'
    return note + body + "<h3>Checkpoints</h3>" + checkpoint_table(q) + best_vs_last(q, run_dir, player)
