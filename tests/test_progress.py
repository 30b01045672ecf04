"""Progress: a bar on a terminal, plain periodic lines otherwise, and a callback a UI can use;
followed by train, prepare, evaluate/generate."""

from __future__ import annotations

import io
import re

from click.testing import CliRunner
from recipe_support import small_config

from higgs_tune.app.cli import main as cli
from higgs_tune.data.prepare import prepare_manifest
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, generate_speech
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.progress import CallbackProgress, TerminalProgress
from higgs_tune.train.recipe import train


def _recorder():
    events = []
    return events, CallbackProgress(lambda event, state: events.append((event, dict(state))))


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = TerminalProgress(out, every_s=0, tty=False)
    p.start(4, "train", "steps", done=1)
    p.update(2, loss=2.5, tokens_per_s=1234.5)
    p.update(4, loss=2.25)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"train: 2/4 steps \(50%\) loss 2\.5 tokens/s 1234 elapsed 0:00:00 ETA 0:00:00", lines[0])
    assert lines[1].startswith("train: 4/4 steps (100%) loss 2.25 tokens/s 1234 elapsed")
    quiet = io.StringIO()
    q = TerminalProgress(quiet, every_s=3600, tty=False)
    q.start(10, "encoding", "clips")
    for i in range(1, 10):
        q.update(i)
    assert quiet.getvalue() == ""  # periodic: nothing before the period, except the last
    q.update(10)
    assert quiet.getvalue().startswith("encoding: 10/10 clips (100%)")


def test_bar_on_a_terminal():
    out = io.StringIO()
    p = TerminalProgress(out, tty=True)
    p.start(3, "generating", "clips")
    for i in (1, 2, 3):
        p.update(i)
    p.close()
    text = out.getvalue()
    assert "generating" in text and "3/3" in text and "ETA" in text


def test_train_reports_every_step(tiny_dir, demo_cache, tmp_path):
    events, progress = _recorder()
    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", ["train.max_steps=3", "train.warmup_steps=0"])
    train(cfg, progress=progress)
    assert events[0] == ("start", {**events[0][1], "total": 3, "done": 0, "desc": "train", "unit": "steps"})
    updates = [s for e, s in events if e == "update"]
    assert [u["done"] for u in updates] == [1, 2, 3]
    assert all(u["loss"] > 0 and u["tokens_per_s"] > 0 for u in updates)
    assert updates[-1]["eta_s"] == 0 and events[-1][0] == "close"


def test_prepare_and_generate_report_progress(tiny_dir, demo_heldout, tmp_path):
    events, progress = _recorder()
    prepare_manifest(demo_heldout, tiny_dir, tmp_path / "c", progress=progress)
    assert [(e, s["desc"], s["done"], s["total"]) for e, s in events if e != "update"] == [
        ("start", "checking audio", 0, 6),
        ("close", "checking audio", 6, 6),
        ("start", "encoding", 0, 6),
        ("close", "encoding", 6, 6),
    ]
    # the CLI, not on a terminal: plain lines
    res = CliRunner().invoke(
        cli, ["prepare", str(demo_heldout), "--model", str(tiny_dir), "--out", str(tmp_path / "d")]
    )
    assert res.exit_code == 0, res.output
    assert "checking audio: 6/6 files (100%)" in res.output and "encoding: 6/6 clips (100%)" in res.output

    stack = load_inference_stack(tiny_dir, device="cpu")
    events, progress = _recorder()
    reqs = [GenerationRequest(text="Hello."), GenerationRequest(text="Bye.")]
    generate_speech(
        stack.model, stack.processor, stack.tokens, reqs, SamplingOptions(max_new_tokens=8, seed=0), progress=progress
    )
    assert [(e, s["done"]) for e, s in events] == [("start", 0), ("update", 1), ("update", 2), ("close", 2)]
