"""The training recipe: setup -> loop -> save, top to bottom.

One recipe for one CPU/GPU, DDP (`accelerate launch --multi_gpu` / `torchrun`), FSDP
(`accelerate launch` with an FSDP config; checkpoints gather the shards, see train.checkpoint)
and the tiny CPU demo. It wires the parts together and holds no model or data logic of its own:

    setup   config (validated by the caller) -> accelerator, seed -> output folder checked
            (before any model loads) -> tokenizer + codec -> datasets, sampler, collator ->
            first batches inspected (refuse a run with no trained audio or no EOS label) ->
            model (+ audio self-attention, + LoRA / full) -> parameter report -> loss module,
            optimizer, scheduler -> accelerator.prepare -> checkpoints -> resume
    loop    per optimizer step: count the step's tokens -> micro-batches (forward through the
            wrapper, backward) -> clip -> health -> optimizer/scheduler step -> log / preview
            -> eval -> samples -> save
    save    final/ (always), best by eval loss (when evaluating), report of what happened

Data position: the sampler is ours (sharded per rank, not accelerate's), so the checkpoint's
`sampler_state` is (epoch, batches consumed) and a resumed run continues with the exact next
batch. The learning-rate scheduler is stepped once per optimizer step by us (accelerate's
wrapper would step it once per process).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, set_seed

from higgs_tune.config import Config, ConfigError
from higgs_tune.data.inspect import batch_statistics, render_batch_statistics
from higgs_tune.data.pipeline import TrainData, build_train_data, first_batches
from higgs_tune.errors import CheckpointError
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, generate_speech, write_wav
from higgs_tune.model.load import load_model, load_processor
from higgs_tune.model.lora import apply_finetuning, load_trainable, parameter_report, save_trainable, verify_trainable
from higgs_tune.runfs import DATA_REPORT_FILE, PARAM_REPORT_FILE, SAMPLES_DIR
from higgs_tune.train.checkpoint import (
    CheckpointManager,
    find_resume_checkpoint,
    is_fsdp,
    load_training_state,
    read_manifest,
    require_unsharded,
)
from higgs_tune.train.distributed import preserved_rng
from higgs_tune.train.health import HealthMonitor, check_trainable
from higgs_tune.train.logging import MetricsLogger, reduce_metrics
from higgs_tune.train.loss import HiggsLossModule, StepMetrics, TokenCounts
from higgs_tune.train.optim import make_optimizer
from higgs_tune.train.outdir import estimate_checkpoint_bytes, prepare_output_dir, rough_checkpoint_bytes
from higgs_tune.train.preview import prediction_preview

log = logging.getLogger("higgs_tune.train")

INSPECT_BATCHES = 4  # batches inspected before the model loads
PREVIEW_EVERY_LOGS = 5  # the prediction preview is printed every 5th log step (and at step 1)
PROCESS_GROUP_TIMEOUT_MIN = 60
SAMPLE_MAX_COLUMNS = 400  # generated audio columns per sample prompt (16 s at 25 frames/s)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    best_dir: Path | None
    steps: int
    last_metrics: dict
    warnings: list
    model: object = None  # the trained model (unwrapped; a PeftModel in lora mode)


# ----------------------------------------------------------------------------- data
def inspect_first_batches(data: TrainData, n: int = INSPECT_BATCHES) -> dict:
    """Statistics of the first n batches of epoch 0; raises when nothing would be learned."""
    batches = first_batches(data.train_set, data.sampler, data.collator, n)
    stats = batch_statistics(batches, data.tokens.stream_bos, data.tokens.stream_eos)
    check_trainable(stats)
    return stats


# ----------------------------------------------------------------------------- schedule
def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak LR, then cosine / linear decay to 0, or constant.

    Not `transformers.get_scheduler`: its warm-up runs step s (from 0) at s / warmup_steps, so
    the first optimizer step is taken at LR 0 and the peak comes one step late. Here step s runs
    at (s + 1) / warmup_steps (warm-up 2: half the peak, then the peak; the logged `lr`). From
    the end of the warm-up on, the values are get_scheduler's ("cosine", "linear", "constant")
    step for step, up to rounding (tests/test_train_recipe.py checks both).
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_optimizer_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.num_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


# ----------------------------------------------------------------------------- the recipe
def train(
    cfg: Config,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    resume_weights_only: bool = False,
    _debug_unshifted: bool = False,
    _batch_hook=None,
) -> TrainResult:
    """Run one fine-tune as `cfg` says. `resume`: None, "auto" or a checkpoint folder.

    Test-only switches: `_debug_unshifted` computes the deliberately wrong unshifted loss (the
    copy task of earlier trainers); `_batch_hook(step, batch, model) -> batch` may alter a batch
    (random labels, an injected NaN) to prove that the health checks fire.
    """
    t, ck = cfg.train, cfg.checkpoint
    # --- setup: processes, seed, output folder (checked before any model loads) ----------------
    _fresh_accelerate_state()
    # rank 0 writes (and verifies) a full-model checkpoint while the others wait at a barrier
    pg_timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision, kwargs_handlers=[pg_timeout]
    )
    require_unsharded(accelerator)  # before anything loads: DeepSpeed checkpoints are not supported
    fsdp = is_fsdp(accelerator)
    if fsdp and t.sample_steps:
        raise ConfigError(
            [
                "train.sample_steps: generating samples during an FSDP run is not supported (the main "
                "process alone cannot run a sharded model); set train.sample_steps: null."
            ]
        )
    set_seed(t.seed)
    # --resume-weights-only starts a new run (its own, empty folder) from another run's weights
    continuing = resume if not resume_weights_only else None
    run_dir = prepare_output_dir(
        cfg, overwrite=overwrite, resume=continuing, estimate_bytes=rough_checkpoint_bytes(cfg)
    )
    resume_from = find_resume_checkpoint(run_dir, resume) if resume else None
    if resume_weights_only and resume_from is None:
        raise CheckpointError(f"--resume-weights-only {resume}: no checkpoint found there. Name a checkpoint folder.")
    # resuming a run that died before its first checkpoint restarts it at step 0
    resume_step = None
    if continuing:
        resume_step = _checkpoint_step(resume_from) if resume_from else 0
    logger = MetricsLogger(
        run_dir, cfg.logging.report_to, accelerator.is_main_process, resume_step=resume_step, config=cfg.to_dict()
    )
    say = logger.console.print if accelerator.is_main_process else (lambda *a, **k: None)
    say(f"run folder: {run_dir} · {accelerator.num_processes} process(es) on {accelerator.device}")

    # --- data: tokenizer + codec, datasets, sampler; look at the first batches -----------------
    processor = load_processor(cfg.model.name_or_path, cfg.model.audio_tokenizer)
    data = build_train_data(cfg, processor, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    stats = inspect_first_batches(data)
    if accelerator.is_main_process:
        text = render_batch_statistics(stats)
        (run_dir / DATA_REPORT_FILE).write_text(text + "\n", encoding="utf-8")
        total = text[text.find("total:") :] if "total:" in text else text
        say(f"first {INSPECT_BATCHES} training batches ({DATA_REPORT_FILE} has each one):\n{total}")
    total_steps = total_optimizer_steps(cfg, len(data.sampler))

    # --- model: load, audio self-attention, LoRA / full, report ---------------------------------
    model = load_model(cfg.model, device=accelerator.device)
    if resume_from is not None:
        # the trained weights of the checkpoint (adapter + audio attention, or the full model)
        model = load_trainable(model, resume_from, is_trainable=True)
        if cfg.finetune.mode == "full":
            model = apply_finetuning(model, cfg.finetune)  # re-applies finetune.freeze
    else:
        model = apply_finetuning(model, cfg.finetune)
    report = parameter_report(model, cfg.finetune)
    if accelerator.is_main_process:
        (run_dir / PARAM_REPORT_FILE).write_text(report.format() + "\n", encoding="utf-8")
        say(report.format())
    loss_module = HiggsLossModule(model, cfg.loss, _debug_unshifted=_debug_unshifted)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, t, replicas=1 if fsdp else accelerator.num_processes)  # train/optim.py
    scheduler = make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, total_steps)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    health = HealthMonitor.for_model(
        cfg.health, cfg.loss, model.config, processor.tokenizer, on_warning=logger.log_warning
    )

    # every save is read back and compared bit for bit with the weights in memory
    checkpoints = CheckpointManager(
        run_dir,
        accelerator,
        ck,
        save_weights=lambda d, state_dict=None: save_trainable(model, d, state_dict),
        verify_weights=lambda d, state_dict=None: verify_trainable(model, d, state_dict),
        estimate_bytes=estimate_checkpoint_bytes(model, cfg.finetune.mode),
        sharded_root=wrapped if fsdp else None,
        weights_prefix="model.",
    )

    # --- resume: optimizer, scheduler, RNG of this rank, step, data position -------------------
    step, epoch, state = 0, 0, None
    if resume_from is not None and not resume_weights_only:
        # last before the loop: it restores this rank's RNG streams
        state = load_training_state(
            resume_from,
            optimizer=optimizer,
            scheduler=scheduler,
            config=cfg,
            grad_scaler=accelerator.scaler,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            sharded_root=wrapped if fsdp else None,
        )
        step, epoch = state.step, int(state.epoch)
        data.sampler.load_state_dict(state.sampler_state)
        say(
            f"resumed from {resume_from} at step {step} (epoch {epoch}, batch "
            f"{state.sampler_state['batches_consumed']})"
        )
        if step >= total_steps:
            say(
                f"the run already reached step {step} of {total_steps}: nothing left to train "
                "(with lr_scheduler: constant, a larger train.max_steps continues it)"
            )
    elif resume_from is not None:
        say(f"loaded weights only from {resume_from}; optimizer, schedule and data order start afresh")

    # --- loop ------------------------------------------------------------------------------------
    accum = t.gradient_accumulation_steps
    draws = _endless(data, epoch)
    window_metrics = StepMetrics()
    last_ckpt = str(resume_from) if resume_from else None
    # what the next save records: the checkpoint's own values on resume, as the uninterrupted run has them
    last_metrics, eval_loss = (dict(state.metrics), state.eval_loss) if state is not None else ({}, None)
    tokens_seen, tic = 0, time.perf_counter()
    first_batch_checked = False
    wrapped.train()
    while step < total_steps:
        step += 1  # the optimizer step being computed, numbered from 1 as it is logged
        # One optimizer step = `accum` micro-batches. Count the step's tokens on every rank first,
        # so each token weighs the same whatever micro-batch or rank it landed in.
        window = [next(draws) for _ in range(accum)]
        counts = sum((loss_module.count_tokens(b) for _, b in window), TokenCounts.zeros(data.tokens.num_codebooks))
        counts = counts.reduced(accelerator)
        for i, (_, batch) in enumerate(window):
            batch = _to_device(batch, accelerator.device)
            if _batch_hook is not None:
                batch = _batch_hook(step, batch, model)
            # gradients are all-reduced once, on the window's last micro-batch
            sync = accelerator.no_sync(wrapped) if i < accum - 1 else contextlib.nullcontext()
            with sync:
                with accelerator.autocast():
                    out = wrapped(**batch)  # through the DDP wrapper: its hooks fire
                if not first_batch_checked:  # layout/shift checks on the run's first batch
                    health.check_batch(step, batch, out)
                    first_batch_checked = True
                accelerator.backward(out.loss_for_step(counts, scale=accelerator.num_processes))
            window_metrics.add(out)
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm = float(accelerator.clip_grad_norm_(trainable, t.max_grad_norm or float("inf")))
        step_metrics = reduce_metrics(window_metrics.pop(), accelerator)
        ids = [sid for _, b in window for sid in b["sample_ids"]]
        # fp16 loss scaling overflows on purpose now and then: the scaler skips that step and
        # lowers its scale, so an infinite norm there is not a broken run
        scaler_skips = accelerator.scaler is not None and not math.isfinite(grad_norm)
        health.check_step(
            step, step_metrics, grad_norm=None if scaler_skips else grad_norm, sample_ids=ids, last_checkpoint=last_ckpt
        )
        lr = scheduler.get_last_lr()[0]  # the learning rate this step is applied with
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        epoch = window[-1][0]

        if step % t.log_steps == 0 or step == 1 or step == total_steps:
            elapsed = time.perf_counter() - tic
            tokens = torch.tensor(tokens_seen, device=accelerator.device)
            last_metrics = {
                **step_metrics,
                "lr": lr,
                "grad_norm": grad_norm,
                "epoch": _epochs_done(data, epoch),
                "tokens_per_s": float(accelerator.reduce(tokens, "sum")) / max(elapsed, 1e-9),
            }
            logger.log(step, last_metrics)
            tokens_seen, tic = 0, time.perf_counter()
            if accelerator.is_main_process and (step == 1 or step % (t.log_steps * PREVIEW_EVERY_LOGS) == 0):
                logger.log_preview(
                    prediction_preview(
                        out.predictions,
                        window[-1][1]["sample_ids"],
                        processor.tokenizer,
                        step=step,
                        num_samples=cfg.logging.preview_samples,
                        stream_eos_id=data.tokens.stream_eos,
                    )
                )
        if data.eval_set is not None and ((t.eval_steps and step % t.eval_steps == 0) or step == total_steps):
            eval_metrics = evaluate(wrapped, data, accelerator)
            logger.log(step, eval_metrics, split="eval")
            eval_loss = eval_metrics["loss"]
            wrapped.train()
        if t.sample_steps and (step % t.sample_steps == 0 or step == total_steps):
            write_samples(
                model, processor, data, run_dir / SAMPLES_DIR / f"step-{step}", t.num_samples, accelerator, logger, step
            )
        if step % ck.save_steps == 0 and step < total_steps:
            saved = checkpoints.save(
                step,
                optimizer=optimizer,
                scheduler=scheduler,
                sampler_state=data.sampler.state_dict(),
                epoch=epoch,
                metrics=_json_metrics(last_metrics),
                config=cfg,
                eval_loss=eval_loss,
                grad_scaler=accelerator.scaler,
            )
            last_ckpt = str(saved) if saved else last_ckpt

    # --- save: final/ always; the best by eval loss is kept by the checkpoint manager ----------
    final_dir = checkpoints.save(
        step,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler_state=data.sampler.state_dict(),
        epoch=epoch,
        metrics=_json_metrics(last_metrics),
        config=cfg,
        eval_loss=eval_loss,
        grad_scaler=accelerator.scaler,
        final=True,
    )
    say(f"final checkpoint: {final_dir}")
    warnings = health.warnings
    if warnings:
        say(f"[bold red]{len(warnings)} health warning(s) during this run:[/] " + ", ".join(w.code for w in warnings))
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, Path(final_dir), checkpoints.best, step, last_metrics, warnings, model)


# ----------------------------------------------------------------------------- loop helpers
def _fresh_accelerate_state() -> None:
    """Accelerate keeps its settings (mixed precision, ...) in process-wide singletons. Outside a
    live process group, clear them so that a second run in the same Python process (a notebook,
    a benchmark, the tests) gets its own config instead of an error or the first run's settings."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)  # noqa: SLF001 - no public reset exists
        GradientState._reset_state()  # noqa: SLF001


def _endless(data: TrainData, epoch: int):
    """(epoch, batch) of this rank forever, epoch after epoch, from the sampler's position.

    Batches are built lazily, one per `next`, so the sampler's count of yielded batches is
    exactly the number the loop has used: its state_dict is the data position to resume from.
    """
    while True:
        for batch in data.batches(epoch):
            yield epoch, batch
        epoch += 1


def _epochs_done(data: TrainData, epoch: int) -> float:
    """Epochs of training data consumed so far (1.5 = one epoch and half of the next), as logged."""
    position = data.sampler.state_dict()
    return epoch + position["batches_consumed"] / max(1, data.sampler.batches_per_epoch)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _json_metrics(metrics: dict) -> dict:
    """Scalars only (the checkpoint's metrics are JSON)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _checkpoint_step(folder: Path) -> int:
    return int(read_manifest(folder)["step"])


@torch.no_grad()
def evaluate(wrapped, data: TrainData, accelerator) -> dict:
    """Token-weighted loss and accuracies over this rank's share of the held-out set, reduced."""
    wrapped.eval()
    acc = StepMetrics()
    for batch in data.eval_batches():
        with accelerator.autocast():
            acc.add(wrapped(**_to_device(batch, accelerator.device)))
    return reduce_metrics(acc.pop(), accelerator)


def sample_requests(data: TrainData, n: int) -> list:
    """The fixed prompts generated during training: n held-out (else training) clips, one per
    speaker in turn, each cloned from another clip of its speaker (plain TTS when it has none)."""
    source = data.eval_set if data.eval_set is not None else data.train_set
    pool = list(data.train_set.entries)
    cache = data.train_set.cache
    # one clip per speaker first (round robin), so the samples cover the voices
    by_speaker: dict[str, list] = {}
    for entry in source.entries:
        by_speaker.setdefault(entry.speaker, []).append(entry)
    queues = list(by_speaker.values())
    chosen = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)][:n]
    requests = []
    for entry in chosen:
        ref = next((e for e in pool if e.speaker == entry.speaker and e.id != entry.id), None)
        if ref is None:
            requests.append(GenerationRequest(text=entry.text, id=entry.id))
        else:
            requests.append(
                GenerationRequest(text=entry.text, ref_text=ref.text, ref_codes=cache.codes(ref.key), id=entry.id)
            )
    return requests


def write_samples(model, processor, data: TrainData, out_dir: Path, n: int, accelerator, logger, step: int) -> None:
    """Generate the fixed prompts on the main process and save WAVs (other ranks wait)."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        options = SamplingOptions(temperature=0.0, ras_win_len=None, max_new_tokens=SAMPLE_MAX_COLUMNS, seed=0)
        with preserved_rng():  # how often samples are made must not change the training run
            results = generate_speech(unwrapped, processor, data.tokens, sample_requests(data, n), options)
        for r in results:
            write_wav(out_dir / f"{r.id}.wav", r.wav, r.sample_rate)
            logger.log_audio(step, r.id, r.wav, r.sample_rate)
        logger.log_event(
            "samples",
            step,
            folder=str(out_dir),
            files=[f"{r.id}.wav" for r in results],
            stopped=[r.stopped for r in results],
            frames=[r.num_frames for r in results],
        )
    accelerator.wait_for_everyone()
