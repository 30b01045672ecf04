"""Two processes on CPU (torchrun, gloo): identical weights on both ranks, one save per
checkpoint with every rank's RNG state, exact resume in two processes."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_support import run_folder_at_checkpoint, small_config, torchrun2, train_losses
from safetensors.torch import load_file

# torchrun, two processes: 40-65 s on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def train_in_two_processes(stack, cache, run, overrides, weights, *resume) -> dict:
    """Train `run` in two processes (torchrun) from the small demo config; both ranks' trained
    weights are written to `weights`; returns rank 0's after checking rank 1 holds the same."""
    config = run.parent / f"{run.name}.yaml"
    small_config(stack, cache, None, run, overrides).save(config)
    p = torchrun2("dist_train_script.py", str(config), str(weights), *resume)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r0, r1 = (load_file(weights / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and len(r0) > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    return r0


def resume_equals_uninterrupted(stack, cache, run, overrides, tmp_path, r0: dict) -> None:
    """Resume a copy of `run` at checkpoint-2 in two processes: steps 3-4 and the weights equal `run`'s."""
    resumed = run_folder_at_checkpoint(run, 2, tmp_path / "resumed")
    w = train_in_two_processes(stack, cache, resumed, overrides, tmp_path / "weights2", "--resume", "auto")
    assert train_losses(resumed) == train_losses(run)
    for k in r0:
        assert torch.equal(w[k], r0[k]), k


def test_two_processes_train_save_once_and_resume_exactly(tiny_dir, demo_cache, tmp_path):
    overrides = ["train.max_steps=4", "train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=2"]
    run = tmp_path / "run"
    # both ranks hold the same trained weights
    r0 = train_in_two_processes(tiny_dir, demo_cache, run, overrides, tmp_path / "weights")

    # one folder per checkpoint, written once, holding both ranks' RNG states
    assert sorted(x.name for x in run.iterdir() if x.name.startswith(("checkpoint-", "final", ".tmp"))) == [
        "checkpoint-2",
        "final",
    ]
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert json.loads((run / "checkpoint-2" / "manifest.json").read_text())["world_size"] == 2

    # resume from checkpoint-2 in two processes: steps 3-4 equal the uninterrupted run
    resume_equals_uninterrupted(tiny_dir, demo_cache, run, overrides, tmp_path, r0)


def test_v3_two_processes_train_identically_and_resume_exactly(tiny_v3_stack, v3_demo_cache, tmp_path):
    """Higgs Audio v3 (LoRA + the fused audio table as one tied tensor) under DDP: the same
    guarantees as v2, through the same recipe."""
    overrides = [
        "finetune.train_modules=[]",
        "train.max_steps=4",
        "train.log_steps=1",
        "train.warmup_steps=1",
        "checkpoint.save_steps=2",
    ]
    run = tmp_path / "run"
    r0 = train_in_two_processes(tiny_v3_stack, v3_demo_cache, run, overrides, tmp_path / "weights")
    assert any("audio_table" in k for k in r0) and any("lora_" in k for k in r0)
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    resume_equals_uninterrupted(tiny_v3_stack, v3_demo_cache, run, overrides, tmp_path, r0)
