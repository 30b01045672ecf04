"""`higgs-tune report`: the HTML page of a run, checked as parsed HTML and in headless Chromium.

The run folder is written with the training code's own writers (`MetricsLogger`,
`HealthWarning`) so the page is tested against the real metrics.jsonl format.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from higgs_tune.app.charts import Series, nice_ticks, svg_line_chart
from higgs_tune.app.cli import main
from higgs_tune.app.report import build_report
from higgs_tune.errors import DataError, OutputDirError
from higgs_tune.infer.evaluate import CSV_COLUMNS, write_results
from higgs_tune.infer.generate import write_wav
from higgs_tune.train.health import HealthWarning
from higgs_tune.train.logging import MetricsLogger

CHROMIUM = Path("/usr/bin/chromium")
STEPS = list(range(0, 121, 10))  # 13 train log points
EVAL_STEPS = [40, 80, 120]
K = 8
PARAMS = "parameters (lora fine-tuning; dtype float32: 1,436,224)\n  total 98,304 trainable\n"
CHART_TITLES = [
    "Total loss",
    "Text loss",
    "Audio loss (mean over codebooks)",
    "Per-codebook audio loss (train)",
    "Per-codebook audio loss (eval)",
    "Learning rate",
    "Gradient norm (before clipping)",
]
# plot area of svg_line_chart's default 640 x 300 chart (margins 64/16/40/44)
PLOT_X, PLOT_Y = (64.0, 624.0), (40.0, 256.0)


def _codebooks(step: int, shift: float = 0.0) -> list[float]:
    return [6.9 * math.exp(-step / (40 + 10 * k)) + 0.5 + 0.1 * k + shift for k in range(K)]


def _metrics(step: int, shift: float = 0.0) -> dict:
    cb = _codebooks(step, shift)
    audio, text = sum(cb) / K, 3.0 * math.exp(-step / 30) + 0.3 + shift
    return {"loss": audio + text, "text_loss": text, "audio_loss": audio, "per_codebook_loss": cb}


def _sine(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    with MetricsLogger(run, ["none"]) as log:
        for step in STEPS:
            m = _metrics(step)
            if step == 60:
                m["audio_loss"] = float("nan")  # logged as null: the curve has a gap there
            log.log(step, {**m, "lr": 3e-3 * min(1.0, (step + 1) / 10), "grad_norm": 5 * math.exp(-step / 50) + 0.1})
            if step in EVAL_STEPS:
                log.log(step, _metrics(step, shift=0.2), split="eval")
        warning = HealthWarning("no_eos", 3, "No stream EOS label in the batch: the model never learns to stop.")
        log.log_warning(warning)
        warning.count, warning.last_step = 2, 9
        log.log_warning(warning)
        log.log_warning(HealthWarning("chance_level", 50, "Audio loss is still at chance level (ln 1026 = 6.93)."))
        # what the recipe logs after writing the samples of a step
        log.log_event(
            "samples",
            60,
            folder=str(run / "samples" / "step-60"),
            files=["sample-0.wav", "sample-1.wav"],
            stopped=[True, False],
            frames=[5, 40],
        )
    (run / "param_report.txt").write_text(PARAMS, encoding="utf-8")
    (run / "config.yaml").write_text(
        "model:\n  name_or_path: /models/tiny\nfinetune:\n  mode: lora\n", encoding="utf-8"
    )
    for step in (60, 120):
        for i in range(2):
            write_wav(run / "samples" / f"step-{step}" / f"sample-{i}.wav", _sine(0.2, 220 + 110 * i), 24000)
    clips = []
    for i, (cid, lang, text) in enumerate(
        [("en_a_008", "en", "The library opens early."), ("ar_a_010", "ar", "شكرا لك على المساعدة.")]
    ):
        write_wav(run / "eval" / "wavs" / f"{cid}.wav", _sine(0.3, 330), 24000)
        clips.append(
            {
                **dict.fromkeys(CSV_COLUMNS),
                "id": cid,
                "language": lang,
                "text": text,
                "transcript": "x",
                "wer": 1.0,
                "cer": 0.9,
                "speaker_similarity": 0.5 + i / 10,
                "duration_ratio": 1.25,
                "stopped": i == 0,
                "wav": f"wavs/{cid}.wav",
            }
        )
    summary = {
        "num_clips": 2,
        "wer": 1.0,
        "cer": 0.9,
        "speaker_similarity": 0.55,
        "speaker_similarity_gt": 0.5,
        "duration_ratio": 1.25,
        "stop_rate": 0.5,
    }
    write_results(
        run / "eval",
        {
            "format": "higgs-tune-eval",
            "format_version": 1,
            "summary": summary,
            "per_language": {"en": summary, "ar": summary},
            "settings": {"asr_model": "tiny-asr", "speaker_model": "tiny-spk", "model": "m", "adapter": "a"},
            "clips": clips,
        },
    )
    return run


class _Page(HTMLParser):
    """What the checks need from a page: charts (title -> {series: points}), audio sources, tables, pre."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
        self.audio: list[str] = []
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.cells: list[str] = []
        self.pre: list[str] = []
        self._chart = None
        self._in = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self._in.append(tag)
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "svg":
            self._chart = a["aria-label"]
            self.charts[self._chart] = {}
        elif tag == "path" and "series" in (a.get("class") or ""):
            subpaths = [
                [(float(x), float(y)) for x, y in re.findall(r"[ML]([\d.]+),([\d.]+)", part)]
                for part in re.split(r"(?=M)", a["d"])
                if part.strip()
            ]
            self.charts[self._chart][a["data-series"]] = subpaths
        elif tag == "audio":
            self.audio.append(a["src"])
        elif tag in ("td", "pre"):
            (self.cells if tag == "td" else self.pre).append("")

    def handle_endtag(self, tag):
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data):
        if "td" in self._in and self.cells:
            self.cells[-1] += data
        if "pre" in self._in and self.pre:
            self.pre[-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _check_page(page: _Page, run: Path) -> None:
    assert list(page.charts) == CHART_TITLES
    total = page.charts["Total loss"]
    assert [len(p) for p in total["train"]] == [13] and [len(p) for p in total["eval"]] == [3]
    # losses fall, so the curve goes down the page: y grows strictly
    ys = [y for _, y in total["train"][0]]
    assert ys == sorted(ys) and len(set(ys)) == 13
    xs = [x for x, _ in total["train"][0]]
    assert xs[0] == PLOT_X[0] and xs[-1] == PLOT_X[1]  # steps 0..120 span the plot exactly
    # the NaN audio loss at step 60 breaks the train curve into two sub-paths
    assert [len(p) for p in page.charts["Audio loss (mean over codebooks)"]["train"]] == [6, 6]
    assert list(page.charts["Per-codebook audio loss (train)"]) == [f"cb{k}" for k in range(K)]
    assert all([len(p) for p in s] == [13] for s in page.charts["Per-codebook audio loss (train)"].values())
    assert all([len(p) for p in s] == [3] for s in page.charts["Per-codebook audio loss (eval)"].values())
    for chart in page.charts.values():
        for subpaths in chart.values():
            for x, y in (pt for sub in subpaths for pt in sub):
                assert PLOT_X[0] - 0.05 <= x <= PLOT_X[1] + 0.05 and PLOT_Y[0] - 0.05 <= y <= PLOT_Y[1] + 0.05

    # players: 2 steps x 2 samples, then the 2 evaluation outputs, the WAV bytes inline
    files = [run / "samples" / f"step-{s}" / f"sample-{i}.wav" for s in (60, 120) for i in range(2)]
    files += [run / "eval" / "wavs" / "en_a_008.wav", run / "eval" / "wavs" / "ar_a_010.wav"]
    assert len(page.audio) == len(files)
    for src, path in zip(page.audio, files, strict=True):
        assert src.startswith("data:audio/wav;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == path.read_bytes()
    # self-contained: nothing is loaded from elsewhere, nothing runs
    assert all(s.startswith("data:") for s in page.srcs)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags

    cells = [c.strip() for c in page.cells]
    i = cells.index("no_eos")
    assert cells[i : i + 5] == [
        "no_eos",
        "3",
        "9",
        "2",
        "No stream EOS label in the batch: the model never learns to stop.",
    ]
    assert cells[cells.index("chance_level") + 1] == "50"
    assert cells[cells.index("WER") + 1] == "1.0000"
    assert cells[cells.index("stop rate (ended by itself)") + 1] == "0.5000"
    assert "شكرا لك على المساعدة.x" in cells  # text and transcript of the Arabic clip
    assert page.pre[0] == PARAMS


# ----------------------------------------------------------------------------- the page
def test_report_html_structure(run_dir):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    _check_page(_parse(text), run_dir)
    assert '<div>sample-0 &middot; 5 frames, <span class="ok">ended by itself</span></div>' in text
    assert '<div>sample-1 &middot; 40 frames, <span class="bad">did not stop (length limit)</span></div>' in text
    assert "<div>sample-0</div>" in text  # step 120 has no samples record: no status shown


def test_report_cli_and_errors(run_dir, tmp_path):
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0 and result.output == f"report written to {out}\n"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty'} has no metrics.jsonl: it is not a higgs-tune run folder" in result.output
    with pytest.raises(DataError, match="does not exist"):
        build_report(tmp_path / "nowhere")


def test_report_replaces_its_own_page_and_never_a_users_file(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    first = build_report(run).read_bytes()
    assert b'<meta name="generator" content="higgs-tune report">' in first
    (run / "report.html").write_bytes(first + b"<!-- stale -->")
    assert b"<!-- stale -->" not in build_report(run).read_bytes()  # an earlier report is replaced

    mine = tmp_path / "notes.html"
    mine.write_text("<html>my own notes</html>", encoding="utf-8")
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(mine)])
    assert result.exit_code == 2, result.output
    assert f"{mine} exists and was not written by `higgs-tune report`; it is left as it is." in " ".join(
        result.output.split()
    )
    assert mine.read_text(encoding="utf-8") == "<html>my own notes</html>"
    (run / "report.html").write_text("a user's page", encoding="utf-8")
    with pytest.raises(OutputDirError, match="Fix: pass --out with another file name"):
        build_report(run)
    assert (run / "report.html").read_text(encoding="utf-8") == "a user's page"
    with pytest.raises(OutputDirError, match="is a folder"):
        build_report(run, run / "samples")


def test_audio_budget_and_torn_lines(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event": "metrics", "step": 130, "spl')  # a write torn by a crash
    text = build_report(run, max_audio_mb=0.02).read_text(encoding="utf-8")  # 20 KB: one 0.2 s clip (9.6 KB) fits twice
    page = _parse(text)
    assert len(page.audio) == 2
    assert "4 audio file(s) were not embedded: the page holds at most 0.02 MB of audio (--max-audio-mb)." in text
    assert "not embedded (size limit): samples/step-120/sample-0.wav" in text
    assert "1 line(s) of metrics.jsonl could not be read" in text


# ----------------------------------------------------------------------------- the chart code
def test_nice_ticks():
    assert nice_ticks(0, 7.75) == [0, 2, 4, 6, 8]
    assert nice_ticks(0, 120, 6) == [0, 20, 40, 60, 80, 100, 120]
    assert nice_ticks(0.31, 0.78) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert nice_ticks(2.0, 2.0) == [1.8, 1.9, 2.0, 2.1, 2.2]


def test_chart_edge_cases():
    one = _parse(svg_line_chart("One point", [Series("a", [(5, 1.0)])]))
    assert one.charts["One point"]["a"] == [[(344.0, 148.0)]]  # centred in the padded range, drawn with a dot
    assert "<circle" in svg_line_chart("One point", [Series("a", [(5, 1.0)])])
    empty = svg_line_chart("Nothing", [Series("a", [(1, None), (2, float("inf"))])])
    assert "no data" in empty and "<path" not in empty
    log = _parse(svg_line_chart("Log", [Series("g", [(0, 10.0), (1, 1.0), (2, 0.0), (3, 0.1)])], log_y=True))
    assert [len(p) for p in log.charts["Log"]["g"]] == [2, 1]  # 0 has no logarithm: a gap
    escaped = svg_line_chart("<b>&", [Series("x<y", [(0, 1.0), (1, 2.0)])])
    assert "<b>" not in escaped and "&lt;b&gt;&amp;" in escaped and 'data-series="x&lt;y"' in escaped


# ----------------------------------------------------------------------------- in a browser
def _chromium(*args: str, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=timeout, check=True)


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_report_renders_in_chromium(run_dir, tmp_path):
    path = build_report(run_dir)
    dom = _chromium("--dump-dom", path.resolve().as_uri(), tmp=tmp_path).stdout
    _check_page(_parse(dom), run_dir)

    shot = tmp_path / "report.png"
    _chromium(
        "--window-size=1400,2400", "--hide-scrollbars", f"--screenshot={shot}", path.resolve().as_uri(), tmp=tmp_path
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1400, 2400)
    assert len(png) > 50_000  # a blank page compresses to a few KB; charts and tables do not
