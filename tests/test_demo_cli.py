"""The README's main command, `higgs-tune demo`, end to end through the CLI (fewer steps)."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from higgs_tune.app.cli import main


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the root logger for people (rich, INFO); later tests expect pytest's."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_demo_command_trains_evaluates_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    # fewer steps than the preset's warm-up (10): the warm-up is scaled down, not an error after the caches
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--max-steps", "8"])
    assert result.exit_code == 0, result.output
    run = out / "run"
    report = run / "report.html"
    assert str(report) in result.output
    html = report.read_text(encoding="utf-8")
    assert "<svg" in html and "<audio" in html and "Evaluation" in html
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m.get("event") == "metrics" and m["split"] == "train"]
    assert train[-1]["step"] == 8 and train[-1]["audio_loss"] < train[0]["audio_loss"]
    summary = json.loads((run / "eval" / "results.json").read_text())["summary"]
    assert summary["num_clips"] == 6 and set(summary) >= {
        "wer",
        "cer",
        "speaker_similarity",
        "duration_ratio",
        "stop_rate",
    }
    assert (run / "final" / "adapter_model.safetensors").is_file()
    # the step-8 samples went to TensorBoard as audio, beside their WAVs
    wavs = sorted(p.stem for p in (run / "samples" / "step-8").glob("*.wav"))
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(wavs) == 2 and all(f"samples/{w}".encode() in events for w in wavs)
    # the quality evaluation ran at its low frequency: the base model, then the end of the run
    quality = [m for m in metrics if m.get("event") == "metrics" and m["split"] == "quality"]
    assert [m["step"] for m in quality] == [0, 8]
    assert len(list((run / "quality" / "step-8" / "wavs").glob("*.wav"))) == 2
    assert len(list((out / "cache" / "quality-baselines").glob("*.json"))) == 1
    assert 'id="quality"' in html and "base model (step 0)" in html

    # a second run refuses to touch the finished one, and says how to start over
    again = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_demo_config_scales_warmup_and_bad_steps_fail_before_work(tmp_path):
    from higgs_tune.app.demo import demo_config

    assert [demo_config(tmp_path, n).train.warmup_steps for n in (1, 5, 12, 60, 120, 500)] == [0, 0, 1, 5, 10, 10]
    assert demo_config(tmp_path).train.warmup_steps == 10
    bad = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--max-steps", "0"])
    assert bad.exit_code == 2 and "0 is not in the range x>=1" in bad.output
    assert not (tmp_path / "d").exists()
