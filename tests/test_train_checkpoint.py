"""Checkpoints: exact files, verified, never torn, failures handled by policy, exact resume.

Everything trains the real tiny model with the loop of tests/checkpoint_harness.py ("head":
full fine-tune of audio_lm_head saved with safetensors; "lora": a PEFT adapter).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import checkpoint_harness as H
import numpy as np
import pytest
import torch
import yaml

from higgs_tune.errors import CheckpointError
from higgs_tune.runfs import format_bytes
from higgs_tune.train import checkpoint as ck
from higgs_tune.train import distributed as dist_utils
from higgs_tune.train.checkpoint import (
    CheckpointManager,
    find_resume_checkpoint,
    load_training_state,
    verify_checkpoint,
)

HARNESS = Path(__file__).with_name("checkpoint_harness.py")
STEPS = 8
EVAL = ["train.eval_steps=2", "data.eval_fraction=0.1"]  # keep_best needs an eval split


# ---------------------------------------------------------------- helpers


def new_run(tiny_dir: Path, mode: str = "head", seed: int = H.SEED, steps: int = STEPS) -> SimpleNamespace:
    """Model, optimizer, scheduler, sampler and data built from scratch, as a fresh process would."""
    H.seed_everything(seed)
    model = H.build_model(tiny_dir, mode)
    opt, sched = H.build_optimizer(model, steps)
    return SimpleNamespace(
        model=model,
        opt=opt,
        sched=sched,
        sampler=H.ToySampler(H.POOL, H.SEED),
        pool=H.make_pool(model.config),
        mode=mode,
    )


def train(run, start: int, stop: int) -> dict[int, float]:
    return H.train_steps(run.model, run.opt, run.sched, run.sampler, run.pool, run.model.config, start, stop)


def new_manager(run, run_dir: Path, tiny_dir: Path, save_weights=None, verify_weights=None, overrides=(), **checkpoint):
    cfg = H.make_config(run_dir, STEPS, overrides, **checkpoint)
    mgr = CheckpointManager(
        run_dir,
        None,
        cfg.checkpoint,
        save_weights or H.save_weights_fn(run.model, run.mode),
        verify_weights or H.verify_weights_fn(tiny_dir, run.model, run.mode),
    )
    return cfg, mgr


def save(mgr, run, cfg, step: int, **kw):
    return mgr.save(
        step,
        optimizer=run.opt,
        scheduler=run.sched,
        sampler_state=run.sampler.state_dict(),
        epoch=run.sampler.epoch,
        metrics={"loss": 1.5},
        config=cfg,
        **kw,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in H.trainable(model).items()}


# ---------------------------------------------------------------- save: layout and verification


def test_save_writes_exactly_these_files_and_they_verify(tmp_path, tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="higgs_tune")
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir, "lora")
    train(run, 0, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cfg, mgr = new_manager(run, run_dir, tiny_dir)

    path = save(mgr, run, cfg, 2, grad_scaler=scaler, eval_loss=2.25)

    assert path == run_dir / "checkpoint-2"
    assert listing(run_dir) == ["checkpoint-2", "checkpoints.json"]
    assert listing(path) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "manifest.json",
        "training_state.pt",
    ]
    manifest = verify_checkpoint(path)
    assert sorted(manifest["files"]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "training_state.pt",
    ]
    for rel, meta in manifest["files"].items():
        assert meta == {
            "bytes": (path / rel).stat().st_size,
            "sha256": hashlib.sha256((path / rel).read_bytes()).hexdigest(),
        }
    assert {
        k: manifest[k]
        for k in ("format", "format_version", "step", "epoch", "final", "world_size", "eval_loss", "metrics")
    } == {
        "format": "higgs-tune-checkpoint",
        "format_version": 1,
        "step": 2,
        "epoch": 0,
        "final": False,
        "world_size": 1,
        "eval_loss": 2.25,
        "metrics": {"loss": 1.5},
    }

    # the training state reads back with the safe loader only, and holds what resume needs
    state = torch.load(path / "training_state.pt", weights_only=True)
    assert sorted(state) == [
        "epoch",
        "grad_scaler",
        "optimizer",
        "rng",
        "sampler_state",
        "scheduler",
        "step",
        "world_size",
    ]
    assert (state["step"], state["epoch"], state["world_size"]) == (2, 0, 1)
    assert state["sampler_state"] == {"epoch": 0, "position": 4}
    assert state["grad_scaler"]["scale"] == 1024.0
    assert state["scheduler"]["last_epoch"] == 2
    assert len(state["optimizer"]["state"]) == len(H.trainable(run.model))
    (rng,) = state["rng"]
    assert rng["python"]["state"].shape == (625,) and rng["numpy"]["keys"].shape == (624,) and rng["cuda"] is None
    assert H.saved_rng_digest(rng) == H.live_rng_digest()  # saving drew no random numbers

    text = (path / "config.yaml").read_text()
    assert text.startswith(ck.CONFIG_HEADER)
    assert yaml.safe_load(text) == cfg.to_dict()
    assert json.loads((run_dir / "checkpoints.json").read_text()) == {
        "latest": "checkpoint-2",
        "best": {"name": "checkpoint-2", "step": 2, "eval_loss": 2.25},
        "final": None,
        "checkpoints": [
            {
                "name": "checkpoint-2",
                "step": 2,
                "eval_loss": 2.25,
                "bytes": sum(m["bytes"] for m in manifest["files"].values()),
            }
        ],
    }

    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert f"checkpoint: saving step 2 to {path} (attempt 1)" in logs
    saved_line = next(
        r.getMessage() for r in caplog.records if r.getMessage().startswith(f"checkpoint: saved {path} in ")
    )
    assert (
        "adapter_model.safetensors (" in saved_line
        and "training_state.pt (" in saved_line
        and "free on the disk" in saved_line
    )


def test_final_save_goes_to_final_and_is_never_rotated(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, save_total_limit=1)
    save(mgr, run, cfg, 2)
    assert save(mgr, run, cfg, 8, final=True) == run_dir / "final"
    save(mgr, run, cfg, 4)
    save(mgr, run, cfg, 6)
    assert listing(run_dir) == ["checkpoint-6", "checkpoints.json", "final"]
    assert listing(run_dir / "final") == ["config.yaml", "manifest.json", "trainable.safetensors", "training_state.pt"]
    assert verify_checkpoint(run_dir / "final")["final"] is True
    # auto-resume takes the newest step; final (step 8) wins over checkpoint-6
    assert find_resume_checkpoint(run_dir) == run_dir / "final"
    assert json.loads((run_dir / "checkpoints.json").read_text())["final"] == "final"


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_resume_equals_uninterrupted_training(tmp_path, tiny_dir, mode):
    k = 4  # 8 clips drawn from a pool of 6: the data position is mid-way through epoch 1
    uninterrupted = new_run(tiny_dir, mode)
    expected = train(uninterrupted, 0, STEPS)
    expected_weights = weights(uninterrupted.model)

    first = new_run(tiny_dir, mode)
    run_dir = tmp_path / "run"
    cfg, mgr = new_manager(first, run_dir, tiny_dir)
    assert train(first, 0, k) == {s: expected[s] for s in range(1, k + 1)}
    save(mgr, first, cfg, k)
    del first, mgr

    # a fresh "process": other seeds, everything rebuilt from the files
    resumed = new_run(tiny_dir, mode, seed=987654)
    ckpt = find_resume_checkpoint(run_dir, "auto")
    assert ckpt == run_dir / f"checkpoint-{k}"
    H.load_weights(resumed.model, ckpt, mode)
    state = load_training_state(ckpt, optimizer=resumed.opt, scheduler=resumed.sched, world_size=1, rank=0, config=cfg)
    resumed.sampler.load_state_dict(state.sampler_state)
    assert (state.step, state.epoch, state.sampler_state, state.metrics, state.rng_warnings) == (
        k,
        1,
        {"epoch": 1, "position": 2},
        {"loss": 1.5},
        [],
    )

    got = train(resumed, state.step, STEPS)

    assert got == {s: expected[s] for s in range(k + 1, STEPS + 1)}  # bit-exact floats
    final = weights(resumed.model)
    assert final.keys() == expected_weights.keys()
    assert all(torch.equal(final[n], expected_weights[n]) for n in final)


def test_resume_without_the_rng_states_would_differ(tmp_path, tiny_dir):
    """Control for the test above: the loop really depends on the restored random streams."""
    k = 3
    expected = train(new_run(tiny_dir), 0, STEPS)
    first = new_run(tiny_dir)
    cfg, mgr = new_manager(first, tmp_path / "run", tiny_dir)
    train(first, 0, k)
    ckpt = save(mgr, first, cfg, k)
    resumed = new_run(tiny_dir, seed=987654)
    H.load_weights(resumed.model, ckpt, "head")
    state = load_training_state(ckpt, optimizer=resumed.opt, scheduler=resumed.sched, world_size=1, rank=0)
    resumed.sampler.load_state_dict(state.sampler_state)
    H.seed_everything(987654)  # throw the restored RNG states away
    got = train(resumed, k, STEPS)
    assert all(got[s] != expected[s] for s in got)


def test_resume_refuses_a_changed_config_or_world_size(tmp_path, tiny_dir, caplog):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir)
    ckpt = save(mgr, run, cfg, 1)
    fresh = new_run(tiny_dir)

    changed = H.make_config(run_dir, STEPS)
    changed.train.learning_rate = 2e-2
    changed.data.max_batch_size = 4
    with pytest.raises(CheckpointError) as e:
        load_training_state(ckpt, optimizer=fresh.opt, scheduler=fresh.sched, world_size=1, rank=0, config=changed)
    assert str(e.value) == (
        f"the config changes settings that {ckpt} must keep to resume exactly:\n"
        "  data.max_batch_size: 16 -> 4\n"
        "  train.learning_rate: 0.01 -> 0.02\n"
        f"Restore them to resume, or start a new run from its weights with --resume-weights-only {ckpt}."
    )

    with pytest.raises(CheckpointError) as e:
        load_training_state(ckpt, optimizer=fresh.opt, scheduler=fresh.sched, world_size=2, rank=0, config=cfg)
    assert str(e.value) == (
        f"{ckpt} was saved by 1 process(es), this run has 2: the data order and the per-rank random streams cannot "
        "continue exactly. Launch 1 process(es) to resume, or start a new run from its weights with "
        f"--resume-weights-only {ckpt}."
    )

    # settings that do not affect the trajectory may change
    relaxed = H.make_config(run_dir, STEPS, save_steps=4, save_total_limit=None)
    relaxed.train.log_steps = 1
    relaxed.model.attn_implementation = "eager"
    assert (
        load_training_state(ckpt, optimizer=fresh.opt, scheduler=fresh.sched, world_size=1, rank=0, config=relaxed).step
        == 1
    )

    # a different set of trained parameters is caught before torch mixes the states up
    other = new_run(tiny_dir, "lora")
    with pytest.raises(CheckpointError, match=r"parameter group 0 has \d+ parameters now, 1 in the checkpoint"):
        load_training_state(ckpt, optimizer=other.opt, scheduler=other.sched, world_size=1, rank=0)


def test_max_steps_change_breaks_resume_unless_the_schedule_is_constant():
    base = H.make_config(Path("/r"), 10).to_dict()
    longer = H.make_config(Path("/r"), 20)
    assert ck.resume_config_changes(base, longer) == ["train.max_steps: 10 -> 20"]
    base["train"]["lr_scheduler"] = "constant"
    longer.train.lr_scheduler = "constant"
    assert ck.resume_config_changes(base, longer) == []


# ---------------------------------------------------------------- failures


def _partial_then_enospc(path: Path):
    path.write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("policy", ["continue", "abort"])
@pytest.mark.parametrize("stage", ["weights", "training_state", "verify"])
def test_failed_save_keeps_earlier_checkpoints_and_removes_the_temp_folder(
    tmp_path, tiny_dir, monkeypatch, caplog, stage, policy
):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    fail = {"on": False}
    real_save = H.save_weights_fn(run.model, "head")
    real_verify = H.verify_weights_fn(tiny_dir, run.model, "head")

    def save_weights(folder):
        real_save(folder)
        if fail["on"] and stage == "weights":
            _partial_then_enospc(folder / "extra_weights.safetensors")

    def verify_weights(folder):
        if fail["on"] and stage == "verify":
            raise CheckpointError(f"{folder}: the adapter does not load")
        real_verify(folder)

    cfg, mgr = new_manager(run, run_dir, tiny_dir, save_weights, verify_weights, on_save_error=policy)
    save(mgr, run, cfg, 2)
    before = snapshot(run_dir / "checkpoint-2")
    index_before = (run_dir / "checkpoints.json").read_text()

    fail["on"] = True
    if stage == "training_state":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: _partial_then_enospc(Path(f)))
    cause = {
        "weights": "OSError: [Errno 28] No space left on device",
        "training_state": "OSError: [Errno 28] No space left on device",
        "verify": f"CheckpointError: {run_dir}/.tmp-checkpoint-4-{os.getpid()}: the adapter does not load",
    }[stage]
    message = f"saving checkpoint-4 to {run_dir} failed: {cause}"
    caplog.set_level(logging.INFO, logger="higgs_tune")
    if policy == "abort":
        with pytest.raises(CheckpointError) as e:
            save(mgr, run, cfg, 4)
        assert str(e.value) == message + (
            "\nFree space or fix the disk, then resume with --resume auto from the last complete checkpoint."
            if stage != "verify"
            else "\nEarlier checkpoints are intact: fix the cause above, then resume with --resume auto."
        )
        assert isinstance(e.value.__cause__, OSError if stage != "verify" else CheckpointError)
    else:
        assert save(mgr, run, cfg, 4) is None
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [
            message + " -- on_save_error=continue: training goes on and the next save tries again "
            "(1 failed save(s) in a row); earlier checkpoints are intact."
        ]
        # a known failure (disk full, failed verification) is one message, never a traceback
        assert [r.exc_info for r in caplog.records if r.levelno == logging.ERROR] == [None]

    assert listing(run_dir) == ["checkpoint-2", "checkpoints.json"]  # no temp folder, no checkpoint-4
    assert snapshot(run_dir / "checkpoint-2") == before
    assert (run_dir / "checkpoints.json").read_text() == index_before
    verify_checkpoint(run_dir / "checkpoint-2")

    # the next save (the problem gone) works: "continue" retries at the next save
    fail["on"] = False
    monkeypatch.undo()
    assert save(mgr, run, cfg, 6) == run_dir / "checkpoint-6"
    assert listing(run_dir) == ["checkpoint-2", "checkpoint-6", "checkpoints.json"]


def test_final_save_failure_raises_even_with_continue(tmp_path, tiny_dir):
    run = new_run(tiny_dir)
    train(run, 0, 1)

    def save_weights(folder):
        _partial_then_enospc(folder / "model.safetensors")

    cfg, mgr = new_manager(run, tmp_path / "run", tiny_dir, save_weights, on_save_error="continue")
    with pytest.raises(
        CheckpointError,
        match=(
            r"^saving the final checkpoint to .* failed: OSError: \[Errno 28\] No space left on device\nFree space or "
            r"fix the disk, then resume with --resume auto to write the final checkpoint again \(the last complete one "
            r"is still there\)\.$"
        ),
    ):
        save(mgr, run, cfg, STEPS, final=True)
    assert listing(tmp_path / "run") == []


def test_free_space_is_checked_before_writing(tmp_path, tiny_dir, monkeypatch):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, min_free_gb=0.5)
    first = save(mgr, run, cfg, 2)
    size = sum(m["bytes"] for m in verify_checkpoint(first)["files"].values())
    total, used, _ = shutil.disk_usage(run_dir)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(total, used, 1000))
    with pytest.raises(CheckpointError) as e:
        save(mgr, run, cfg, 4)
    assert str(e.value).startswith(
        f"saving checkpoint-4 to {run_dir} failed: CheckpointError: {run_dir}: {format_bytes(1000)} free, a "
        f"checkpoint needs about {format_bytes(size)} plus checkpoint.min_free_gb=0.5 GB kept free. Free space, or "
        "lower checkpoint.save_total_limit."
    )
    assert listing(run_dir) == ["checkpoint-2", "checkpoints.json"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 12 MiB file system (tmpfs), where writes really fail with ENOSPC; needs mount rights."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected-ENOSPC tests cover the logic")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_real_full_disk_leaves_earlier_checkpoints_intact(small_tmpfs, tiny_dir, monkeypatch, caplog):
    run_dir = small_tmpfs / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, on_save_error="continue")
    save(mgr, run, cfg, 2)  # ~6.3 MB
    before = snapshot(run_dir / "checkpoint-2")
    # leave ~1 MB: the next checkpoint cannot fit. Report plenty of space so the pre-check
    # lets the save start and the kernel's ENOSPC is what stops it.
    (small_tmpfs / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - (1 << 20)))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    caplog.set_level(logging.ERROR, logger="higgs_tune")

    assert save(mgr, run, cfg, 4) is None

    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "No space left on device" in error.getMessage() and "on_save_error=continue" in error.getMessage()
    assert listing(run_dir) == ["checkpoint-2", "checkpoints.json"]
    assert snapshot(run_dir / "checkpoint-2") == before
    # with the real numbers, the pre-check refuses before writing anything
    monkeypatch.undo()
    cfg2, mgr2 = new_manager(run, run_dir, tiny_dir)
    with pytest.raises(CheckpointError, match="free, a checkpoint needs about"):
        save(mgr2, run, cfg2, 6)


def test_unsafe_sampler_state_is_refused_at_save_not_at_resume(tmp_path, tiny_dir):
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, tmp_path / "run", tiny_dir)
    with pytest.raises(
        CheckpointError,
        match=r"/\.tmp-checkpoint-1-\d+/training_state.pt cannot be read back with weights_only=True "
        r"\(WeightsUnpickler error: Unsupported global: GLOBAL numpy\.\S+ was not an allowed global by default\)\. "
        r"sampler_state may hold only tensors, numbers, strings, lists, tuples and dicts\.\n"
        r"Earlier checkpoints are intact: fix the cause above, then resume with --resume auto\.$",
    ):
        mgr.save(
            1,
            optimizer=run.opt,
            scheduler=run.sched,
            sampler_state={"order": np.arange(4)},
            epoch=0,
            metrics={},
            config=cfg,
        )
    assert listing(tmp_path / "run") == []


# ---------------------------------------------------------------- damaged and leftover folders


def _three_checkpoints(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, save_total_limit=None)
    for step in (2, 4, 6):
        save(mgr, run, cfg, step)
    return run_dir


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate", "has {half} bytes, the manifest says {size}: the file is truncated or was changed."),
        ("flip", "does not match its sha256 in the manifest: the file is corrupted or was changed."),
        (
            "no_manifest",
            "no manifest.json, so it is not a complete higgs-tune checkpoint (an interrupted save, or another "
            "tool's folder).",
        ),
    ],
)
def test_damaged_newest_checkpoint_is_skipped_by_auto_resume(tmp_path, tiny_dir, caplog, damage, reason):
    run_dir = _three_checkpoints(tmp_path, tiny_dir)
    target = run_dir / "checkpoint-6" / "training_state.pt"
    size = target.stat().st_size
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
        where = target
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[size // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        where = target
    else:
        (run_dir / "checkpoint-6" / "manifest.json").unlink()
        where = run_dir / "checkpoint-6"
    caplog.set_level(logging.INFO, logger="higgs_tune")

    assert find_resume_checkpoint(run_dir, "auto") == run_dir / "checkpoint-4"

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"resume: skipping {run_dir / 'checkpoint-6'}: {where}{':' if damage == 'no_manifest' else ''} "
        + reason.format(half=size // 2, size=size)
    ]
    assert (
        f"resume: using {run_dir / 'checkpoint-4'} (step 4; newest checkpoint whose manifest verifies)"
        in caplog.messages
    )
    # named explicitly, a damaged checkpoint is an error, not silently replaced by another
    with pytest.raises(CheckpointError, match=f"^cannot resume from {run_dir / 'checkpoint-6'}: "):
        find_resume_checkpoint(run_dir, run_dir / "checkpoint-6")


def test_all_checkpoints_damaged_is_an_error_not_a_restart(tmp_path, tiny_dir):
    run_dir = _three_checkpoints(tmp_path, tiny_dir)
    for step in (2, 4, 6):
        (run_dir / f"checkpoint-{step}" / "config.yaml").write_text("changed\n")
    with pytest.raises(CheckpointError) as e:
        find_resume_checkpoint(run_dir)
    assert str(e.value).startswith(f"no usable checkpoint in {run_dir}: all 3 are damaged:\n  checkpoint-6: ")
    assert str(e.value).endswith("Start over with --overwrite, or name a checkpoint from a copy with --resume PATH.")


def test_no_checkpoint_yet_means_start_from_zero(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    (tmp_path / "run").mkdir()
    assert find_resume_checkpoint(tmp_path / "run") is None
    # named explicitly, an empty folder is an error: the user expected a checkpoint there
    with pytest.raises(
        CheckpointError, match=f"^cannot resume from {tmp_path / 'run'}: {tmp_path / 'run'}: no manifest.json"
    ):
        find_resume_checkpoint(tmp_path, tmp_path / "run")


def test_run_folder_named_as_resume_path_resumes_its_newest(tmp_path, tiny_dir):
    run_dir = _three_checkpoints(tmp_path, tiny_dir)
    assert find_resume_checkpoint(tmp_path / "elsewhere", run_dir) == run_dir / "checkpoint-6"
    assert find_resume_checkpoint(tmp_path / "elsewhere", run_dir / "checkpoint-4") == run_dir / "checkpoint-4"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftover_temp_folders_are_ignored_then_removed(tmp_path, tiny_dir, caplog):
    run_dir = _three_checkpoints(tmp_path, tiny_dir)
    dead = _dead_pid()
    tmp = run_dir / f".tmp-checkpoint-8-{dead}"
    shutil.copytree(run_dir / "checkpoint-6", tmp)  # complete-looking, but never published
    old = run_dir / f".old-checkpoint-2-{dead}"
    old.mkdir()
    (old / "training_state.pt").write_bytes(b"half")
    live = run_dir / f".tmp-checkpoint-10-{os.getppid()}"  # a running process's save: not ours to remove
    live.mkdir()
    stray_index = run_dir / f".tmp-checkpoints.json-{dead}"
    stray_index.write_text("{")
    caplog.set_level(logging.INFO, logger="higgs_tune")

    assert find_resume_checkpoint(run_dir) == run_dir / "checkpoint-6"
    assert (
        f"resume: ignoring {tmp}: an unfinished save or removal (process killed mid-way); it is removed at the "
        "next save" in caplog.messages
    )
    assert tmp.exists()  # resume only reads

    run = new_run(tiny_dir)
    new_manager(run, run_dir, tiny_dir)
    assert listing(run_dir) == [live.name, "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoints.json"]
    assert f"checkpoint: removing {tmp}, left by an interrupted save or removal" in caplog.messages
    assert (
        f"checkpoint: leaving {live} alone: process {os.getppid()} is still running (two runs in one folder?)"
        in caplog.messages
    )


def test_saving_over_an_existing_checkpoint_folder_replaces_it_whole(tmp_path, tiny_dir):
    """After resuming from checkpoint-4 because checkpoint-6 was damaged, step 6 is saved again."""
    run_dir = _three_checkpoints(tmp_path, tiny_dir)
    with open(run_dir / "checkpoint-6" / "training_state.pt", "r+b") as f:
        f.truncate(10)
    run = new_run(tiny_dir)
    train(run, 0, 2)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, save_total_limit=None)
    assert save(mgr, run, cfg, 6) == run_dir / "checkpoint-6"
    verify_checkpoint(run_dir / "checkpoint-6")
    assert listing(run_dir) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoints.json"]


# ---------------------------------------------------------------- rotation


def test_rotation_keeps_the_newest_and_the_best(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, overrides=EVAL, save_total_limit=2, keep_best=True)
    for step, loss in [(2, 1.0), (4, 0.5), (6, 0.7), (8, 0.9)]:
        save(mgr, run, cfg, step, eval_loss=loss)
    assert listing(run_dir) == ["checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoints.json"]
    assert mgr.best == run_dir / "checkpoint-4" and mgr.latest == run_dir / "checkpoint-8"
    save(mgr, run, cfg, 10, eval_loss=0.3)  # a new best: the old one may go now
    assert listing(run_dir) == ["checkpoint-10", "checkpoint-8", "checkpoints.json"]
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert (index["latest"], index["best"]) == (
        "checkpoint-10",
        {"name": "checkpoint-10", "step": 10, "eval_loss": 0.3},
    )
    assert [c["name"] for c in index["checkpoints"]] == ["checkpoint-8", "checkpoint-10"]

    # a new manager on the same folder (a resumed run) finds the best again from the manifests
    cfg2, mgr2 = new_manager(run, run_dir, tiny_dir, overrides=EVAL, save_total_limit=1, keep_best=True)
    assert mgr2.best == run_dir / "checkpoint-10"
    save(mgr2, run, cfg2, 12, eval_loss=0.8)
    assert listing(run_dir) == ["checkpoint-10", "checkpoint-12", "checkpoints.json"]


def test_rotation_without_keep_best_never_deletes_the_newest(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run = new_run(tiny_dir)
    train(run, 0, 1)
    cfg, mgr = new_manager(run, run_dir, tiny_dir, save_total_limit=1)
    for step, loss in [(2, 0.1), (4, 0.5), (6, 0.7)]:
        save(mgr, run, cfg, step, eval_loss=loss)
    assert listing(run_dir) == ["checkpoint-6", "checkpoints.json"]


# ---------------------------------------------------------------- RNG states and helpers


def test_rng_states_round_trip_through_the_safe_loader(tmp_path):
    import random

    H.seed_everything(7)
    random.gauss(0, 1)  # python keeps a cached gaussian: part of the state
    np.random.standard_normal()  # so does NumPy
    state = dist_utils.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3),
    )

    H.seed_everything(8)
    assert dist_utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)) == []
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])
    assert dist_utils.gather_rng_states()[0]["torch"].dtype == torch.uint8

    # work done inside preserved_rng() leaves every stream where it was
    before = H.live_rng_digest()
    with dist_utils.preserved_rng():
        random.random(), np.random.rand(), torch.rand(2)
    assert H.live_rng_digest() == before
    assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main()) == (0, 1, True)


def test_sharded_accelerator_is_refused(tmp_path):
    from accelerate.utils import DistributedType

    cfg = H.make_config(tmp_path, STEPS)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    with pytest.raises(
        CheckpointError, match=r"^checkpoints of DEEPSPEED runs \(sharded optimizer state\) are not supported"
    ):
        CheckpointManager(tmp_path, deepspeed, cfg.checkpoint, lambda d: None, lambda d: None)
    # FSDP is supported (tests/test_train_fsdp.py), but only with the module to gather the shards from
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=1)
    with pytest.raises(CheckpointError, match=r"needs CheckpointManager\(sharded_root=\.\.\.\)"):
        CheckpointManager(tmp_path, fsdp, cfg.checkpoint, lambda d: None, lambda d: None)
    fsdp1 = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        num_processes=1,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1, use_orig_params=False)),
    )
    with pytest.raises(CheckpointError, match=r"FSDP1 needs fsdp_use_orig_params: true"):
        CheckpointManager(
            tmp_path, fsdp1, cfg.checkpoint, lambda d: None, lambda d: None, sharded_root=torch.nn.Linear(1, 1)
        )


# ---------------------------------------------------------------- separate processes


def _harness(tiny_dir, run_dir, out, *extra, nproc: int = 1, timeout: int = 180) -> subprocess.CompletedProcess:
    args = [
        str(HARNESS),
        "--tiny-dir",
        str(tiny_dir),
        "--run-dir",
        str(run_dir),
        "--steps",
        "6",
        "--out-prefix",
        str(out),
        *extra,
    ]
    cmd = [
        sys.executable,
        *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _read_out(out: Path, rank: int) -> dict:
    return json.loads(out.with_name(f"{out.name}.rank{rank}.json").read_text())


def test_sigkill_during_a_save_never_leaves_a_partial_checkpoint(tmp_path, tiny_dir):
    """A process killed at the worst moment of its second save: every file written and verified,
    the manifest complete, only the rename missing."""
    run_dir = tmp_path / "run"
    r = _harness(tiny_dir, run_dir, tmp_path / "killed", "--save-at", "2,4", "--kill-in", "verify")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    names = listing(run_dir)
    (tmp,) = [n for n in names if n.startswith(".tmp-")]
    assert tmp.startswith(".tmp-checkpoint-4-")
    assert names == sorted([tmp, "checkpoint-2", "checkpoints.json", "config.yaml"])
    verify_checkpoint(run_dir / "checkpoint-2")
    assert find_resume_checkpoint(run_dir) == run_dir / "checkpoint-2"

    # the next run resumes from checkpoint-2, removes the leftover, and trains as if never killed
    assert (
        H.main(
            [
                "--tiny-dir",
                str(tiny_dir),
                "--run-dir",
                str(run_dir),
                "--steps",
                "6",
                "--save-at",
                "2,4",
                "--out-prefix",
                str(tmp_path / "resumed"),
                "--resume",
            ]
        )
        == 0
    )
    assert listing(run_dir) == ["checkpoint-2", "checkpoints.json", "config.yaml"]
    uninterrupted = train(new_run(tiny_dir, steps=6), 0, 6)
    assert _read_out(tmp_path / "resumed", 0)["losses"] == {str(s): uninterrupted[s] for s in range(3, 7)}


@pytest.mark.slow  # torchrun, two processes: 10-40 s on 2 busy cores
@pytest.mark.multiproc
def test_two_processes_save_once_with_both_rng_states_and_resume_exactly(tmp_path, tiny_dir):
    """torchrun, 2 CPU processes (gloo, DDP, set up through accelerate as the recipe does): train 6
    steps saving at 3, then in the same two processes rebuild everything with other seeds, resume
    from the folder and train 4..6 again."""
    run_dir = tmp_path / "run"
    r = _harness(tiny_dir, run_dir, tmp_path / "out", "--save-at", "3", "--accelerate", "--then-resume", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [_read_out(tmp_path / "out", rank) for rank in (0, 1)]
    assert listing(run_dir) == ["checkpoint-3", "checkpoints.json", "config.yaml"]  # one folder, written once
    manifest = verify_checkpoint(run_dir / "checkpoint-3")
    assert manifest["world_size"] == 2
    state = torch.load(run_dir / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert [H.saved_rng_digest(rng) for rng in state["rng"]] == [out[0]["rng_at_save"]["3"], out[1]["rng_at_save"]["3"]]
    assert out[0]["rng_at_save"]["3"] != out[1]["rng_at_save"]["3"]  # the ranks' streams differ
    assert out[0]["weights"] == out[1]["weights"]  # DDP kept the replicas equal
    assert out[0]["losses"] != out[1]["losses"]  # each rank trained on its own batches

    for rank in (0, 1):
        resumed = out[rank]["resumed"]
        assert resumed["losses"] == {s: v for s, v in out[rank]["losses"].items() if int(s) > 3}
        assert resumed["weights"] == out[rank]["weights"]

    # one process cannot continue a two-process run exactly
    run = new_run(tiny_dir)
    with pytest.raises(
        CheckpointError, match=r"was saved by 2 process\(es\), this run has 1: .* --resume-weights-only"
    ):
        load_training_state(run_dir / "checkpoint-3", optimizer=run.opt, scheduler=run.sched, world_size=1, rank=0)
