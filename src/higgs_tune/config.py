"""The one typed configuration of a higgs-tune run: YAML + `key=value` overrides, validated up front.

Every field has a help string. `load_config` reads a YAML file, applies dotted overrides
(`train.learning_rate=3e-4`), rejects unknown keys, and runs `Config.validate`, which
collects *every* problem and raises one `ConfigError` listing them all with the fix.
Nothing here imports torch: the config is checked before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from higgs_tune.errors import HiggsTuneError


class ConfigError(HiggsTuneError, ValueError):
    """One or more problems in a config; `problems` holds one line per problem.

    A HiggsTuneError so the CLI prints it without a traceback; a ValueError for callers
    that treat it as bad input.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


# What resuming from a checkpoint requires of a setting (field metadata "resume"; read by
# `resume_keys`, enforced by train.checkpoint): MUST_MATCH for every key whose change makes a
# resumed run differ from the uninterrupted one (which weights are trained, which samples in
# which order, the gradients, the optimizer trajectory); SCHEDULE_LENGTH for the run length,
# which shapes the warm-up/decay curve (it may change when the schedule is constant).
# Unmarked keys (logging, eval/sample cadence, checkpoint policy, attention backend, gradient
# checkpointing, worker count, the eval set) may change on resume.
RESUME_MUST_MATCH = "must_match"
RESUME_SCHEDULE_LENGTH = "schedule_length"

# The LoRA pathways and the modules that can be trained in full: the one place their names are
# spelled (model/lora.py maps them to module names, train/outdir.py to weight names).
TEXT_ATTN = "text_attn"
TEXT_MLP = "text_mlp"
AUDIO_MLP = "audio_mlp"
AUDIO_ATTN = "audio_attn"  # a pathway (LoRA on the audio self-attention) and a module (trained in full)
PATHWAYS = (TEXT_ATTN, TEXT_MLP, AUDIO_MLP, AUDIO_ATTN)
AUDIO_LM_HEAD = "audio_lm_head"
AUDIO_EMBEDDINGS = "audio_embeddings"
TEXT_LM_HEAD = "text_lm_head"
TEXT_EMBEDDINGS = "text_embeddings"
TRAIN_MODULES = (AUDIO_LM_HEAD, AUDIO_EMBEDDINGS, TEXT_LM_HEAD, TEXT_EMBEDDINGS, AUDIO_ATTN)

# Metrics of the in-training quality evaluation that can choose the best checkpoint or raise the
# degradation alarm (train/quality.py computes them): name -> True when higher is better.
# cer_sim is a named combination: CER + (1 - speaker similarity), lower is better.
QUALITY_METRICS = {"cer": False, "wer": False, "sim": True, "sim_gt": True, "cer_sim": False}
EVAL_LOSS = "eval_loss"
BEST_METRICS = (EVAL_LOSS, *QUALITY_METRICS)
DEFAULT_QUALITY_ASR = "openai/whisper-large-v3"  # as in Seed-TTS-eval (infer/evaluate.py's default too)
DEFAULT_QUALITY_SPEAKER = "microsoft/wavlm-base-plus-sv"

_LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")


def _f(default: Any = dataclasses.MISSING, help: str = "", resume: str | None = None, **kw):
    """A dataclass field with a help string (shown by `higgs-tune train --help-config`) and,
    for settings a resume must keep, its `resume` requirement (RESUME_MUST_MATCH, ...)."""
    metadata = {"help": help} if resume is None else {"help": help, "resume": resume}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _not_one_of(name: str, value: Any, allowed: tuple) -> list[str]:
    """[the problem] when `value` is not in `allowed` (with the closest spelling), else []."""
    if value in allowed:
        return []
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return [f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}.{hint}"]


# `was_given(name)`: whether the user set this section's setting `name` (see Config.validate).
WasGiven = typing.Callable[[str], bool]
_KEEP_ON_RESUME = RESUME_MUST_MATCH
# train.optimizer values (train/optim.py builds them)
OPTIMIZERS = ("adamw", "adamw_bf16_sr")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "bosonai/higgs-audio-v2-generation-3B-base",
        "Hub id or local folder of a Higgs Audio v2 checkpoint (transformers layout; original `higgs_audio` layout "
        "is detected and converted).",
        _KEEP_ON_RESUME,
    )
    family: str | None = _f(
        None,
        "Model family: v2 (Higgs Audio v2) or v3 (Higgs Audio v3); null = detected from config.json model_type.",
    )
    audio_tokenizer: str | None = _f(
        None,
        "Audio tokenizer id or folder; default: `<name_or_path>/audio_tokenizer` if present, else what the "
        "processor config records.",
    )
    dtype: str = _f("bfloat16", "Weights dtype: bfloat16, float16 or float32.", _KEEP_ON_RESUME)
    attn_implementation: str = _f("sdpa", "Attention backend: sdpa, eager or flash_attention_2 (when installed).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    use_text_head: bool = _f(
        True, "Build `text_lm_head` and load its weights (needed for the text loss).", _KEEP_ON_RESUME
    )
    audio_self_attention: bool = _f(
        False,
        "Add the audio-only self-attention block per layer (original `use_audio_out_self_attention`); starts as an "
        "exact no-op on checkpoints that lack it.",
        _KEEP_ON_RESUME,
    )

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = _not_one_of("model.dtype", self.dtype, ("bfloat16", "float16", "float32"))
        if self.family is not None:
            problems += _not_one_of("model.family", self.family, ("v2", "v3"))
        problems += _not_one_of(
            "model.attn_implementation",
            self.attn_implementation,
            ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        )
        if not self.name_or_path:
            problems.append("model.name_or_path is empty: give a hub id or a local checkpoint folder.")
        return problems


@dataclass
class FinetuneConfig:
    mode: str = _f(
        "lora", "lora (adapters on chosen pathways) or full (all weights trained except `freeze`).", _KEEP_ON_RESUME
    )
    pathways: list[str] = _f(
        [TEXT_ATTN, TEXT_MLP, AUDIO_MLP], f"LoRA pathways: {', '.join(PATHWAYS)}.", _KEEP_ON_RESUME
    )
    train_modules: list[str] = _f(
        [], f"Modules trained in full beside the adapters: {', '.join(TRAIN_MODULES)}.", _KEEP_ON_RESUME
    )
    freeze: list[str] = _f(
        [], "Full mode only: pathways/modules kept frozen (same names as pathways and train_modules).", _KEEP_ON_RESUME
    )
    lora_r: int = _f(16, "LoRA rank.", _KEEP_ON_RESUME)
    lora_alpha: int = _f(32, "LoRA alpha.", _KEEP_ON_RESUME)
    lora_dropout: float = _f(0.05, "LoRA dropout.", _KEEP_ON_RESUME)
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling.", _KEEP_ON_RESUME)
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).", _KEEP_ON_RESUME)

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = _not_one_of("finetune.mode", self.mode, ("lora", "full"))
        for name in self.pathways:
            problems += _not_one_of("finetune.pathways", name, PATHWAYS)
        for name in self.train_modules:
            problems += _not_one_of("finetune.train_modules", name, TRAIN_MODULES)
        for name in self.freeze:
            problems += _not_one_of("finetune.freeze", name, tuple(dict.fromkeys(PATHWAYS + TRAIN_MODULES)))
        for list_name in ("pathways", "train_modules", "freeze"):
            names = getattr(self, list_name)
            repeated = sorted({x for x in names if names.count(x) > 1})
            if repeated:
                problems.append(f"finetune.{list_name} lists {', '.join(repeated)} more than once: list each once.")
        if self.mode == "lora":
            problems += self._lora_problems()
        elif self.mode == "full":
            problems += self._full_problems(was_given)
        return problems

    def _lora_problems(self) -> list[str]:
        problems = []
        if not self.pathways:
            problems.append(
                f"finetune.pathways is empty in lora mode: LoRA needs at least one pathway ({', '.join(PATHWAYS)}). "
                "To train only finetune.train_modules, use mode: full with freeze for the rest."
            )
        if self.freeze:
            problems.append(
                "finetune.freeze is a full-mode option; in lora mode everything outside the adapters is frozen "
                "already. Remove it."
            )
        if self.lora_r <= 0:
            problems.append(f"finetune.lora_r must be > 0, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            problems.append(f"finetune.lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        overlap = sorted(set(self.pathways) & set(self.train_modules))
        if overlap:
            problems.append(
                f"finetune: {', '.join(overlap)} is both a LoRA pathway and a fully trained module: choose one "
                "(remove it from pathways or train_modules)."
            )
        return problems

    def _full_problems(self, was_given: WasGiven) -> list[str]:
        # A value equal to its default changes nothing, and it is what a saved config holds
        # (Config.save and a checkpoint's config.yaml write every field): only options set to
        # another value are reported, so a saved full-mode config loads back.
        defaults = {f.name: _default_value(f) for f in dataclasses.fields(self)}

        def set_to_other(name: str) -> bool:
            return was_given(name) and getattr(self, name) != defaults[name]

        problems = []
        lora_options_set = [name for name in _LORA_OPTIONS if set_to_other(name)]
        if lora_options_set:
            problems.append(
                f"finetune.{', finetune.'.join(lora_options_set)} set in full mode: LoRA options have no effect "
                "there. Remove them or use mode: lora."
            )
        if self.pathways and set_to_other("pathways"):
            problems.append(
                "finetune.pathways set in full mode: all weights are trained; use finetune.freeze to keep parts "
                "frozen (or pathways: [])."
            )
        if self.train_modules:
            problems.append(
                "finetune.train_modules set in full mode: every module is trained already. Remove it (use "
                "finetune.freeze to keep parts frozen)."
            )
        return problems


@dataclass
class DataConfig:
    train_cache: str = _f("", "Folder written by `higgs-tune prepare` for training.", _KEEP_ON_RESUME)
    eval_cache: str | None = _f(None, "Prepared held-out folder; or use eval_fraction.")
    eval_fraction: float = _f(
        0.0,
        "Share of train clips held out for evaluation when eval_cache is not set (split by id, deterministic).",
        _KEEP_ON_RESUME,
    )
    task: str = _f(
        "mixed", "tts (no reference), voice_clone (reference clip of the same speaker), or mixed.", _KEEP_ON_RESUME
    )
    clone_probability: float = _f(0.5, "In mixed mode, the share of samples built as voice cloning.", _KEEP_ON_RESUME)
    system_prompt: str = _f(
        "Generate audio following instruction.",
        "System turn text (the original serve engine's default).",
        _KEEP_ON_RESUME,
    )
    use_scene: bool = _f(True, "Put a clip's `scene` description into the system turn when present.", _KEEP_ON_RESUME)
    max_tokens_per_batch: int = _f(4096, "Token budget per micro-batch (padded length x batch size).", _KEEP_ON_RESUME)
    max_batch_size: int = _f(16, "At most this many samples per micro-batch.", _KEEP_ON_RESUME)
    max_sequence_length: int = _f(
        2048, "Longest sample in tokens; longer samples are an error at start.", _KEEP_ON_RESUME
    )
    bucket_size: int = _f(
        64, "Length bucketing: sort within windows of this many batches' worth of samples.", _KEEP_ON_RESUME
    )
    num_workers: int = _f(0, "DataLoader worker processes.")
    eoc_labels: str = _f(
        "all",
        "Higgs Audio v3 only: which end-of-codebook (EOC) rows of a target are labels: all (the whole EOC fill "
        "after each codebook's codes: the model learns to keep emitting EOC, as SGLang-Omni needs) or first (one "
        "EOC per codebook, as the v2 layout does). v2 always labels one stream end per codebook.",
        _KEEP_ON_RESUME,
    )

    @property
    def has_held_out(self) -> bool:
        return bool(self.eval_cache or self.eval_fraction)

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        if not self.train_cache:
            problems.append("data.train_cache is required: the folder written by `higgs-tune prepare`.")
        problems += _not_one_of("data.task", self.task, ("tts", "voice_clone", "mixed"))
        if not 0 <= self.clone_probability <= 1:
            problems.append(f"data.clone_probability must be in [0, 1], got {self.clone_probability}.")
        if self.task != "mixed" and was_given("clone_probability"):
            problems.append(
                f"data.clone_probability is used only with data.task: mixed (task is {self.task!r}). Remove it or "
                "set task: mixed."
            )
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.eval_cache and self.eval_fraction:
            problems.append("data.eval_cache and data.eval_fraction are both set: choose one held-out source.")
        for name in ("max_tokens_per_batch", "max_batch_size", "max_sequence_length", "bucket_size"):
            if getattr(self, name) <= 0:
                problems.append(f"data.{name} must be > 0, got {getattr(self, name)}.")
        if self.max_sequence_length > self.max_tokens_per_batch:
            problems.append(
                f"data.max_sequence_length ({self.max_sequence_length}) exceeds data.max_tokens_per_batch "
                f"({self.max_tokens_per_batch}): the longest sample would not fit a batch. Raise the budget."
            )
        if self.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {self.num_workers}.")
        problems += _not_one_of("data.eoc_labels", self.eoc_labels, ("all", "first"))
        return problems


@dataclass
class LossConfig:
    text_weight: float = _f(1.0, "Weight of the text CE (0 disables it).", _KEEP_ON_RESUME)
    audio_weight: float = _f(1.0, "Weight of the audio CE (mean over codebooks).", _KEEP_ON_RESUME)
    codebook_weights: list[float] | None = _f(
        None, "Optional per-codebook weights (length = number of codebooks).", _KEEP_ON_RESUME
    )

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        if self.text_weight < 0 or self.audio_weight < 0:
            problems.append(
                f"loss.text_weight and loss.audio_weight must be >= 0, got {self.text_weight} and {self.audio_weight}."
            )
        if self.text_weight == 0 and self.audio_weight == 0:
            problems.append("loss.text_weight and loss.audio_weight are both 0: nothing would be learned. Set one > 0.")
        if self.codebook_weights is not None:
            if any(w < 0 for w in self.codebook_weights) or not any(w > 0 for w in self.codebook_weights):
                problems.append(
                    f"loss.codebook_weights must be >= 0 with at least one > 0, got {self.codebook_weights}."
                )
            if self.audio_weight == 0:
                problems.append(
                    "loss.codebook_weights is set but loss.audio_weight is 0: the audio loss is off. Remove one of "
                    "them."
                )
        return problems


@dataclass
class HealthConfig:
    chance_after_steps: int = _f(
        50, "From this optimizer step on, warn when a loss is still within chance_tolerance of ln(V)."
    )
    chance_tolerance: float = _f(0.05, "Relative distance to ln(V) counted as chance level.")
    copy_check_steps: int = _f(20, "Warn of a copy task when audio accuracy > 0.98 or loss < 0.05 before this step.")
    stop_on_nonfinite: bool = _f(True, "Stop with a named error on a NaN/Inf loss or gradient.")
    quality_alarm_threshold: float = _f(
        0.05,
        "quality_degraded warning: the watched quality metric (checkpoint.best_metric when it is a quality "
        "metric, else cer) worsened by more than this (absolute: 0.05 = 5 CER points or 0.05 similarity) "
        "over quality_alarm_evals evaluations while the training loss fell.",
    )
    quality_alarm_evals: int = _f(3, "K: the number of quality evaluations the worsening is measured over.")
    quality_early_stop: bool = _f(
        False, "Stop training (final checkpoint saved as usual) when quality_degraded fires; best/ keeps the best."
    )

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        if self.chance_after_steps < 0 or self.copy_check_steps < 0:
            problems.append("health.chance_after_steps and health.copy_check_steps must be >= 0.")
        if not 0 < self.chance_tolerance < 1:
            problems.append(f"health.chance_tolerance must be in (0, 1), got {self.chance_tolerance}.")
        if self.quality_alarm_threshold <= 0:
            problems.append(f"health.quality_alarm_threshold must be > 0, got {self.quality_alarm_threshold}.")
        if self.quality_alarm_evals < 1:
            problems.append(f"health.quality_alarm_evals must be >= 1, got {self.quality_alarm_evals}.")
        return problems


@dataclass
class TrainConfig:
    seed: int = _f(42, "Seed for weights init of added modules, data order and dropout.", _KEEP_ON_RESUME)
    max_steps: int | None = _f(None, "Optimizer steps to run (wins over num_epochs).", RESUME_SCHEDULE_LENGTH)
    num_epochs: float | None = _f(None, "Epochs to run when max_steps is not set.", RESUME_SCHEDULE_LENGTH)
    learning_rate: float = _f(1e-4, "Peak learning rate.", _KEEP_ON_RESUME)
    weight_decay: float = _f(0.0, "AdamW weight decay.", _KEEP_ON_RESUME)
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas.", _KEEP_ON_RESUME)
    warmup_steps: int = _f(0, "Linear warm-up steps.", _KEEP_ON_RESUME)
    lr_scheduler: str = _f("cosine", "cosine, linear or constant (after warm-up).", _KEEP_ON_RESUME)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", _KEEP_ON_RESUME)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", _KEEP_ON_RESUME)
    mixed_precision: str = _f("no", "no, bf16 or fp16 (Accelerate autocast).", _KEEP_ON_RESUME)
    log_steps: int = _f(10, "Log metrics (and the prediction preview) every N optimizer steps.")
    eval_steps: int | None = _f(
        None, "Evaluate on the held-out split every N steps (None: only at the end if there is one)."
    )
    sample_steps: int | None = _f(None, "Generate the fixed sample prompts every N steps and save WAVs.")
    num_samples: int = _f(2, "How many fixed prompts to generate at each sample step.")
    quality_eval_steps: int | None = _f(
        None,
        "Every N optimizer steps (and at the end) generate the fixed held-out quality set and score it: CER/WER "
        "(ASR), speaker similarity, duration ratio, stop rate, silence/clipping share; the base model is scored "
        "first (cached). Main process only; each time costs quality_eval_clips clips of generation + ASR. "
        "null: off.",
    )
    quality_eval_clips: int = _f(16, "Clips in the quality set (held-out clips, one speaker after another).")
    quality_eval_seed: int = _f(0, "Seed that picks the quality clips and seeds their generation.")
    quality_asr_model: str = _f(DEFAULT_QUALITY_ASR, "ASR model (Hub id or folder) of the quality evaluation.")
    quality_speaker_model: str = _f(
        DEFAULT_QUALITY_SPEAKER, "Speaker-embedding model (x-vector; Hub id or folder) of the quality evaluation."
    )
    quality_baseline: bool = _f(
        True, "Score the base model on the quality set before training (cached per base model + set)."
    )
    quality_cache_dir: str | None = _f(
        None,
        "Folder of the cached base-model scores; null: $HIGGS_TUNE_CACHE/quality-baselines, else "
        "~/.cache/higgs-tune/quality-baselines.",
    )
    optimizer: str = _f(
        "adamw",
        "adamw (torch AdamW, states in the weights' dtype) or adamw_bf16_sr (torchao AdamW with bf16 stochastic "
        "rounding, for full fine-tuning of bf16 weights; pip install torchao). See train/optim.py.",
        _KEEP_ON_RESUME,
    )

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        if self.max_steps is None and self.num_epochs is None:
            problems.append("train.max_steps or train.num_epochs is required.")
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"train.max_steps must be > 0, got {self.max_steps}.")
        if self.num_epochs is not None and self.num_epochs <= 0:
            problems.append(f"train.num_epochs must be > 0, got {self.num_epochs}.")
        if self.learning_rate <= 0:
            problems.append(f"train.learning_rate must be > 0, got {self.learning_rate}.")
        if self.weight_decay < 0:
            problems.append(f"train.weight_decay must be >= 0, got {self.weight_decay}.")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            problems.append(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}.")
        problems += _not_one_of("train.lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        problems += _not_one_of("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        problems += _not_one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.gradient_accumulation_steps < 1:
            problems.append(f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        if self.max_grad_norm < 0:
            problems.append(f"train.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}.")
        if self.warmup_steps < 0:
            problems.append(f"train.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.max_steps is not None and self.max_steps > 0 and self.warmup_steps > self.max_steps:
            problems.append(
                f"train.warmup_steps ({self.warmup_steps}) exceeds train.max_steps ({self.max_steps}): the peak "
                "learning rate would never be reached. Lower warmup_steps."
            )
        if self.quality_eval_steps is not None:
            if self.quality_eval_clips < 1:
                problems.append(f"train.quality_eval_clips must be >= 1, got {self.quality_eval_clips}.")
            for name in ("quality_asr_model", "quality_speaker_model"):
                if not getattr(self, name):
                    problems.append(f"train.{name} is empty: give a Hub id or a local model folder.")
        for name in ("log_steps", "eval_steps", "sample_steps", "quality_eval_steps"):
            steps = getattr(self, name)
            if steps is not None and steps <= 0:
                problems.append(f"train.{name} must be > 0 (or null), got {steps}.")
        if self.sample_steps is not None and self.num_samples < 1:
            problems.append(f"train.num_samples must be >= 1 when train.sample_steps is set, got {self.num_samples}.")
        return problems


@dataclass
class CheckpointConfig:
    output_dir: str = _f("", "Run folder (required): config, metrics, checkpoints, samples, report.")
    push_to_hub: str | None = _f(
        None, "Hub repo id: upload final/ there at the end (without its resume state; uses your HF token)."
    )
    output_dir_fallback: str | None = _f(None, "Used, loudly, only if output_dir cannot be created or written.")
    save_steps: int = _f(500, "Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = _f(3, "Keep at most N step checkpoints (never the newest complete one or the best).")
    keep_best: bool = _f(
        False,
        "Keep the checkpoint with the best checkpoint.best_metric: never rotated away, and linked as best/ "
        "(its evaluation must divide save_steps).",
    )
    best_metric: str = _f(
        EVAL_LOSS,
        "What 'best' means: eval_loss (lowest), cer / wer (lowest), sim / sim_gt (speaker similarity to the "
        "voice prompt / ground truth, highest) or cer_sim (CER + 1 - sim, lowest); quality metrics need "
        "train.quality_eval_steps.",
    )
    on_save_error: str = _f(
        "abort",
        "abort, or continue (log the error and retry at the next save; the run still fails if the final save fails).",
    )
    min_free_gb: float = _f(1.0, "Free space to keep on the output disk beyond the checkpoint estimate.")

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        if not self.output_dir:
            problems.append("checkpoint.output_dir is required: the run folder for checkpoints, metrics and samples.")
        if (
            self.output_dir_fallback is not None
            and self.output_dir
            and Path(self.output_dir_fallback) == Path(self.output_dir)
        ):
            problems.append(
                "checkpoint.output_dir_fallback is the same folder as checkpoint.output_dir: give another disk's "
                "folder or remove it."
            )
        if self.save_steps <= 0:
            problems.append(f"checkpoint.save_steps must be > 0, got {self.save_steps}.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(
                f"checkpoint.save_total_limit must be >= 1 (or null to keep all), got {self.save_total_limit}."
            )
        problems += _not_one_of("checkpoint.on_save_error", self.on_save_error, ("abort", "continue"))
        problems += _not_one_of("checkpoint.best_metric", self.best_metric, BEST_METRICS)
        if self.min_free_gb < 0:
            problems.append(f"checkpoint.min_free_gb must be >= 0, got {self.min_free_gb}.")
        return problems


@dataclass
class LoggingConfig:
    report_to: list[str] = _f(
        ["tensorboard"], "Trackers beside the metrics JSONL: tensorboard, wandb, trackio (or none)."
    )
    preview_samples: int = _f(1, "Samples shown in the decoded prediction preview.")

    def validate(self, was_given: WasGiven) -> list[str]:
        problems = []
        for name in self.report_to:
            problems += _not_one_of("logging.report_to", name, ("tensorboard", "wandb", "trackio", "none"))
        if "none" in self.report_to and len(self.report_to) > 1:
            problems.append(
                f"logging.report_to lists none beside {', '.join(x for x in self.report_to if x != 'none')}: use "
                "[none] alone or drop it."
            )
        if self.preview_samples < 0:
            problems.append(f"logging.preview_samples must be >= 0, got {self.preview_samples}.")
        return problems


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str | None = None, given: set[str] | None = None) -> Config:
        """Collect every problem of every section; raise one ConfigError listing them all.

        Each section checks its own settings (`<Section>.validate`); the checks that tie two
        sections together follow the section they are about. `given`: the dotted keys the user
        set (from `config_from_dict`). Options that only matter in another mode are
        contradictions when given explicitly; for a Config built in code (given=None) they
        count as given when they differ from the default.
        """
        links = {
            "finetune": self._finetune_needs_model_parts,
            "loss": self._text_loss_needs_text_head,
            "train": lambda: (
                self._precision_fits_dtype() + self._full_update_precision(self._was_given("train", given))
            ),
            "checkpoint": self._eval_needs_held_out_split,
            "logging": self._quality_needs_its_evaluation,
        }
        problems: list[str] = []
        for section_field in dataclasses.fields(self):
            name = section_field.name
            nonfinite = _nonfinite_floats(name, getattr(self, name))
            if nonfinite:  # the section's range checks would compare NaN: report only this
                problems += nonfinite
                continue
            problems += getattr(self, name).validate(self._was_given(name, given))
            if name in links:
                problems += links[name]()
        if problems:
            raise ConfigError(problems, source)
        return self

    def _was_given(self, section: str, given: set[str] | None) -> WasGiven:
        obj = getattr(self, section)

        def was_given(name: str) -> bool:
            if given is not None:
                return f"{section}.{name}" in given
            return getattr(obj, name) != _default_value(next(x for x in dataclasses.fields(obj) if x.name == name))

        return was_given

    def _finetune_needs_model_parts(self) -> list[str]:
        finetune, model, problems = self.finetune, self.model, []
        if AUDIO_ATTN in finetune.pathways + finetune.train_modules and not model.audio_self_attention:
            problems.append(
                "finetune names audio_attn but model.audio_self_attention is false: set it true or remove audio_attn."
            )
        if TEXT_LM_HEAD in finetune.train_modules and not model.use_text_head:
            problems.append(
                "finetune.train_modules has text_lm_head but model.use_text_head is false: set use_text_head true "
                "or remove text_lm_head."
            )
        return problems

    def _text_loss_needs_text_head(self) -> list[str]:
        if self.loss.text_weight > 0 and not self.model.use_text_head:
            return ["loss.text_weight > 0 but model.use_text_head is false: set use_text_head true or text_weight 0."]
        return []

    def _precision_fits_dtype(self) -> list[str]:
        if self.train.mixed_precision == "fp16" and self.model.dtype == "bfloat16":
            return ["train.mixed_precision fp16 with model.dtype bfloat16: use bf16, or load float32/float16 weights."]
        return []

    def _full_update_precision(self, train_given: WasGiven) -> list[str]:
        """Issue 17: full fine-tuning of 16-bit weights with a plain AdamW rounds most updates away."""
        model, finetune, train = self.model, self.finetune, self.train
        if train.optimizer == "adamw_bf16_sr" and model.dtype != "bfloat16":
            return [
                f"train.optimizer: adamw_bf16_sr rounds updates into bf16 weights, but model.dtype is {model.dtype}: "
                "set model.dtype: bfloat16, or use train.optimizer: adamw."
            ]
        lossy = finetune.mode == "full" and model.dtype in ("bfloat16", "float16") and train.optimizer == "adamw"
        if lossy and not train_given("optimizer"):
            return [
                f"finetune.mode full with model.dtype {model.dtype} and a plain AdamW: most updates round away in "
                "16-bit weights at fine-tuning learning rates (benchmarks/bf16_precision.py: at lr 2e-5, 29% of the "
                "weights a step reaches change, against all of them with float32 master weights). Use float32 master "
                "weights (model.dtype: float32 with train.mixed_precision: bf16; 18 bytes per parameter), or "
                "train.optimizer: adamw_bf16_sr (bf16 weights, stochastic rounding, torchao; 8 bytes per parameter), "
                "or set train.optimizer: adamw explicitly to accept the rounding."
            ]
        return []

    def _eval_needs_held_out_split(self) -> list[str]:
        checkpoint, train, problems = self.checkpoint, self.train, []
        has_held_out = self.data.has_held_out
        if checkpoint.keep_best and checkpoint.best_metric == EVAL_LOSS:
            if train.eval_steps is None:
                problems.append(
                    "checkpoint.keep_best needs train.eval_steps: the best checkpoint is chosen by eval loss."
                )
            elif train.eval_steps > 0 and checkpoint.save_steps > 0 and checkpoint.save_steps % train.eval_steps:
                problems.append(
                    f"checkpoint.save_steps ({checkpoint.save_steps}) is not a multiple of train.eval_steps "
                    f"({train.eval_steps}): with keep_best every save needs a fresh eval loss. Make save_steps a "
                    "multiple of eval_steps."
                )
            if not has_held_out:
                problems.append(
                    "checkpoint.keep_best needs a held-out split: set data.eval_cache or data.eval_fraction."
                )
        if train.eval_steps is not None and not has_held_out:
            problems.append(
                "train.eval_steps is set but there is no held-out split: set data.eval_cache or data.eval_fraction."
            )
        return problems

    def _quality_needs_its_evaluation(self) -> list[str]:
        checkpoint, train, problems = self.checkpoint, self.train, []
        every = train.quality_eval_steps
        if checkpoint.best_metric in QUALITY_METRICS:
            if every is None:
                problems.append(
                    f"checkpoint.best_metric {checkpoint.best_metric} needs train.quality_eval_steps: the quality "
                    "metric is measured by the in-training quality evaluation."
                )
            elif checkpoint.keep_best and every > 0 and checkpoint.save_steps > 0 and checkpoint.save_steps % every:
                problems.append(
                    f"checkpoint.save_steps ({checkpoint.save_steps}) is not a multiple of train.quality_eval_steps "
                    f"({every}): with keep_best by {checkpoint.best_metric} every save needs a fresh score. "
                    "Make save_steps a multiple of quality_eval_steps."
                )
        if every is not None and not self.data.has_held_out:
            problems.append(
                "train.quality_eval_steps is set but there is no held-out split: the quality set is made of "
                "held-out clips. Set data.eval_cache or data.eval_fraction."
            )
        if self.health.quality_early_stop and every is None:
            problems.append("health.quality_early_stop needs train.quality_eval_steps (the alarm watches it).")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


# Accepted spellings of a key that lead to its canonical name.
ALIASES = {("model", "use_audio_out_self_attention"): "audio_self_attention"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _default_value(fld: dataclasses.Field) -> Any:
    return fld.default_factory() if fld.default is dataclasses.MISSING else fld.default


@dataclass(frozen=True)
class ConfigKey:
    """One setting, as `config_keys` describes it."""

    name: str  # dotted: "train.learning_rate"
    type: str  # in words: "a number", "an integer or null"
    default: Any
    help: str
    resume: str | None  # RESUME_MUST_MATCH, RESUME_SCHEDULE_LENGTH, or None (free to change on resume)


def config_keys() -> list[ConfigKey]:
    """Every setting of the config, in file order, with its type, default, help and resume rule."""
    keys = []
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            keys.append(
                ConfigKey(
                    f"{section}.{fld.name}",
                    _type_name(hints[fld.name]),
                    _default_value(fld),
                    fld.metadata.get("help", ""),
                    fld.metadata.get("resume"),
                )
            )
    return keys


def resume_keys(requirement: str = RESUME_MUST_MATCH) -> tuple[str, ...]:
    """The dotted keys whose field carries `resume: requirement` (see RESUME_MUST_MATCH)."""
    return tuple(key.name for key in config_keys() if key.resume == requirement)


def _did_you_mean(section: str, key: str) -> str:
    """A hint for an unknown key: close names in its section, or the section where it lives."""
    classes = _section_classes()
    if not section:
        close = difflib.get_close_matches(str(key), list(classes), n=2, cutoff=0.6)
        return f" Did you mean {' or '.join(close)}?" if close else f" Sections: {', '.join(classes)}."
    elsewhere = [s for s, cls in classes.items() if s != section and key in {x.name for x in dataclasses.fields(cls)}]
    if elsewhere:  # the right name in the wrong section beats a near miss in this one
        return f" It belongs in another section: {elsewhere[0]}.{key}."
    names = [x.name for x in dataclasses.fields(classes[section])] if section in classes else []
    close = difflib.get_close_matches(str(key), names, n=2, cutoff=0.6)
    if close:
        return f" Did you mean {' or '.join(f'{section}.{c}' for c in close)}?"
    return ""


def _build(cls, data: Any, path: str, problems: list[str], given: set[str], bad: set[str]):
    """Instantiate dataclass `cls` from a mapping, recording unknown keys and type errors.

    `given` collects the dotted keys present; `bad` the keys (or sections) whose value was
    rejected here, so that validation does not add a second, derived complaint about them.
    """
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping of settings, got {type(data).__name__} {data!r}.")
        bad.add(path)
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    section = path.split(".")[-1] if path else ""
    kwargs = {}
    seen_as: dict[str, str] = {}
    for raw_key, value in data.items():
        key = ALIASES.get((section, raw_key), raw_key)
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{path + '.' if path else ''}{raw_key}: unknown key.{_did_you_mean(section, raw_key)}")
            continue
        if key in seen_as:
            problems.append(f"{path}.{raw_key} and {path}.{seen_as[key]} are the same setting: keep only {path}.{key}.")
            bad.add(full)
            continue
        seen_as[key] = raw_key
        given.add(full)
        hint = hints[key]
        if isinstance(value, _Override):
            # `key=value` from the command line: the YAML reading of the text, unless the
            # setting is a string and YAML made something else of it (`Speak: slowly.`).
            ok, _ = _coerce(value.parsed, hint)
            value = value.parsed if ok or not _coerce(value.raw, hint)[0] else value.raw
        if dataclasses.is_dataclass(hint):
            if value is None:  # an empty section in YAML (`train:` with nothing under it)
                value = {}
            kwargs[key] = _build(hint, value, full, problems, given, bad)
        else:
            ok, coerced = _coerce(value, hint)
            if not ok:
                problems.append(f"{full}: expected {_type_name(hint)}, got {value!r}.")
                bad.add(full)
                continue
            kwargs[key] = coerced
    return cls(**kwargs)


def _type_name(hint) -> str:
    """The expected type in words: `float | None` -> "a number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if isinstance(hint, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint).replace("typing.", "")


def _nonfinite_floats(section: str, obj) -> list[str]:
    """Every float setting (and float list item) of a section must be a finite number: `.nan` and
    `.inf` are valid YAML floats but no valid learning rate, norm or size."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = "must hold finite numbers" if isinstance(value, list) else "must be a finite number"
            problems.append(f"{section}.{f.name} {what}, got {value!r}.")
    return problems


# YAML 1.1 (PyYAML) reads `3e-4` as a string (it wants `3.0e-4`): accept such numbers for floats.
_FLOAT_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _coerce(value: Any, hint) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _coerce(item, args[0] if args else Any)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if hint is Any:
        return True, value
    if hint is bool:
        return (isinstance(value, bool), value)
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return True, float(value)
        return False, value
    if hint is str:
        return (isinstance(value, str), value)
    return isinstance(value, hint), value


@dataclass(frozen=True)
class _Override:
    """An override's value: its text and the YAML reading of it (`_build` picks by type)."""

    raw: str
    parsed: Any


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Apply `section.key=value` overrides in place; values are parsed as YAML (`3e-4`, `[a, b]`, `null`)."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected section.key=value, e.g. train.learning_rate=3e-4.")
            continue
        dotted, raw = item.split("=", 1)
        parts = [x.strip() for x in dotted.strip().split(".")]
        if len(parts) < 2 or not all(parts):
            problems.append(f"override {item!r}: expected section.key=value, e.g. train.learning_rate=3e-4.")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}). Quote it.")
            continue
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section.")
                break
        else:
            node[parts[-1]] = _Override(raw.strip(), value)
    return data


def config_from_dict(data: dict, overrides: list[str] = (), source: str | None = None) -> Config:
    """Build and validate a Config from a mapping (+ overrides); one ConfigError lists every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the config must be a mapping of sections (model, finetune, data, ...), got {type(data).__name__}."],
            source,
        )
    data = apply_overrides(copy.deepcopy(data), list(overrides), problems)
    given: set[str] = set()
    bad: set[str] = set()
    cfg = _build(Config, data, "", problems, given, bad)
    try:
        cfg.validate(source, given)
    except ConfigError as e:
        # A value rejected while reading was replaced by its default; validation messages
        # about that key would describe the default, not what the user wrote: drop them.
        problems.extend(
            x for x in e.problems if not any(re.search(rf"(?<![\w.]){re.escape(b)}(?![\w])", x) for b in bad)
        )
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate; relative data/output paths stay as written."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist."]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {path} is a folder: give the YAML file."]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file {path} is not UTF-8 ({e.reason} at byte {e.start})."]) from None
    text = fill_placeholders(text, str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path} is not valid YAML: {e}"]) from None
    return config_from_dict(data, overrides, source=str(path))


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_placeholders(text: str, source: str | None = None, values: Mapping[str, str] | None = None) -> str:
    """Replace every `${NAME}` in a config's text by `values[NAME]` (default: the environment).

    A placeholder with no value is an error naming it (never a folder literally called
    `${OUTPUT_DIR}` or a model path that cannot load). Comments are not filled.
    """
    values = os.environ if values is None else values
    missing: list[str] = []
    out_lines = []
    for line in text.splitlines(keepends=True):
        code, hash_, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)

        def fill(m: re.Match) -> str:
            name = m.group(1)
            if name not in values:
                if name not in missing:
                    missing.append(name)
                return m.group(0)
            return str(values[name])

        out_lines.append(_PLACEHOLDER.sub(fill, code) + hash_ + comment)
    if missing:
        raise ConfigError(
            [
                f"${{{name}}} has no value: set the environment variable {name} "
                f"(e.g. `{name}=... higgs-tune train ...`) or write the value into the config."
                for name in missing
            ],
            source,
        )
    return "".join(out_lines)


def config_help() -> str:
    """Every setting with its type, default and help text (for `higgs-tune train --help-config`):
    one block per section, `  key (type, default D): help`, so `section.key` is its dotted name."""
    lines = []
    section = None
    for key in config_keys():
        key_section, name = key.name.split(".", 1)
        if key_section != section:
            section = key_section
            lines.append(f"{section}:")
        lines.append(f"  {name} ({key.type}, default {key.default!r}): {key.help}")
    aliases = ", ".join(f"{s}.{a} -> {s}.{c}" for (s, a), c in ALIASES.items())
    lines.append(f"aliases: {aliases}")
    return "\n".join(lines)
