"""Extending a finished run: `--resume auto` with a larger train.max_steps continues it, with the
learning-rate schedule recomputed for the new length (and said so)."""

from __future__ import annotations

import json
import math

import pytest
from recipe_support import small_config

from higgs_tune.errors import CheckpointError, OutputDirError
from higgs_tune.train.recipe import train


def _lrs(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["lr"] for m in rows if m.get("event") == "metrics" and m["split"] == "train"}


def test_resume_auto_with_larger_max_steps_extends_the_run(tiny_dir, demo_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # one console line per message
    base = ["train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=2", "train.learning_rate=1e-3"]
    run_dir = tmp_path / "run"
    first = train(small_config(tiny_dir, demo_cache, None, run_dir, [*base, "train.max_steps=4"]))
    assert first.steps == 4
    capsys.readouterr()
    longer = train(small_config(tiny_dir, demo_cache, None, run_dir, [*base, "train.max_steps=8"]), resume="auto")
    said = capsys.readouterr().out
    assert longer.steps == 8
    lrs = _lrs(run_dir)
    assert sorted(lrs) == list(range(1, 9))
    # steps 5..8 follow the cosine of an 8-step run (warm-up 1): lr(s) = peak * cos-factor((s - 1 - 1) / 7)
    for s in range(5, 9):
        assert lrs[s] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 7)), rel=1e-6)
    # steps 1..4 ran the 4-step schedule: step 4 at progress (4 - 2) / 3
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3)), rel=1e-6)
    assert "resumed from" in said and "step 4" in said
    assert (
        "run length changed (train.max_steps: 4 -> 8): the learning-rate schedule is recomputed for 8 steps; "
        f"the LR at step 5 is {lrs[5]:.3g} (the old schedule had 0)" in said
    )
    assert (run_dir / "final").is_dir()


def test_resume_still_refuses_a_change_that_breaks_it(tiny_dir, demo_cache, tmp_path):
    base = ["train.log_steps=1", "checkpoint.save_steps=2", "train.max_steps=2", "train.warmup_steps=0"]
    run_dir = tmp_path / "run"
    train(small_config(tiny_dir, demo_cache, None, run_dir, base))
    with pytest.raises((OutputDirError, CheckpointError), match=r"train.learning_rate: 0.003 -> 0.001"):
        train(small_config(tiny_dir, demo_cache, None, run_dir, [*base, "train.learning_rate=1e-3"]), resume="auto")
