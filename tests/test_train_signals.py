"""SIGTERM (a cluster scheduler's warning before it kills a job) is handled like Ctrl-C: the step
finishes, a verified checkpoint of it is saved, the resume command is printed, the exit is non-zero;
and `--resume auto` then continues exactly as the uninterrupted run."""

from __future__ import annotations

import signal

from recipe_support import small_config
from test_train_resume import _launch, _train_metrics

from higgs_tune.train.checkpoint import verify_checkpoint
from higgs_tune.train.recipe import train
from higgs_tune.train.signals import StopSignals, TrainingInterrupted

OVERRIDES = ["train.max_steps=6", "train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=2"]


def test_sigterm_saves_this_step_prints_resume_and_resume_equals_uninterrupted(tiny_dir, demo_cache, tmp_path):
    straight = train(small_config(tiny_dir, demo_cache, None, tmp_path / "straight", OVERRIDES))
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    small_config(tiny_dir, demo_cache, None, run_dir, OVERRIDES).save(config)

    p = _launch(config, "--kill", "term-log:3")
    assert p.returncode == 143, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "SIGTERM received: saving checkpoint-3 before stopping" in out
    assert f"the newest complete checkpoint is {run_dir / 'checkpoint-3'} (step 3). Continue with:" in out
    assert f"higgs-tune train {config} --resume auto" in out
    verify_checkpoint(run_dir / "checkpoint-3")  # complete and verified (raises otherwise)
    assert not (run_dir / "final").exists() and sorted(_train_metrics(run_dir)) == [1, 2, 3]

    p = _launch(config, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert _train_metrics(run_dir) == _train_metrics(straight.run_dir)  # bit for bit


def test_sigterm_when_this_step_is_saved_does_not_save_twice(tiny_dir, demo_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    small_config(tiny_dir, demo_cache, None, run_dir, OVERRIDES).save(config)
    p = _launch(config, "--kill", "term-log:4")  # checkpoint-4 is a regular save of this step
    assert p.returncode == 143, p.stderr[-3000:]
    assert "SIGTERM received: checkpoint-4 is already saved; stopping" in p.stdout + p.stderr
    assert sorted(d.name for d in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_signal_before_the_loop_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignals():
            signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not interrupted")
    except TrainingInterrupted as e:
        assert (e.signal_name, e.step, e.exit_code) == ("SIGTERM", None, 143)
    assert signal.getsignal(signal.SIGTERM) is before
    with StopSignals() as stop:
        stop.armed = True
        signal.raise_signal(signal.SIGTERM)  # recorded, not raised: the loop saves first
        assert stop.signal_name == "SIGTERM"
