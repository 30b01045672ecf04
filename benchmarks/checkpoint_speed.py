"""What a torn-proof checkpoint costs: `CheckpointManager.save` vs a plain save, by adapter size.

Baseline: what a naive trainer does, `safetensors.save_file` for the weights and one
`torch.save` of the optimizer/scheduler state into the final folder (no fsync, no hashes, no
read-back). Candidate: `CheckpointManager.save` on the same tensors: temp folder, fsync of
every file and folder, sha256 manifest (the files read back once), read-back verification
(the manifest, file sizes, the training state through the weights_only loader, the weights
loaded back by `verify_weights`), atomic rename, rotation. The candidate reads every byte back
twice (sha256, verify_weights) and waits for the disk (fsync) where the baseline returns once
the bytes are in the page cache, so it is several times slower by construction; the rows show
by how much, per size. A second row per size times `find_resume_checkpoint` (it hashes every file
of the newest checkpoint) against `torch.load` of the same training state.

The "adapter" is a set of fp32 parameters of the given size with a real AdamW state (one
step taken), so the files have the sizes of a LoRA adapter of that many parameters.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks import interleaved_medians, row

NAME = "checkpoint"


def _adapter(num_params: int, chunk: int = 1 << 20) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, object]:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(min(chunk, num_params - i), generator=g)) for i in range(0, num_params, chunk)
    ]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return params, opt, sched


def _measure(num_params: int, repeats: int, root: Path) -> list[dict]:
    from higgs_tune.config import config_from_dict
    from higgs_tune.train.checkpoint import CheckpointManager, find_resume_checkpoint

    params, opt, sched = _adapter(num_params)
    tensors = {f"p{i}": p.detach() for i, p in enumerate(params)}

    def save_weights(folder: Path) -> None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))

    def verify_weights(folder: Path) -> None:
        loaded = load_file(str(folder / "adapter_model.safetensors"))
        if loaded.keys() != tensors.keys():
            raise RuntimeError(f"{folder}: adapter tensors do not match")

    cfg = config_from_dict(
        {
            "data": {"train_cache": "x"},
            "train": {"max_steps": 10},
            "checkpoint": {"output_dir": str(root / "run"), "save_total_limit": 1, "min_free_gb": 0.0},
        }
    )
    mgr = CheckpointManager(root / "run", None, cfg.checkpoint, save_weights, verify_weights)
    step = {"n": 0}

    def plain() -> None:
        folder = root / "plain"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        save_weights(folder)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, folder / "training_state.pt")

    def managed() -> None:
        step["n"] += 1
        mgr.save(
            step["n"],
            optimizer=opt,
            scheduler=sched,
            sampler_state={"epoch": 0, "batches_consumed": step["n"]},
            epoch=0,
            metrics={},
            config=cfg,
        )

    saves = interleaved_medians({"plain": plain, "managed": managed}, repeats=repeats)

    def plain_load() -> None:
        torch.load(root / "plain" / "training_state.pt", weights_only=True)

    def find() -> None:
        find_resume_checkpoint(root / "run", "auto")

    loads = interleaved_medians({"plain": plain_load, "find": find}, repeats=repeats)
    size = sum(f.stat().st_size for f in (root / "plain").iterdir())
    note = f"{num_params / 1e6:g}M fp32 params + AdamW state = {size / 1e6:.0f} MB per checkpoint; median of {repeats}"
    return [
        row(
            NAME,
            "save s",
            "save_file + torch.save",
            "CheckpointManager.save (fsync, sha256, verify, rename)",
            saves["plain"],
            saves["managed"],
            note=note,
        ),
        row(
            NAME,
            "resume lookup s",
            "torch.load(training_state)",
            "find_resume_checkpoint (sha256 of every file)",
            loads["plain"],
            loads["find"],
            target="",
            met=None,
            note=note,
        ),
    ]


def run(quick: bool) -> list[dict]:
    sizes = [1_000_000, 4_000_000] if quick else [1_000_000, 4_000_000, 16_000_000, 64_000_000]
    repeats = 3 if quick else 5
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="higgs-ckpt-bench-") as tmp:
            rows += _measure(n, repeats, Path(tmp))
    return rows
