"""FSDP (FSDP2, two processes on CPU, gloo): training runs sharded, a checkpoint holds the full
(gathered) weights and optimizer state, and a resumed run continues exactly."""

from __future__ import annotations

import pytest
import torch
from recipe_support import run_folder_at_checkpoint, small_config, torchrun2, train_losses
from safetensors.torch import load_file

# torchrun, two processes: 20-90 s on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}


def test_fsdp_two_processes_save_full_state_and_resume_exactly(tiny_dir, demo_cache, tmp_path):
    overrides = ["train.max_steps=4", "train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=2"]
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    small_config(tiny_dir, demo_cache, None, run, overrides).save(config)
    p = torchrun2("fsdp_train_script.py", str(config), env=FSDP_ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "2 process(es)" in p.stdout and "trained parameter types: ['DTensor']" in p.stdout
    assert all(norm > 0 for _, norm in train_losses(run).values())  # clipping sees the sharded gradients

    # the checkpoint holds the full optimizer state, keyed by parameter name, for every trained tensor
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["optimizer_layout"] == "full-fqn"
    adapter = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    opt_state = state["optimizer"]["state"]
    assert len(opt_state) == len(adapter) > 0
    assert all(isinstance(name, str) and name.startswith("model.") for name in opt_state)
    # full, not one rank's shard: the optimizer moments and the adapter have the same sizes
    assert sorted(s["exp_avg"].numel() for s in opt_state.values()) == sorted(v.numel() for v in adapter.values())

    # resume from checkpoint-2 in two processes: steps 3-4 and the final weights equal the uninterrupted run
    resumed = run_folder_at_checkpoint(run, 2, tmp_path / "resumed")
    config2 = tmp_path / "resumed.yaml"
    small_config(tiny_dir, demo_cache, None, resumed, overrides).save(config2)
    p = torchrun2("fsdp_train_script.py", str(config2), "--resume", "auto", env=FSDP_ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert train_losses(resumed) == train_losses(run)
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (run, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
