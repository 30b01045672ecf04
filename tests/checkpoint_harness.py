"""A small real training loop on the tiny Higgs model, for the checkpoint tests.

Imported by tests/test_train_checkpoint.py, and run as a script for what needs separate
processes: two ranks under `torchrun --standalone --nproc_per_node 2` (gloo, DDP), and a
process killed with SIGKILL in the middle of a save.

The loop draws from every random source a real recipe draws from, so a resume is exact only
if all of them are restored: python `random` picks the clip length, NumPy masks labels,
torch's global generator corrupts text tokens (and drives LoRA dropout), and a sampler walks a
per-epoch permutation whose position is the data state. Two models: "head" = full fine-tune of
`audio_lm_head` (weights saved with safetensors), "lora" = a PEFT adapter on q/v projections
plus `audio_lm_head` in modules_to_save (saved with `save_pretrained`, verified by loading it
onto a fresh base model with `PeftModel.from_pretrained`).

    python tests/checkpoint_harness.py --tiny-dir DIR --run-dir RUN --steps N --save-at K[,K2] --out-prefix OUT
        [--resume | --then-resume] [--accelerate] [--kill-in weights|verify]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from higgs_tune.config import config_from_dict
from higgs_tune.errors import CheckpointError

SEED = 1234
BATCH = 2
TEXT_LEN = 6
MAX_FRAMES = 8
POOL = 6  # clips in the toy data set
LR = 1e-2
WARMUP = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_config(run_dir: Path, steps: int, overrides=(), **checkpoint):
    """A real Config for the run (written into every checkpoint, compared on resume)."""
    return config_from_dict(
        {
            "model": {"name_or_path": "tiny", "dtype": "float32"},
            "data": {"train_cache": "toy"},
            "train": {"max_steps": steps, "learning_rate": LR, "warmup_steps": WARMUP, "seed": SEED},
            "checkpoint": {"output_dir": str(run_dir), "save_steps": 2, "min_free_gb": 0.0, **checkpoint},
        },
        list(overrides),
    )


def build_model(tiny_dir: Path, mode: str):
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    if mode == "head":
        model.requires_grad_(False)
        model.audio_lm_head.weight.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["audio_lm_head"]
        ),
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(trainable(model).items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_weights_fn(model, mode: str):
    def save_weights(folder: Path) -> None:
        if mode == "head":
            save_file(
                {n: p.detach().contiguous() for n, p in trainable(model).items()}, str(folder / "trainable.safetensors")
            )
        else:
            model.save_pretrained(folder)

    return save_weights


def verify_weights_fn(tiny_dir: Path, model, mode: str):
    """Load the saved weights back the way a user would and compare them with the live ones."""

    def verify_weights(folder: Path) -> None:
        live = {n: p.detach() for n, p in trainable(model).items()}
        if mode == "head":
            loaded = load_file(str(folder / "trainable.safetensors"))
        else:
            from peft import PeftModel
            from transformers import HiggsAudioV2ForConditionalGeneration

            base = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
            loaded = {n: p.detach() for n, p in PeftModel.from_pretrained(base, folder).named_parameters() if n in live}
        if loaded.keys() != live.keys() or not all(torch.equal(loaded[n], live[n]) for n in live):
            raise CheckpointError(f"{folder}: the saved weights do not load back equal to the trained ones.")

    return verify_weights


def load_weights(model, folder: Path, mode: str) -> None:
    params = trainable(model)
    if mode == "head":
        for name, t in load_file(str(folder / "trainable.safetensors")).items():
            params[name].data.copy_(t)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


class ToySampler:
    """Walks a per-epoch permutation of the pool (seeded by epoch); state = (epoch, position)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def next_indices(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            out.append(order[(self.position * self.world_size + self.rank) % self.n])
            self.position += 1
            if self.position * self.world_size >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def make_pool(config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed clips: (text ids (TEXT_LEN,), codes (MAX_FRAMES, K)), from a seeded generator."""
    g = torch.Generator().manual_seed(0)
    k = config.num_codebooks
    return [
        (torch.randint(0, 1792, (TEXT_LEN,), generator=g), torch.randint(0, 1024, (MAX_FRAMES, k), generator=g))
        for _ in range(POOL)
    ]


def make_batch(pool, indices: list[int], config) -> dict[str, torch.Tensor]:
    frames = random.randint(4, MAX_FRAMES)  # python RNG
    text = torch.stack([pool[i][0] for i in indices])  # (B, TEXT_LEN)
    noise = torch.rand(text.shape) < 0.3  # torch global RNG
    text = torch.where(noise, torch.randint(0, 1792, text.shape), text)
    codes = torch.stack([pool[i][1][:frames] for i in indices])  # (B, T, K)
    labels_audio = codes.clone()
    labels_audio[torch.from_numpy(np.random.rand(*codes.shape) < 0.2)] = -100  # NumPy RNG
    placeholders = torch.full((len(indices), frames), config.audio_token_id)
    input_ids = torch.cat([text, placeholders], dim=1)  # (B, TEXT_LEN + T)
    text_labels = torch.cat([text, torch.full_like(placeholders, -100)], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "audio_input_ids": codes,
        "audio_input_ids_mask": torch.ones(codes.shape[:2], dtype=torch.bool),
        "audio_labels": labels_audio,
        "labels": text_labels,
    }


def build_optimizer(model, total_steps: int):
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=LR, weight_decay=0.01)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay: the lr changes every step
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, total_steps - WARMUP)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train_steps(model, opt, sched, sampler, pool, config, start: int, stop: int, on_step=None) -> dict[int, float]:
    """Optimizer steps start+1 .. stop; returns {step: loss}. on_step(step) runs after each step."""
    losses = {}
    model.train()
    for step in range(start + 1, stop + 1):
        batch = make_batch(pool, sampler.next_indices(BATCH), config)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        losses[step] = loss.item()
        if on_step is not None:
            on_step(step)
    return losses


# ---------------------------------------------------------------- the script (separate processes)


def _digest(python_state: tuple, numpy_keys: list[int], numpy_pos: int, torch_state: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(repr(python_state).encode())
    h.update(repr((numpy_keys, numpy_pos)).encode())
    h.update(torch_state.numpy().tobytes())
    return h.hexdigest()


def live_rng_digest() -> str:
    """This process's RNG states, read straight from python/NumPy/torch."""
    np_state = np.random.get_state()
    return _digest(random.getstate(), np_state[1].tolist(), int(np_state[2]), torch.get_rng_state())


def saved_rng_digest(rng: dict) -> str:
    """The same digest from one rank's entry of training_state.pt's RNG list."""
    py, npy = rng["python"], rng["numpy"]
    return _digest(
        (py["version"], tuple(py["state"].tolist()), py["gauss_next"]), npy["keys"].tolist(), npy["pos"], rng["torch"]
    )


def _run(args, cfg, run_dir: Path, accelerator, rank: int, world: int, resume: bool) -> dict:
    """One training run in this process: from scratch (saving at --save-at) or resumed from run_dir."""
    from higgs_tune.train.checkpoint import (
        CHECKPOINT_PREFIX,
        TMP_PREFIX,
        CheckpointManager,
        find_resume_checkpoint,
        load_training_state,
    )

    save_at = [int(s) for s in args.save_at.split(",")]
    model = build_model(args.tiny_dir, args.mode)
    config = model.config
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt, sched = build_optimizer(model, args.steps)
    sampler = ToySampler(POOL, SEED, rank, world)
    pool = make_pool(config)

    save_weights, verify_weights = save_weights_fn(model, args.mode), verify_weights_fn(args.tiny_dir, model, args.mode)
    last = f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{save_at[-1]}-"
    if args.kill_in == "weights":

        def save_weights(folder, _inner=save_weights):  # noqa: F811 - the last save dies right after writing the weights
            _inner(folder)
            if folder.name.startswith(last):
                os.kill(os.getpid(), signal.SIGKILL)
    elif args.kill_in == "verify":

        def verify_weights(folder, _inner=verify_weights):  # noqa: F811 - the last save dies with every file written, before the rename
            _inner(folder)
            if folder.name.startswith(last):
                os.kill(os.getpid(), signal.SIGKILL)

    manager = CheckpointManager(run_dir, accelerator, cfg.checkpoint, save_weights, verify_weights)

    start = 0
    if resume:
        ckpt = find_resume_checkpoint(run_dir, "auto")
        load_weights(model, ckpt, args.mode)
        state = load_training_state(ckpt, optimizer=opt, scheduler=sched, world_size=world, rank=rank, config=cfg)
        sampler.load_state_dict(state.sampler_state)
        start = state.step

    saved_rng: dict[str, str] = {}
    losses: dict[int, float] = {}
    for step in range(start + 1, args.steps + 1):
        losses.update(train_steps(ddp, opt, sched, sampler, pool, config, step - 1, step))
        if step in save_at and not resume:
            saved_rng[str(step)] = live_rng_digest()  # this rank's RNG state at the save
            manager.save(
                step,
                optimizer=opt,
                scheduler=sched,
                sampler_state=sampler.state_dict(),
                epoch=sampler.epoch,
                metrics={"loss": losses[step]},
                config=cfg,
            )
    return {
        "losses": {str(k): v for k, v in losses.items()},
        "weights": weights_digest(model),
        "rng_at_save": saved_rng,
    }


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from higgs_tune.train import distributed as dist_utils
    from higgs_tune.train.outdir import prepare_output_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-dir", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", required=True, help="comma-separated steps to save at, e.g. 2,4")
    ap.add_argument("--out-prefix", type=Path, required=True)
    ap.add_argument("--mode", default="head", choices=("head", "lora"))
    ap.add_argument("--resume", action="store_true", help="resume from the run folder instead of starting fresh")
    ap.add_argument(
        "--then-resume",
        action="store_true",
        help="after the run, rebuild everything in this process (other seeds) and resume from the run folder",
    )
    ap.add_argument(
        "--accelerate",
        action="store_true",
        help="set the processes up with accelerate.Accelerator(cpu=True) and pass it to the manager",
    )
    ap.add_argument(
        "--kill-in", choices=("weights", "verify"), help="SIGKILL this process inside that step of the last save"
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # under torchrun: MULTI_CPU, a gloo process group
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank, world = dist_utils.rank(), dist_utils.world_size()
    seed_everything(SEED + rank)  # every rank draws its own random numbers

    cfg = make_config(args.run_dir, args.steps)
    run_dir = prepare_output_dir(cfg, resume="auto" if args.resume else None, estimate_bytes=1 << 20)
    out = {
        "rank": rank,
        "world_size": world,
        "run_dir": str(run_dir),
        **_run(args, cfg, run_dir, accelerator, rank, world, resume=args.resume),
    }
    if args.then_resume:
        seed_everything(999 + rank)  # whatever the rebuilt run draws must come from the checkpoint
        out["resumed"] = _run(args, cfg, run_dir, accelerator, rank, world, resume=True)
    args.out_prefix.with_name(f"{args.out_prefix.name}.rank{rank}.json").write_text(json.dumps(out))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # teardown without a barrier aborts ~1 run in 10 on gloo
        accelerator.end_training()
    elif world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
