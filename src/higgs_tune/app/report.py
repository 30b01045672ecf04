"""`higgs-tune report RUN_DIR`: one self-contained HTML page about a training run.

    build_report("runs/demo")            # -> runs/demo/report.html

What the page shows, from the files a run folder holds:

- loss curves from `metrics.jsonl` (`{"event": "metrics", "split": "train"|"eval", ...}`):
  total, text, audio (with the chance level ln(codebook_size + 2) = ln 1026), per codebook
  (train, and eval when logged), learning rate and gradient norm — inline SVG (`app/charts.py`:
  no plotting dependency, nothing fetched);
- health warnings (`{"event": "warning", ...}`), one row per warning code;
- the parameter report (`param_report.txt`) and the resolved config (`config.yaml`);
- audio players for the samples of each step (`samples/step-N/*.wav`), the WAV bytes
  embedded as base64 `data:` URIs so the page works when mailed or moved;
- the evaluation (`eval/results.json` from `higgs-tune evaluate`): summary, per language,
  per clip with a player for each output;
- quality during training (`quality/history.json`, app/quality_report.py): each quality metric
  over the steps with the base model's score as a reference line, the checkpoints with their
  scores and the chosen best, the clips of the best and the last checkpoint side by side.

Every number is escaped into the page; no script runs in it. Audio is embedded up to
`max_audio_mb` in total (default 100 MB); beyond that a player is replaced by the file's path
and the page says how many were left out.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from higgs_tune.app.charts import PALETTE, Series, svg_line_chart
from higgs_tune.app.quality_report import QualityData, collect_quality, quality_section
from higgs_tune.errors import DataError, OutputDirError
from higgs_tune.infer.evaluate import read_results
from higgs_tune.runfs import (
    CONFIG_FILE,
    EVAL_DIR,
    METRICS_FILE,
    PARAM_REPORT_FILE,
    REPORT_FILE,
    RESULTS_JSON,
    SAMPLES_DIR,
    atomic_write_bytes,
    claim,
    owned_names,
)

EVAL_RESULTS = Path(EVAL_DIR) / RESULTS_JSON
GENERATOR_MARK = '<meta name="generator" content="higgs-tune report">'
_EARLIER_MARK = "<title>higgs-tune run "  # reports written before the generator mark
AUDIO_CHANCE = math.log(1026)  # ln(codebook_size + stream BOS/EOS) of Higgs Audio v2 (and the tiny stack)
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- reading a run
@dataclass
class RunData:
    run_dir: Path
    train: list[dict] = field(default_factory=list)  # metrics records, split train, step order
    eval: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # one per code: first step, last step, count, message
    bad_lines: int = 0
    param_report: str | None = None
    config_text: str | None = None
    config: dict | None = None
    samples: list[tuple[int, list[Path]]] = field(default_factory=list)  # (step, wav files)
    sample_status: dict[int, dict[str, tuple[bool, int]]] = field(
        default_factory=dict
    )  # step -> file -> (stopped, frames)
    eval_results: dict | None = None
    quality: QualityData | None = None  # quality/history.json + checkpoints.json (app/quality_report.py)
    sample_prompts: dict = field(default_factory=dict)  # step -> wav name -> {text, reference, ground_truth}


@dataclass
class MetricsLog:
    """What metrics.jsonl says, sorted for the page."""

    train: list[dict]  # metrics records of split train, step order
    eval: list[dict]
    warnings: list[dict]  # one per code: first step, last step, count, message
    samples: dict[int, dict[str, tuple[bool, int]]]  # step -> wav file name -> (stopped, frames)
    bad_lines: int


def read_metrics(path: Path) -> MetricsLog:
    """Parse metrics.jsonl (`train.logging.MetricsLogger`'s records).

    A resumed run may have logged a step twice before truncation; the last record of a
    (split, step) wins. Warnings are merged per code: first step, last step, highest count,
    the latest message. `samples` events give each sample WAV's stop flag and frame count.
    """
    by_key: dict[tuple[str, int], dict] = {}
    warnings: dict[str, dict] = {}
    samples: dict[int, dict[str, tuple[bool, int]]] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line torn by a crash; the run itself drops it on resume
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        event = rec.get("event")
        if event == "metrics" and isinstance(rec.get("step"), int):
            by_key[(str(rec.get("split", "train")), rec["step"])] = rec
        elif event == "warning":
            code = str(rec.get("code", "warning"))
            w = warnings.setdefault(
                code, {"code": code, "step": rec.get("step"), "last_step": rec.get("step"), "count": 0, "message": ""}
            )
            steps = [s for s in (w["step"], rec.get("step")) if isinstance(s, int)]
            w["step"] = min(steps) if steps else None
            last = [s for s in (w["last_step"], rec.get("last_step"), rec.get("step")) if isinstance(s, int)]
            w["last_step"] = max(last) if last else None
            w["count"] = max(w["count"], int(rec.get("count") or 1))
            w["message"] = str(rec.get("message", ""))
        elif event == "samples" and isinstance(rec.get("step"), int):
            files, stopped, frames = rec.get("files") or [], rec.get("stopped") or [], rec.get("frames") or []
            if len(files) == len(stopped) == len(frames):
                samples[rec["step"]] = {
                    str(f): (bool(st), int(n)) for f, st, n in zip(files, stopped, frames, strict=True)
                }
    ordered = sorted(by_key.items(), key=lambda kv: kv[0][1])
    return MetricsLog(
        train=[r for (split, _), r in ordered if split == "train"],
        eval=[r for (split, _), r in ordered if split == "eval"],
        warnings=sorted(warnings.values(), key=lambda w: (w["step"] is None, w["step"] or 0)),
        samples=samples,
        bad_lines=bad,
    )


def collect_run(run_dir: str | Path) -> RunData:
    """Read everything the report shows; DataError when `run_dir` is not a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist. Fix: pass the checkpoint.output_dir of a training run.")
    metrics = run / METRICS_FILE
    if not metrics.is_file():
        raise DataError(
            f"{run} has no {METRICS_FILE}: it is not a higgs-tune run folder (or the run has not logged yet). "
            "Fix: pass the checkpoint.output_dir of a training run."
        )
    data = RunData(run_dir=run)
    log = read_metrics(metrics)
    data.train, data.eval, data.warnings, data.bad_lines, data.sample_status = (
        log.train,
        log.eval,
        log.warnings,
        log.bad_lines,
        log.samples,
    )
    data.sample_prompts = read_sample_prompts(metrics)
    if (run / PARAM_REPORT_FILE).is_file():
        data.param_report = (run / PARAM_REPORT_FILE).read_text(encoding="utf-8")
    if (run / CONFIG_FILE).is_file():
        data.config_text = (run / CONFIG_FILE).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(data.config_text)
            data.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            data.config = None
    samples = run / SAMPLES_DIR
    if samples.is_dir():
        steps = []
        for d in samples.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                wavs = sorted(d.glob("*.wav"))
                if wavs:
                    steps.append((int(m.group(1)), wavs))
        data.samples = sorted(steps)
    if (run / EVAL_RESULTS).is_file():
        data.eval_results = read_results(run / EVAL_RESULTS)
    data.quality = collect_quality(run)
    return data


# ----------------------------------------------------------------------------- page
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1e0}nav{padding:8px 28px;background:#e9ecf2}nav a{margin-right:16px;color:#1d4ed8}
main{padding:8px 28px 40px;max-width:1360px}
section{overflow-x:auto;background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:12px 18px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #e3e7ee;border-radius:6px}
.chart text{font-size:11px;fill:#4a5568}.chart .chart-title{font-size:13px;font-weight:600;fill:#1d2330}
.chart .grid line{stroke:#edf0f5}.chart .frame{fill:none;stroke:#aab3c2}
.chart .hline{stroke:#d62728;stroke-dasharray:3 3}
.chart .hline-label{fill:#d62728}.chart .hover{fill:transparent;stroke:none}.chart .hover:hover{fill:#1d2330}
.charts svg.chart{flex:1 1 560px;width:100%;max-width:760px;height:auto}
@media (max-width:900px){main{padding:8px 10px 30px}.charts svg.chart{flex-basis:100%;max-width:none}audio{width:240px}}
.chart .legend{font-size:11px;fill:#1d2330}.chart .empty{fill:#999}
table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #dde2ea;padding:4px 8px;text-align:left;vertical-align:top}
td.txt{overflow-wrap:anywhere;min-width:240px;max-width:520px}td.num,td.id{white-space:nowrap}
th{background:#f0f2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;border:1px solid #e3e7ee;padding:10px;overflow:auto;font-size:12px}
.warn{background:#fff7e6}.ok{color:#2f855a}.bad{color:#c53030}.muted{color:#718096}
.players{display:flex;flex-wrap:wrap;gap:10px}.sample{border-top:1px solid #edf0f5;padding:6px 0;width:100%}
.sample .target{margin:2px 0 6px;font-style:italic}.player{border:1px solid #e3e7ee;border-radius:6px;padding:6px 8px}
.player div{font-size:12px;color:#4a5568;margin-bottom:4px}audio{height:34px;width:300px}
"""


class _AudioBudget:
    """Embeds WAV files as data URIs until `limit` bytes; then returns None (the caller shows the path)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self.skipped: list[Path] = []

    def data_uri(self, path: Path) -> str | None:
        size = path.stat().st_size
        if self.used + size > self.limit:
            self.skipped.append(path)
            return None
        self.used += size
        return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _player(path: Path, label: str, budget: _AudioBudget, run_dir: Path, status: tuple[bool, int] | None = None) -> str:
    head = html.escape(label)
    if status is not None:
        stopped, frames = status
        head += f" &middot; {frames} frames, " + (
            '<span class="ok">ended by itself</span>'
            if stopped
            else '<span class="bad">did not stop (length limit)</span>'
        )
    uri = budget.data_uri(path)
    if uri is None:
        rel = path.relative_to(run_dir) if run_dir in path.parents else path
        return (
            f'<div class="player"><div>{head}</div>'
            f'<span class="muted">not embedded (size limit): {html.escape(str(rel))}</span></div>'
        )
    return f'<div class="player"><div>{head}</div><audio controls preload="metadata" src="{uri}"></audio></div>'


def read_sample_prompts(metrics: Path) -> dict[int, dict[str, dict]]:
    """step -> wav name -> {text, reference, ground_truth} from the "samples" records (older runs: none)."""
    out: dict[int, dict[str, dict]] = {}
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "samples" and isinstance(rec.get("prompts"), list):
            files = rec.get("files") or []
            if len(files) == len(rec["prompts"]):
                out[rec["step"]] = {
                    str(f): p for f, p in zip(files, rec["prompts"], strict=True) if isinstance(p, dict)
                }
    return out


def _sample_block(wav: Path, budget, run_dir: Path, status, prompt: dict | None) -> str:
    """One sample: its target text, then the generated clip beside the reference and the ground truth."""
    if not prompt:  # a run logged before the prompts were recorded: the generated clip alone
        return _player(wav, wav.stem, budget, run_dir, status)
    generated = _player(wav, f"{wav.stem} (generated)", budget, run_dir, status)
    players = [generated]
    for key, label in (("reference", "reference (voice prompt)"), ("ground_truth", "ground truth")):
        path = Path(prompt[key]) if prompt.get(key) else None
        if path is not None and path.is_file():
            players.append(_player(path, label, budget, run_dir))
    text = html.escape(str(prompt.get("text", "")))
    return (
        f'<div class="sample"><p class="target"><bdi>{text}</bdi></p>'
        f'<div class="players">{"".join(players)}</div></div>'
    )


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "&ndash;"
    return html.escape(str(v))


def _series_of(records: list[dict], key: str, name: str, color: str, **kw) -> Series:
    pts = []
    for r in records:
        v = r.get(key)
        pts.append((r["step"], float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None))
    return Series(name, pts, color, **kw)


def _has(records: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float, list)) for r in records)


def loss_charts(data: RunData) -> list[str]:
    """The SVG charts of the run's metrics (empty list when nothing was logged)."""
    train, evals = data.train, data.eval
    charts = []
    for key, title, hl in (
        ("loss", "Total loss", ()),
        ("text_loss", "Text loss", ()),
        ("audio_loss", "Audio loss (mean over codebooks)", ((AUDIO_CHANCE, f"chance ln 1026 = {AUDIO_CHANCE:.2f}"),)),
    ):
        if not (_has(train, key) or _has(evals, key)):
            continue
        series = [_series_of(train, key, "train", PALETTE[0])]
        if _has(evals, key):
            series.append(_series_of(evals, key, "eval", PALETTE[1], markers=True))
        charts.append(svg_line_chart(title, series, hlines=hl))
    for split, records in (("train", train), ("eval", evals)):
        if not _has(records, "per_codebook_loss"):
            continue
        k = max(len(r.get("per_codebook_loss") or []) for r in records)
        series = []
        for i in range(k):
            pts = []
            for r in records:
                vals = r.get("per_codebook_loss") or []
                v = vals[i] if i < len(vals) else None
                pts.append((r["step"], float(v) if isinstance(v, (int, float)) else None))
            series.append(Series(f"cb{i}", pts, PALETTE[i % len(PALETTE)], markers=split == "eval"))
        charts.append(svg_line_chart(f"Per-codebook audio loss ({split})", series, width=640))
    charts += quality_and_speed_charts(data)
    if _has(train, "lr"):
        charts.append(svg_line_chart("Learning rate", [_series_of(train, "lr", "lr", PALETTE[2])], y_label="lr"))
    if _has(train, "grad_norm"):
        charts.append(
            svg_line_chart(
                "Gradient norm (before clipping)",
                [_series_of(train, "grad_norm", "grad norm", PALETTE[3])],
                y_label="norm",
                log_y=True,
            )
        )
    return charts


EVAL_QUALITY_KEYS = (("wer", "WER"), ("cer", "CER"), ("speaker_similarity", "speaker similarity"))


def quality_and_speed_charts(data: RunData) -> list[str]:
    """Per-codebook accuracy, tokens/s, and eval WER/CER/SIM over steps when they were logged."""
    train, evals = data.train, data.eval
    charts = []
    for split, records in (("train", train), ("eval", evals)):
        if not _has(records, "per_codebook_acc"):
            continue
        k = max(len(r.get("per_codebook_acc") or []) for r in records)
        series = []
        for i in range(k):
            pts = []
            for r in records:
                vals = r.get("per_codebook_acc") or []
                v = vals[i] if i < len(vals) else None
                pts.append((r["step"], float(v) if isinstance(v, (int, float)) else None))
            series.append(Series(f"cb{i}", pts, PALETTE[i % len(PALETTE)], markers=split == "eval"))
        charts.append(svg_line_chart(f"Per-codebook top-1 accuracy ({split})", series, y_label="accuracy"))
    if _has(train, "tokens_per_s"):
        charts.append(
            svg_line_chart(
                "Throughput", [_series_of(train, "tokens_per_s", "tokens/s", PALETTE[4])], y_label="tokens/s"
            )
        )
    quality = [
        _series_of(evals, key, name, PALETTE[i], markers=True)
        for i, (key, name) in enumerate(EVAL_QUALITY_KEYS)
        if _has(evals, key)
    ]
    if quality:
        charts.append(svg_line_chart("Evaluation quality (WER, CER, speaker similarity)", quality, y_label="value"))
    return charts


def _eval_section(doc: dict, budget: _AudioBudget, run_dir: Path) -> str:
    s = doc.get("summary", {})
    rows = [
        ("WER", s.get("wer")),
        ("CER", s.get("cer")),
        ("speaker similarity (vs reference)", s.get("speaker_similarity")),
        ("speaker similarity (vs ground truth)", s.get("speaker_similarity_gt")),
        ("duration ratio (output / ground truth)", s.get("duration_ratio")),
        ("stop rate (ended by itself)", s.get("stop_rate")),
        ("clips", s.get("num_clips")),
    ]
    out = ['<table class="eval-summary"><tr><th>metric</th><th>value</th></tr>']
    out += [f'<tr><td>{html.escape(n)}</td><td class="num">{_num(v)}</td></tr>' for n, v in rows]
    out.append("</table>")
    per_lang = doc.get("per_language") or {}
    if per_lang:
        out.append(
            '<h3>Per language</h3><table class="eval-languages">'
            "<tr><th>language</th><th>clips</th><th>WER</th><th>CER</th><th>SIM</th><th>duration ratio</th>"
            "<th>stop rate</th></tr>"
        )
        for lang, m in per_lang.items():
            out.append(
                f"<tr><td>{html.escape(lang)}</td><td class='num'>{_num(m.get('num_clips'))}</td>"
                f"<td class='num'>{_num(m.get('wer'))}</td>"
                f"<td class='num'>{_num(m.get('cer'))}</td><td class='num'>{_num(m.get('speaker_similarity'))}</td>"
                f"<td class='num'>{_num(m.get('duration_ratio'))}</td>"
                f"<td class='num'>{_num(m.get('stop_rate'))}</td></tr>"
            )
        out.append("</table>")
    settings = doc.get("settings") or {}
    out.append(
        f'<p class="muted">ASR {html.escape(str(settings.get("asr_model")))}; '
        f"speaker model {html.escape(str(settings.get('speaker_model')))}; "
        f"model {html.escape(str(settings.get('model')))}; adapter {html.escape(str(settings.get('adapter')))}</p>"
    )
    out.append(
        '<h3>Per clip</h3><table class="eval-clips">'
        "<tr><th>id</th><th>lang</th><th>text / transcript</th><th>WER</th><th>CER</th><th>SIM</th>"
        "<th>dur. ratio</th><th>stopped</th><th>output</th></tr>"
    )
    eval_dir = run_dir / EVAL_RESULTS.parent
    for c in doc.get("clips", []):
        wav = eval_dir / c["wav"] if c.get("wav") else None
        player = (
            _player(wav, c["id"], budget, run_dir)
            if wav is not None and wav.is_file()
            else '<span class="muted">no file</span>'
        )
        stopped = '<span class="ok">yes</span>' if c.get("stopped") else '<span class="bad">no (hit max length)</span>'
        out.append(
            f"<tr><td class='id'>{html.escape(str(c.get('id')))}</td><td>{html.escape(str(c.get('language')))}</td>"
            f"<td class='txt'><bdi>{html.escape(str(c.get('text')))}</bdi><br>"
            f"<bdi class='muted'>{html.escape(str(c.get('transcript')))}</bdi></td>"
            f"<td class='num'>{_num(c.get('wer'), 3)}</td><td class='num'>{_num(c.get('cer'), 3)}</td>"
            f"<td class='num'>{_num(c.get('speaker_similarity'), 3)}</td>"
            f"<td class='num'>{_num(c.get('duration_ratio'), 3)}</td>"
            f"<td>{stopped}</td><td>{player}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def render_report(data: RunData, *, max_audio_mb: float = 100.0) -> str:
    """The whole page as one HTML string (CSS inline, charts inline SVG, audio as data URIs)."""
    budget = _AudioBudget(int(max_audio_mb * 1024 * 1024))
    cfg = data.config or {}
    model = (cfg.get("model") or {}).get("name_or_path", "?") if isinstance(cfg.get("model"), dict) else "?"
    ft = cfg.get("finetune") if isinstance(cfg.get("finetune"), dict) else {}
    last = data.train[-1] if data.train else {}
    subtitle = (
        f"model {model} · {ft.get('mode', '?')} fine-tuning · "
        f"{len(data.train)} train / {len(data.eval)} eval log points"
    )
    if last:
        subtitle += f" · last step {last['step']}, loss {_num(last.get('loss'))}"
    sections: list[tuple[str, str, str]] = []

    charts = loss_charts(data)
    body = (
        '<div class="charts">' + "".join(charts) + "</div>" if charts else '<p class="muted">No metrics logged yet.</p>'
    )
    sections.append(("curves", "Loss curves", body))

    if data.quality is not None:

        def player(path: Path, label: str) -> str:
            return _player(path, label, budget, data.run_dir)

        sections.append(("quality", "Quality during training", quality_section(data.quality, data.run_dir, player)))

    if data.warnings:
        rows = "".join(
            f"<tr class='warn'><td>{html.escape(w['code'])}</td><td class='num'>{_num(w['step'])}</td>"
            f"<td class='num'>{_num(w['last_step'])}</td><td class='num'>{_num(w['count'])}</td>"
            f"<td>{html.escape(w['message'])}</td></tr>"
            for w in data.warnings
        )
        body = (
            '<table class="warnings"><tr><th>warning</th><th>first step</th><th>last step</th><th>times</th>'
            f"<th>message</th></tr>{rows}</table>"
        )
    else:
        body = '<p class="ok">No health warnings were raised.</p>'
    if data.bad_lines:
        body += (
            f'<p class="bad">{data.bad_lines} line(s) of {METRICS_FILE} could not be read '
            "(a write torn by a crash?).</p>"
        )
    sections.append(("health", "Health warnings", body))

    if data.param_report is not None:
        body = f"<details><summary>parameter report</summary><pre>{html.escape(data.param_report)}</pre></details>"
        sections.append(("params", "Parameters", body))

    if data.samples:
        parts = []
        for step, wavs in data.samples:
            status = data.sample_status.get(step, {})
            prompts = data.sample_prompts.get(step, {})
            players = "".join(
                _sample_block(w, budget, data.run_dir, status.get(w.name), prompts.get(w.name)) for w in wavs
            )
            parts.append(f'<h3>step {step}</h3><div class="players">{players}</div>')
        sections.append(("samples", "Samples", "".join(parts)))
    else:
        sections.append(
            (
                "samples",
                "Samples",
                '<p class="muted">No samples (set train.sample_steps to generate some during training).</p>',
            )
        )

    if data.eval_results is not None:
        sections.append(("evaluation", "Evaluation", _eval_section(data.eval_results, budget, data.run_dir)))

    if data.config_text is not None:
        sections.append(
            (
                "config",
                "Config",
                f"<details><summary>config.yaml</summary><pre>{html.escape(data.config_text)}</pre></details>",
            )
        )

    if budget.skipped:
        note = (
            f'<p class="bad">{len(budget.skipped)} audio file(s) were not embedded: the page holds at most '
            f"{max_audio_mb:g} MB of audio (--max-audio-mb).</p>"
        )
        sections.insert(0, ("note", "Note", note))

    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    title = f"higgs-tune run {data.run_dir.name}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR_MARK}<title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f"<body><header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"
        f'<p class="muted">generated {html.escape(time.strftime("%Y-%m-%d %H:%M:%S"))} '
        f"from {html.escape(str(data.run_dir.resolve()))}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def written_by_report(path: Path) -> bool:
    """Does the file at `path` start like a page this module renders (its generator mark)?"""
    try:
        with path.open("rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    return any(mark.encode("utf-8") in head for mark in (GENERATOR_MARK, _EARLIER_MARK))


def build_report(run_dir: str | Path, out: str | Path | None = None, *, max_audio_mb: float = 100.0) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html); returns its path.

    An earlier report is replaced; any other existing file is refused (OutputDirError), never
    written over."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder. Fix: give --out a file name, e.g. {path / REPORT_FILE}.")
    if path.exists() and not written_by_report(path):
        raise OutputDirError(
            f"{path} exists and was not written by `higgs-tune report`; it is left as it is. "
            "Fix: pass --out with another file name, or move that file away."
        )
    data = collect_run(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = out is None and (not path.exists() or REPORT_FILE in owned_names(run_dir))
    atomic_write_bytes(path, render_report(data, max_audio_mb=max_audio_mb).encode("utf-8"))
    if ours:
        claim(run_dir, REPORT_FILE)  # --overwrite of the run folder may remove it
    return path
