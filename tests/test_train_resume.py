"""Exact resume through the real CLI: SIGKILL between saves and in the middle of a save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_support import small_config
from safetensors.torch import load_file

from higgs_tune.train.recipe import train

HERE = Path(__file__).resolve().parent
KEYS = (
    "loss",
    "text_loss",
    "audio_loss",
    "per_codebook_loss",
    "per_codebook_acc",
    "grad_norm",
    "lr",
    "n_audio_tokens",
    "n_text_tokens",
)


def _train_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    out = {}
    for r in rows:
        if r.get("event") == "metrics" and r.get("split") == "train":
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = {k: r[k] for k in KEYS}
    return out


def _launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # unbuffered and wide: a SIGKILLed process loses buffered output, and paths must not wrap
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "500",
    }
    return subprocess.run(
        [sys.executable, str(HERE / "kill_harness.py"), str(config), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow  # one straight run, then 4 training subprocesses killed and resumed: ~65 s on 2 busy cores
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tiny_dir, demo_cache, tmp_path):
    overrides = [
        "train.max_steps=8",
        "train.log_steps=1",
        "train.warmup_steps=2",
        "checkpoint.save_steps=2",
        "checkpoint.save_total_limit=2",
    ]
    straight = train(small_config(tiny_dir, demo_cache, None, tmp_path / "straight", overrides))
    expected = _train_metrics(straight.run_dir)
    assert sorted(expected) == list(range(1, 9))

    run_dir = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    small_config(tiny_dir, demo_cache, None, run_dir, overrides).save(config)

    # 1. killed after step 3 (checkpoint-2 exists, checkpoint-4 not yet)
    p = _launch(config, "--kill", "log:3")
    assert p.returncode == -9, p.stderr[-3000:]
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "checkpoint-4").exists()

    # 2. resumed from checkpoint-2, killed while writing checkpoint-6
    p = _launch(config, "--resume", "auto", "--kill", "save:6")
    assert p.returncode == -9, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr and "checkpoint-2" in p.stdout + p.stderr
    assert not (run_dir / "checkpoint-6").exists(), "a torn save must never carry a checkpoint name"
    assert list(run_dir.glob(".tmp-checkpoint-6-*")), "the interrupted save stays a temporary folder"

    # 3. resumed from checkpoint-4 (the newest complete one), runs to the end
    p = _launch(config, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "checkpoint-4" in out and "checkpoint-6" not in out.split("resumed from")[1].splitlines()[0]
    assert not list(run_dir.glob(".tmp-*")), "leftover temporary folders are removed"

    resumed = _train_metrics(run_dir)
    assert resumed == expected  # every step's losses, accuracies, grad norm and LR, bit for bit
    a = load_file(straight.final_dir / "adapter_model.safetensors")
    b = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
