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
            -> eval -> samples -> quality (+ degradation alarm) -> save
    save    final/ (always), best/ by checkpoint.best_metric (eval loss or a quality score),
            report of what happened

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

from higgs_tune.config import QUALITY_METRICS, Config
from higgs_tune.data.pipeline import FamilyData, TrainData, build_train_data, check_data_codec, first_batches
from higgs_tune.errors import CheckpointError
from higgs_tune.families.base import has_usual_weights
from higgs_tune.families.select import family_for
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, generate_speech, write_wav
from higgs_tune.infer.push import push_checkpoint
from higgs_tune.progress import Progress, TerminalProgress
from higgs_tune.runfs import BEST_NAME, DATA_REPORT_FILE, PARAM_REPORT_FILE, SAMPLES_DIR, RunLock, claim, safe_file_stem
from higgs_tune.train.checkpoint import (
    CheckpointManager,
    check_resume_data,
    data_identity,
    find_resume_checkpoint,
    is_fsdp,
    load_training_state,
    read_manifest,
    require_unsharded,
)
from higgs_tune.train.checkpoint.sharded import is_sharded_checkpoint
from higgs_tune.train.distributed import gathered_for_generation, preserved_rng
from higgs_tune.train.health import HealthMonitor
from higgs_tune.train.logging import MetricsLogger, reduce_metrics
from higgs_tune.train.loss import StepMetrics, TokenCounts, make_loss_module
from higgs_tune.train.optim import make_optimizer
from higgs_tune.train.outdir import estimate_checkpoint_bytes, prepare_output_dir, rough_checkpoint_bytes
from higgs_tune.train.preview import prediction_preview
from higgs_tune.train.quality import QualityEvaluator
from higgs_tune.train.signals import StopSignals, TrainingInterrupted

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
def inspect_first_batches(data: TrainData, family, n: int = INSPECT_BATCHES) -> tuple[dict, str]:
    """(statistics, text) of the first n batches of epoch 0; raises when nothing would be learned."""
    batches = first_batches(data.train_set, data.sampler, data.collator, n)
    stats, text = family.first_batch_report(batches, data.tokens)
    family.check_first_batches(stats)
    return stats, text


def family_data(family, cfg: Config, processor) -> FamilyData:
    """The family's tokens, sample layout and collator for the data pipeline."""
    tokens = family.special_tokens(processor)
    return FamilyData(
        tokens,
        family.sample_layout(cfg.data),
        family.collator(tokens, processor),
    )


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


def recompute_schedule(optimizer, scheduler, changes: list[str], total_steps: int) -> str:
    """After a resume with another run length: the restored LR is the old schedule's; set the
    new schedule's value at the resumed step (a LambdaLR built for the new length). Returns the
    line to log."""
    step = scheduler.last_epoch
    old = [g["lr"] for g in optimizer.param_groups]
    new = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, new, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(new)  # what get_last_lr() reports (and the loop logs) for the next step
    return (
        f"run length changed ({'; '.join(changes)}): the learning-rate schedule is recomputed for "
        f"{total_steps} steps; the LR at step {step + 1} is {new[0]:.3g} (the old schedule had {old[0]:.3g})"
    )


def total_optimizer_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.num_epochs * batches_per_epoch / cfg.train.gradient_accumulation_steps))


# ----------------------------------------------------------------------------- the recipe
def train(cfg: Config, **kwargs) -> TrainResult:
    """`_train` (below) with SIGTERM / Ctrl-C handled while it runs: during the loop the step in
    progress finishes, a checkpoint is saved and TrainingInterrupted raised (train.signals)."""
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        return _train(cfg, stop=stop, cleanup=cleanup, **kwargs)


def _train(
    cfg: Config,
    *,
    stop: StopSignals,
    cleanup: contextlib.ExitStack,
    progress: Progress | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    resume_weights_only: bool = False,
    _debug_unshifted: bool = False,
    _batch_hook=None,
) -> TrainResult:
    """Run one fine-tune as `cfg` says. `resume`: None, "auto" or a checkpoint folder.
    `progress` (higgs_tune.progress): told after each optimizer step (step, loss, tokens/s);
    default a bar on a terminal, periodic plain lines otherwise.

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
    fsdp = is_fsdp(accelerator)  # samples and quality sets are then generated by every rank in step
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
    if progress is None:  # a bar on a terminal (below the log lines), periodic plain lines otherwise
        main = accelerator.is_main_process
        progress = TerminalProgress(console=logger.console, tty=logger.console.is_terminal) if main else Progress()
    cleanup.callback(progress.close)
    say(f"run folder: {run_dir} · {accelerator.num_processes} process(es) on {accelerator.device}")

    # --- data: tokenizer + codec, datasets, sampler; look at the first batches -----------------
    family = family_for(cfg.model.name_or_path, cfg.model.family)
    processor = family.load_processor(cfg.model.name_or_path, cfg.model.audio_tokenizer)
    data = build_train_data(
        cfg,
        processor,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        family_data=family_data(family, cfg, processor),
    )
    check_data_codec(data, processor, cfg.model.name_or_path)  # codes of another codec mean other sounds
    if resume_from is not None and not resume_weights_only:  # the same data, before the model loads
        check_resume_data(resume_from, data_identity(data.train_set.cache))
    _, text = inspect_first_batches(data, family)
    if accelerator.is_main_process:
        (run_dir / DATA_REPORT_FILE).write_text(text + "\n", encoding="utf-8")
        claim(run_dir, DATA_REPORT_FILE)
        total = text[text.find("total:") :] if "total:" in text else text
        say(f"first {INSPECT_BATCHES} training batches ({DATA_REPORT_FILE} has each one):\n{total}")
    total_steps = total_optimizer_steps(cfg, len(data.sampler))
    # the quality set and its ASR / speaker models, before the model loads: a wrong model id fails
    # fast (train/quality.py; main process only, RNG preserved)
    quality = None
    if t.quality_eval_steps:
        quality = QualityEvaluator.create(
            cfg, data, processor, run_dir, accelerator, logger, resume_step=resume_step, family=family
        )

    # --- model: load, audio self-attention, LoRA / full, report ---------------------------------
    model = family.load_model(cfg.model, device=accelerator.device)
    shards_hold_weights = resume_from is not None and is_sharded_checkpoint(resume_from)
    if shards_hold_weights and resume_weights_only and not has_usual_weights(resume_from):
        raise CheckpointError(
            f"--resume-weights-only {resume_from}: an FSDP checkpoint holds its weights only as shards; "
            "start from the run's final/ or best/ (they also hold the usual weights), or resume the run itself with "
            "--resume."
        )
    if shards_hold_weights and not resume_weights_only:
        # an FSDP checkpoint: the trained weights come from its shards (load_training_state, below)
        model = family.apply_finetuning(model, cfg.finetune)
    elif resume_from is not None:
        # the trained weights of the checkpoint (adapter + audio attention, or the full model)
        model = family.load_trainable(model, resume_from, is_trainable=True)
        if cfg.finetune.mode == "full":
            model = family.apply_finetuning(model, cfg.finetune)  # re-applies finetune.freeze
    else:
        model = family.apply_finetuning(model, cfg.finetune)
    report = family.parameter_report(model, cfg.finetune)
    if accelerator.is_main_process:
        (run_dir / PARAM_REPORT_FILE).write_text(report.format() + "\n", encoding="utf-8")
        claim(run_dir, PARAM_REPORT_FILE)
        say(report.format())
    loss_module = make_loss_module(family, model, cfg.loss, _debug_unshifted=_debug_unshifted)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, t, replicas=1 if fsdp else accelerator.num_processes)  # train/optim.py
    scheduler = make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, total_steps)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    health = HealthMonitor.from_spec(
        cfg.health,
        cfg.loss,
        family.health_spec(_base_config(model), processor.tokenizer),
        on_warning=logger.log_warning,
    )

    # every save is read back and compared bit for bit with the weights in memory
    checkpoints = CheckpointManager(
        run_dir,
        accelerator,
        ck,
        save_weights=lambda d, state_dict=None: family.save_trainable(model, d, state_dict),
        verify_weights=lambda d, state_dict=None: family.verify_trainable(model, d, state_dict),
        estimate_bytes=estimate_checkpoint_bytes(model, cfg.finetune.mode),
        sharded_root=wrapped if fsdp else None,
        weights_prefix="model.",
    )
    checkpoints.data_identity = data_identity(data.train_set.cache)  # every checkpoint records its data

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
            model_root=wrapped if fsdp else accelerator.unwrap_model(wrapped),  # an FSDP checkpoint's shards
        )
        step, epoch = state.step, int(state.epoch)
        data.sampler.load_state_dict(state.sampler_state)
        say(
            f"resumed from {resume_from} at step {step} (epoch {epoch}, batch "
            f"{state.sampler_state['batches_consumed']})"
        )
        if state.schedule_changes:
            say(recompute_schedule(optimizer, scheduler, state.schedule_changes, total_steps))
        if step >= total_steps:
            say(
                f"the run already reached step {step} of {total_steps}: nothing left to train "
                "(a larger train.max_steps extends it)"
            )
    elif resume_from is not None:
        say(f"loaded weights only from {resume_from}; optimizer, schedule and data order start afresh")

    # --- quality: the fixed held-out set scored now (the base model: the "before"), then every
    # quality_eval_steps in the loop; main process only, RNG preserved (train/quality.py) ----------
    if quality is not None and resume_from is None and t.quality_baseline:
        quality.baseline(model, sharded_root=wrapped if fsdp else None)

    # --- loop ------------------------------------------------------------------------------------
    accum = t.gradient_accumulation_steps
    draws = _endless(data, epoch)
    window_metrics = StepMetrics()
    last_ckpt = str(resume_from) if resume_from else None
    # what the next save records: the checkpoint's own values on resume, as the uninterrupted run has them
    last_metrics, eval_loss = (dict(state.metrics), state.eval_loss) if state is not None else ({}, None)
    tokens_seen, tic = 0, time.perf_counter()
    first_batch_checked, first_step = False, step
    last_saved_step = step if resume_from is not None and not resume_weights_only else None
    stop.armed = True  # from here on a signal finishes the step, saves, then stops (train.signals)
    progress.start(total_steps, "train", "steps", done=step)
    progress_tokens, progress_t0 = 0, time.perf_counter()

    def samples(at: int) -> None:
        """The fixed prompts of step `at` (optional work: a failure is logged, the run goes on)."""
        out_dir = run_dir / SAMPLES_DIR / f"step-{at}"
        write_samples(
            model,
            processor,
            data,
            out_dir,
            t.num_samples,
            accelerator,
            logger,
            at,
            family=family,
            sharded_root=wrapped if fsdp else None,
        )

    def save_state() -> dict:
        """What every checkpoint of this run records besides the weights, read when it is saved."""
        return dict(
            optimizer=optimizer,
            scheduler=scheduler,
            sampler_state=data.sampler.state_dict(),
            epoch=epoch,
            metrics=_json_metrics(last_metrics) | (quality.checkpoint_scores() if quality else {}),
            config=cfg,
            eval_loss=eval_loss,
            grad_scaler=accelerator.scaler,
        )

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
        if quality is not None:
            quality.observe(step_metrics["loss"])
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
        progress_tokens += sum(int(b["attention_mask"].sum()) for _, b in window)
        progress.update(
            step,
            loss=step_metrics["loss"],
            tokens_per_s=progress_tokens * accelerator.num_processes / max(time.perf_counter() - progress_t0, 1e-9),
        )

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
        if t.sample_steps and step % t.sample_steps == 0 and step < total_steps:  # the last: after final/
            samples(step)
        stop_early = False
        if quality is not None and quality.due(step, total_steps):
            quality.run(model, step, sharded_root=wrapped if fsdp else None)
            metric = ck.best_metric if ck.best_metric in QUALITY_METRICS else "cer"
            degraded = health.check_quality(step, quality.evals, metric, checkpoint_at=checkpoint_at(checkpoints))
            stop_early = degraded and cfg.health.quality_early_stop
        if step % ck.save_steps == 0 and step < total_steps:
            saved = checkpoints.save(step, **save_state())
            last_ckpt = str(saved) if saved else last_ckpt
            last_saved_step = step if saved else last_saved_step
        if stop_early:
            say(
                f"[bold red]stopping early at step {step}[/]: quality_degraded (health.quality_early_stop); "
                f"the best checkpoint by {ck.best_metric}: {checkpoints.best}"
            )
            break
        if stop.agreed(accelerator):
            _stop_on_signal(
                stop.signal_name,
                step,
                last_saved_step,
                last_ckpt,
                checkpoints,
                say,
                save_state=save_state(),
            )
    stop.armed = False
    progress.close()

    # --- save: final/ always; the best by eval loss is kept by the checkpoint manager ----------
    final_dir = checkpoints.save(step, **save_state(), final=True)
    say(f"final checkpoint: {final_dir}")
    # optional work only after final/ is on disk: a failure there can no longer cost the model
    if t.sample_steps and step > first_step:
        samples(step)
    if ck.push_to_hub and accelerator.is_main_process:
        say(f"uploaded {final_dir.name}/ to {push_checkpoint(final_dir, ck.push_to_hub)}")
    warnings = health.warnings
    if warnings:
        say(f"[bold red]{len(warnings)} health warning(s) during this run:[/] " + ", ".join(w.code for w in warnings))
    logger.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        RunLock.release_folder(run_dir)
    accelerator.end_training()
    best_dir = run_dir / BEST_NAME if (run_dir / BEST_NAME).is_dir() else checkpoints.best
    return TrainResult(run_dir, Path(final_dir), best_dir, step, last_metrics, warnings, model)


# ----------------------------------------------------------------------------- loop helpers
def _stop_on_signal(signal_name, step, last_saved_step, last_ckpt, checkpoints, say, save_state) -> None:
    """SIGTERM / Ctrl-C after a finished step: save a verified checkpoint unless the newest one is
    of this step, then raise TrainingInterrupted (the CLI prints the resume command)."""
    if last_saved_step != step:
        say(f"{signal_name} received: saving checkpoint-{step} before stopping")
        saved = checkpoints.save(step, **save_state)
        last_ckpt = str(saved) if saved else last_ckpt
    else:
        say(f"{signal_name} received: checkpoint-{step} is already saved; stopping")
    raise TrainingInterrupted(signal_name, step, last_ckpt)


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


def _base_config(model):
    """The config of the model inside a PEFT wrapper (or of the model itself)."""
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).config


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _json_metrics(metrics: dict) -> dict:
    """Scalars only (the checkpoint's metrics are JSON)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def checkpoint_at(checkpoints: CheckpointManager):
    """step -> the name of the checkpoint kept from that step (or None), as the alarm names it."""

    def name(step: int) -> str | None:
        path = checkpoints.at_step(step)
        return path.name if path is not None else None

    return name


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


def sample_requests(data: TrainData, n: int, prompts: list | None = None) -> list:
    """The fixed prompts generated during training: n held-out (else training) clips, one per
    speaker in turn, each cloned from another clip of its speaker (plain TTS when it has none).
    `prompts`, when given, receives per request its text and the audio files of the ground truth
    and the reference (for the report's players)."""
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
        if prompts is not None:
            prompts.append(
                {
                    "text": entry.text,
                    "ground_truth": _clip_file(source.cache, entry),
                    "reference": _clip_file(cache, ref) if ref is not None else None,
                }
            )
        if ref is None:
            requests.append(GenerationRequest(text=entry.text, id=entry.id))
        else:
            requests.append(
                GenerationRequest(text=entry.text, ref_text=ref.text, ref_codes=cache.codes(ref.key), id=entry.id)
            )
    return requests


def _clip_file(cache, entry) -> str | None:
    """The audio file a cache entry was prepared from (manifest-relative path), when it still exists."""
    manifest = cache.header.get("manifest")
    path = Path(manifest).parent / entry.audio if manifest else None
    return str(path) if path is not None and path.is_file() else None


def write_samples(
    model,
    processor,
    data: TrainData,
    out_dir: Path,
    n: int,
    accelerator,
    logger,
    step: int,
    *,
    family=None,
    sharded_root=None,
) -> None:
    """Generate the fixed prompts and save WAVs on the main process; the other ranks wait, or, when the
    model is sharded (FSDP: `sharded_root` is the prepared module), generate the same prompts in step
    with it (the shards are gathered as the forward passes need them).

    Optional work: a failure is logged (and recorded in metrics.jsonl) and the run goes on."""
    sharded = sharded_root is not None
    if accelerator.is_main_process or sharded:
        try:
            unwrapped = accelerator.unwrap_model(model)
            options = SamplingOptions(temperature=0.0, ras_win_len=None, max_new_tokens=SAMPLE_MAX_COLUMNS, seed=0)
            prompts: list = []
            requests = sample_requests(data, n, prompts)
            # how often samples are made must not change the training run
            with preserved_rng(), gathered_for_generation(sharded_root):
                results = generate_speech(
                    unwrapped, processor, data.tokens, requests, options, family=family, synced=sharded
                )
            if accelerator.is_main_process:
                _save_samples(results, prompts, out_dir, logger, step)
        except Exception as e:  # noqa: BLE001 - samples must never end a run
            if accelerator.is_main_process:
                log.warning("samples: step %d failed (%s: %s); training goes on", step, type(e).__name__, e)
                logger.log_event("samples_failed", step, error=f"{type(e).__name__}: {e}")
    accelerator.wait_for_everyone()


def _save_samples(results, prompts: list, out_dir: Path, logger, step: int) -> None:
    if not out_dir.parent.exists():  # samples/: ours once created
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        claim(out_dir.parent.parent, out_dir.parent.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f"{safe_file_stem(r.id)}.wav" for r in results]  # an id never names a path outside out_dir
    for r, name in zip(results, files, strict=True):
        write_wav(out_dir / name, r.wav, r.sample_rate)
        logger.log_audio(step, r.id, r.wav, r.sample_rate)
    logger.log_event(
        "samples",
        step,
        folder=str(out_dir),
        files=files,
        stopped=[r.stopped for r in results],
        frames=[r.num_frames for r in results],
        prompts=prompts,
    )
