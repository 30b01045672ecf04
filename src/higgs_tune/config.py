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
import re
import types
import typing
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


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw):
    """A dataclass field with a help string (shown by `higgs-tune train --help-config`)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f("bosonai/higgs-audio-v2-generation-3B-base", "Hub id or local folder of a Higgs Audio v2 checkpoint (transformers layout; original `higgs_audio` layout is detected and converted).")
    audio_tokenizer: str | None = _f(None, "Audio tokenizer id or folder; default: `<name_or_path>/audio_tokenizer` if present, else what the processor config records.")
    dtype: str = _f("bfloat16", "Weights dtype: bfloat16, float16 or float32.")
    attn_implementation: str = _f("sdpa", "Attention backend: sdpa, eager or flash_attention_2 (when installed).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    use_text_head: bool = _f(True, "Build `text_lm_head` and load its weights (needed for the text loss).")
    audio_self_attention: bool = _f(False, "Add the audio-only self-attention block per layer (original `use_audio_out_self_attention`); starts as an exact no-op on checkpoints that lack it.")


@dataclass
class FinetuneConfig:
    mode: str = _f("lora", "lora (adapters on chosen pathways) or full (all weights trained except `freeze`).")
    pathways: list[str] = _f(["text_attn", "text_mlp", "audio_mlp"], "LoRA pathways: text_attn, text_mlp, audio_mlp, audio_attn.")
    train_modules: list[str] = _f([], "Modules trained in full beside the adapters: audio_lm_head, audio_embeddings, text_lm_head, text_embeddings, audio_attn.")
    freeze: list[str] = _f([], "Full mode only: pathways/modules kept frozen (same names as pathways and train_modules).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")


@dataclass
class DataConfig:
    train_cache: str = _f("", "Folder written by `higgs-tune prepare` for training.")
    eval_cache: str | None = _f(None, "Prepared held-out folder; or use eval_fraction.")
    eval_fraction: float = _f(0.0, "Share of train clips held out for evaluation when eval_cache is not set (split by id, deterministic).")
    task: str = _f("mixed", "tts (no reference), voice_clone (reference clip of the same speaker), or mixed.")
    clone_probability: float = _f(0.5, "In mixed mode, the share of samples built as voice cloning.")
    system_prompt: str = _f("Generate audio following instruction.", "System turn text (the original serve engine's default).")
    use_scene: bool = _f(True, "Put a clip's `scene` description into the system turn when present.")
    max_tokens_per_batch: int = _f(4096, "Token budget per micro-batch (padded length x batch size).")
    max_batch_size: int = _f(16, "At most this many samples per micro-batch.")
    max_sequence_length: int = _f(2048, "Longest sample in tokens; longer samples are an error at start.")
    bucket_size: int = _f(64, "Length bucketing: sort within windows of this many batches' worth of samples.")
    num_workers: int = _f(0, "DataLoader worker processes.")


@dataclass
class LossConfig:
    text_weight: float = _f(1.0, "Weight of the text CE (0 disables it).")
    audio_weight: float = _f(1.0, "Weight of the audio CE (mean over codebooks).")
    codebook_weights: list[float] | None = _f(None, "Optional per-codebook weights (length = number of codebooks).")


@dataclass
class HealthConfig:
    chance_after_steps: int = _f(50, "From this optimizer step on, warn when a loss is still within chance_tolerance of ln(V).")
    chance_tolerance: float = _f(0.05, "Relative distance to ln(V) counted as chance level.")
    copy_check_steps: int = _f(20, "Warn of a copy task when audio accuracy > 0.98 or loss < 0.05 before this step.")
    stop_on_nonfinite: bool = _f(True, "Stop with a named error on a NaN/Inf loss or gradient.")


@dataclass
class TrainConfig:
    seed: int = _f(42, "Seed for weights init of added modules, data order and dropout.")
    max_steps: int | None = _f(None, "Optimizer steps to run (wins over num_epochs).")
    num_epochs: float | None = _f(None, "Epochs to run when max_steps is not set.")
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    lr_scheduler: str = _f("cosine", "cosine, linear or constant (after warm-up).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (Accelerate autocast).")
    log_steps: int = _f(10, "Log metrics (and the prediction preview) every N optimizer steps.")
    eval_steps: int | None = _f(None, "Evaluate on the held-out split every N steps (None: only at the end if there is one).")
    sample_steps: int | None = _f(None, "Generate the fixed sample prompts every N steps and save WAVs.")
    num_samples: int = _f(2, "How many fixed prompts to generate at each sample step.")
    optimizer: str = _f("adamw", "adamw (torch AdamW, states in the weights' dtype) or adamw_bf16_sr (torchao AdamW with bf16 stochastic rounding, for full fine-tuning of bf16 weights; pip install torchao). See train/optim.py.")


@dataclass
class CheckpointConfig:
    output_dir: str = _f("", "Run folder (required): config, metrics, checkpoints, samples, report.")
    output_dir_fallback: str | None = _f(None, "Used, loudly, only if output_dir cannot be created or written.")
    save_steps: int = _f(500, "Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = _f(3, "Keep at most N step checkpoints (never the newest complete one or the best).")
    keep_best: bool = _f(False, "Keep the checkpoint with the lowest eval loss (needs eval_steps dividing save_steps).")
    on_save_error: str = _f("abort", "abort, or continue (log the error and retry at the next save; the run still fails if the final save fails).")
    min_free_gb: float = _f(1.0, "Free space to keep on the output disk beyond the checkpoint estimate.")


@dataclass
class LoggingConfig:
    report_to: list[str] = _f(["tensorboard"], "Trackers beside the metrics JSONL: tensorboard, wandb, trackio (or none).")
    preview_samples: int = _f(1, "Samples shown in the decoded prediction preview.")


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
    def validate(self, source: str | None = None, given: set[str] | None = None) -> "Config":
        """Collect every problem; raise one ConfigError listing them all.

        `given`: the dotted keys the user set (from `config_from_dict`). Options that only
        matter in another mode are contradictions when given explicitly; for a Config built
        in code (given=None) they count as given when they differ from the default.
        """
        p: list[str] = []
        m, f, d, t, c, h = self.model, self.finetune, self.data, self.train, self.checkpoint, self.health

        def one_of(name, value, allowed):
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                p.append(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}.{hint}")

        def was_given(section: str, name: str) -> bool:
            if given is not None:
                return f"{section}.{name}" in given
            obj = getattr(self, section)
            default = next(x for x in dataclasses.fields(obj) if x.name == name)
            value = default.default_factory() if default.default is dataclasses.MISSING else default.default
            return getattr(obj, name) != value

        one_of("model.dtype", m.dtype, ("bfloat16", "float16", "float32"))
        one_of("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"))
        if not m.name_or_path:
            p.append("model.name_or_path is empty: give a hub id or a local checkpoint folder.")
        one_of("finetune.mode", f.mode, ("lora", "full"))
        known_pathways = ("text_attn", "text_mlp", "audio_mlp", "audio_attn")
        known_modules = ("audio_lm_head", "audio_embeddings", "text_lm_head", "text_embeddings", "audio_attn")
        for name in f.pathways:
            one_of("finetune.pathways", name, known_pathways)
        for name in f.train_modules:
            one_of("finetune.train_modules", name, known_modules)
        for name in f.freeze:
            one_of("finetune.freeze", name, tuple(dict.fromkeys(known_pathways + known_modules)))
        for name in ("pathways", "train_modules", "freeze"):
            dup = sorted({x for x in getattr(f, name) if getattr(f, name).count(x) > 1})
            if dup:
                p.append(f"finetune.{name} lists {', '.join(dup)} more than once: list each once.")
        if f.mode == "lora":
            if not f.pathways:
                p.append("finetune.pathways is empty in lora mode: LoRA needs at least one pathway (text_attn, text_mlp, "
                         "audio_mlp, audio_attn). To train only finetune.train_modules, use mode: full with freeze for the rest.")
            if f.freeze:
                p.append("finetune.freeze is a full-mode option; in lora mode everything outside the adapters is frozen already. Remove it.")
            if f.lora_r <= 0:
                p.append(f"finetune.lora_r must be > 0, got {f.lora_r}.")
            if f.lora_alpha <= 0:
                p.append(f"finetune.lora_alpha must be > 0, got {f.lora_alpha}.")
            if not 0 <= f.lora_dropout < 1:
                p.append(f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}.")
            overlap = sorted(set(f.pathways) & set(f.train_modules))
            if overlap:
                p.append(f"finetune: {', '.join(overlap)} is both a LoRA pathway and a fully trained module: choose one (remove it from pathways or train_modules).")
        elif f.mode == "full":
            lora_fields = ("lora_r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")
            changed = [n for n in lora_fields if was_given("finetune", n)]
            if changed:
                p.append(f"finetune.{', finetune.'.join(changed)} set in full mode: LoRA options have no effect there. Remove them or use mode: lora.")
            if f.pathways and was_given("finetune", "pathways"):
                p.append("finetune.pathways set in full mode: all weights are trained; use finetune.freeze to keep parts frozen (or pathways: []).")
            if f.train_modules:
                p.append("finetune.train_modules set in full mode: every module is trained already. Remove it (use finetune.freeze to keep parts frozen).")
        if "audio_attn" in f.pathways + f.train_modules and not m.audio_self_attention:
            p.append("finetune names audio_attn but model.audio_self_attention is false: set it true or remove audio_attn.")
        if "text_lm_head" in f.train_modules and not m.use_text_head:
            p.append("finetune.train_modules has text_lm_head but model.use_text_head is false: set use_text_head true or remove text_lm_head.")

        if not d.train_cache:
            p.append("data.train_cache is required: the folder written by `higgs-tune prepare`.")
        one_of("data.task", d.task, ("tts", "voice_clone", "mixed"))
        if not 0 <= d.clone_probability <= 1:
            p.append(f"data.clone_probability must be in [0, 1], got {d.clone_probability}.")
        if d.task != "mixed" and was_given("data", "clone_probability"):
            p.append(f"data.clone_probability is used only with data.task: mixed (task is {d.task!r}). Remove it or set task: mixed.")
        if not 0 <= d.eval_fraction < 1:
            p.append(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}.")
        if d.eval_cache and d.eval_fraction:
            p.append("data.eval_cache and data.eval_fraction are both set: choose one held-out source.")
        for name in ("max_tokens_per_batch", "max_batch_size", "max_sequence_length", "bucket_size"):
            if getattr(d, name) <= 0:
                p.append(f"data.{name} must be > 0, got {getattr(d, name)}.")
        if d.max_sequence_length > d.max_tokens_per_batch:
            p.append(f"data.max_sequence_length ({d.max_sequence_length}) exceeds data.max_tokens_per_batch ({d.max_tokens_per_batch}): the longest sample would not fit a batch. Raise the budget.")
        if d.num_workers < 0:
            p.append(f"data.num_workers must be >= 0, got {d.num_workers}.")

        lw = self.loss
        if lw.text_weight < 0 or lw.audio_weight < 0:
            p.append(f"loss.text_weight and loss.audio_weight must be >= 0, got {lw.text_weight} and {lw.audio_weight}.")
        if lw.text_weight == 0 and lw.audio_weight == 0:
            p.append("loss.text_weight and loss.audio_weight are both 0: nothing would be learned. Set one > 0.")
        if lw.text_weight > 0 and not m.use_text_head:
            p.append("loss.text_weight > 0 but model.use_text_head is false: set use_text_head true or text_weight 0.")
        if lw.codebook_weights is not None:
            if any(w < 0 for w in lw.codebook_weights) or not any(w > 0 for w in lw.codebook_weights):
                p.append(f"loss.codebook_weights must be >= 0 with at least one > 0, got {lw.codebook_weights}.")
            if lw.audio_weight == 0:
                p.append("loss.codebook_weights is set but loss.audio_weight is 0: the audio loss is off. Remove one of them.")

        if h.chance_after_steps < 0 or h.copy_check_steps < 0:
            p.append("health.chance_after_steps and health.copy_check_steps must be >= 0.")
        if not 0 < h.chance_tolerance < 1:
            p.append(f"health.chance_tolerance must be in (0, 1), got {h.chance_tolerance}.")

        if t.max_steps is None and t.num_epochs is None:
            p.append("train.max_steps or train.num_epochs is required.")
        if t.max_steps is not None and t.max_steps <= 0:
            p.append(f"train.max_steps must be > 0, got {t.max_steps}.")
        if t.num_epochs is not None and t.num_epochs <= 0:
            p.append(f"train.num_epochs must be > 0, got {t.num_epochs}.")
        if t.learning_rate <= 0:
            p.append(f"train.learning_rate must be > 0, got {t.learning_rate}.")
        if t.weight_decay < 0:
            p.append(f"train.weight_decay must be >= 0, got {t.weight_decay}.")
        if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
            p.append(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}.")
        one_of("train.lr_scheduler", t.lr_scheduler, ("cosine", "linear", "constant"))
        one_of("train.mixed_precision", t.mixed_precision, ("no", "bf16", "fp16"))
        if t.gradient_accumulation_steps < 1:
            p.append(f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}.")
        if t.max_grad_norm < 0:
            p.append(f"train.max_grad_norm must be >= 0 (0 disables clipping), got {t.max_grad_norm}.")
        if t.warmup_steps < 0:
            p.append(f"train.warmup_steps must be >= 0, got {t.warmup_steps}.")
        if t.max_steps is not None and t.max_steps > 0 and t.warmup_steps > t.max_steps:
            p.append(f"train.warmup_steps ({t.warmup_steps}) exceeds train.max_steps ({t.max_steps}): the peak learning rate would never be reached. Lower warmup_steps.")
        for name in ("log_steps", "eval_steps", "sample_steps"):
            v = getattr(t, name)
            if v is not None and v <= 0:
                p.append(f"train.{name} must be > 0 (or null), got {v}.")
        if t.sample_steps is not None and t.num_samples < 1:
            p.append(f"train.num_samples must be >= 1 when train.sample_steps is set, got {t.num_samples}.")
        if t.mixed_precision == "fp16" and m.dtype == "bfloat16":
            p.append("train.mixed_precision fp16 with model.dtype bfloat16: use bf16, or load float32/float16 weights.")

        if not c.output_dir:
            p.append("checkpoint.output_dir is required: the run folder for checkpoints, metrics and samples.")
        if c.output_dir_fallback is not None and c.output_dir and Path(c.output_dir_fallback) == Path(c.output_dir):
            p.append("checkpoint.output_dir_fallback is the same folder as checkpoint.output_dir: give another disk's folder or remove it.")
        if c.save_steps <= 0:
            p.append(f"checkpoint.save_steps must be > 0, got {c.save_steps}.")
        if c.save_total_limit is not None and c.save_total_limit < 1:
            p.append(f"checkpoint.save_total_limit must be >= 1 (or null to keep all), got {c.save_total_limit}.")
        one_of("checkpoint.on_save_error", c.on_save_error, ("abort", "continue"))
        if c.min_free_gb < 0:
            p.append(f"checkpoint.min_free_gb must be >= 0, got {c.min_free_gb}.")
        has_eval = bool(d.eval_cache or d.eval_fraction)
        if c.keep_best:
            if t.eval_steps is None:
                p.append("checkpoint.keep_best needs train.eval_steps: the best checkpoint is chosen by eval loss.")
            elif t.eval_steps > 0 and c.save_steps > 0 and c.save_steps % t.eval_steps:
                p.append(f"checkpoint.save_steps ({c.save_steps}) is not a multiple of train.eval_steps ({t.eval_steps}): with keep_best every save needs a fresh eval loss. Make save_steps a multiple of eval_steps.")
            if not has_eval:
                p.append("checkpoint.keep_best needs a held-out split: set data.eval_cache or data.eval_fraction.")
        if t.eval_steps is not None and not has_eval:
            p.append("train.eval_steps is set but there is no held-out split: set data.eval_cache or data.eval_fraction.")
        for name in self.logging.report_to:
            one_of("logging.report_to", name, ("tensorboard", "wandb", "trackio", "none"))
        if "none" in self.logging.report_to and len(self.logging.report_to) > 1:
            p.append(f"logging.report_to lists none beside {', '.join(x for x in self.logging.report_to if x != 'none')}: use [none] alone or drop it.")
        if self.logging.preview_samples < 0:
            p.append(f"logging.preview_samples must be >= 0, got {self.logging.preview_samples}.")

        p.extend(_precision_problems(self, was_given))  # issue 17: bf16 full fine-tuning
        if p:
            raise ConfigError(p, source)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _precision_problems(cfg: "Config", was_given) -> list[str]:
    """train.optimizer, and full fine-tuning of 16-bit weights with a plain AdamW (updates rounded away)."""
    m, f, t = cfg.model, cfg.finetune, cfg.train
    if t.optimizer not in ("adamw", "adamw_bf16_sr"):
        close = difflib.get_close_matches(str(t.optimizer), ["adamw", "adamw_bf16_sr"], n=1)
        return [f"train.optimizer: {t.optimizer!r} is not one of adamw, adamw_bf16_sr." + (f" Did you mean {close[0]!r}?" if close else "")]
    if t.optimizer == "adamw_bf16_sr" and m.dtype != "bfloat16":
        return [f"train.optimizer: adamw_bf16_sr rounds updates into bf16 weights, but model.dtype is {m.dtype}: "
                "set model.dtype: bfloat16, or use train.optimizer: adamw."]
    if f.mode == "full" and m.dtype in ("bfloat16", "float16") and t.optimizer == "adamw" and not was_given("train", "optimizer"):
        return [f"finetune.mode full with model.dtype {m.dtype} and a plain AdamW: most updates round away in 16-bit weights at "
                "fine-tuning learning rates (benchmarks/bf16_precision.py: at lr 2e-5, 29% of the weights a step reaches change, "
                "against all of them with float32 master weights). Use float32 master weights (model.dtype: float32 with "
                "train.mixed_precision: bf16; 18 bytes per parameter), or train.optimizer: adamw_bf16_sr (bf16 weights, "
                "stochastic rounding, torchao; 8 bytes per parameter), or set train.optimizer: adamw explicitly to accept the rounding."]
    return []


# Accepted spellings of a key that lead to its canonical name.
ALIASES = {("model", "use_audio_out_self_attention"): "audio_self_attention"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


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
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "")


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
        raise ConfigError([f"the config must be a mapping of sections (model, finetune, data, ...), got {type(data).__name__}."], source)
    data = apply_overrides(copy.deepcopy(data), list(overrides), problems)
    given: set[str] = set()
    bad: set[str] = set()
    cfg = _build(Config, data, "", problems, given, bad)
    try:
        cfg.validate(source, given)
    except ConfigError as e:
        # A value rejected while reading was replaced by its default; validation messages
        # about that key would describe the default, not what the user wrote: drop them.
        problems.extend(x for x in e.problems if not any(re.search(rf"(?<![\w.]){re.escape(b)}(?![\w])", x) for b in bad))
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path} is not valid YAML: {e}"]) from None
    return config_from_dict(data, overrides, source=str(path))


def config_help() -> str:
    """Every setting with its type, default and help text (for `higgs-tune train --help-config`)."""
    lines = []
    for section, cls in _section_classes().items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            default = fld.default_factory() if fld.default is dataclasses.MISSING else fld.default
            lines.append(f"  {fld.name} ({_type_name(hints[fld.name])}, default {default!r}): {fld.metadata.get('help', '')}")
    aliases = ", ".join(f"{s}.{a} -> {s}.{c}" for (s, a), c in ALIASES.items())
    lines.append(f"aliases: {aliases}")
    return "\n".join(lines)
