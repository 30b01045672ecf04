"""Checkpoints that are never torn, verified after writing, and resumed exactly.

Layout of a run folder (`run_dir`, prepared by `train.outdir.prepare_output_dir`):

    checkpoint-<step>/            one complete, verified checkpoint per save
      <weights files>             written by the injected `save_weights(dir)`: a PEFT adapter
                                  (adapter_model.safetensors + adapter_config.json [+ README.md])
                                  or the full model in safetensors, audio-attention weights included
      training_state.pt           optimizer, scheduler, grad scaler, sampler state, step, epoch and
                                  the RNG states of every rank; read back with weights_only=True
      config.yaml                 the resolved config of the run
      manifest.json               step, epoch, world size, metrics, and every file's size + sha256
    final/                        the same layout, written by `save(final=True)`; never rotated
    checkpoints.json              index for people and tools: latest, best, final (derived data:
                                  resume never trusts it, it re-reads the manifests)
    .tmp-<name>-<pid>/            a save in progress (or one killed mid-way): never resumed from
    .old-<name>-<pid>/            a checkpoint being replaced or rotated away

Why a checkpoint is never torn: everything is written into `.tmp-<name>-<pid>/`, every file
and the folder are fsync'd, the manifest is re-read and every hash checked, `verify_weights`
loads the weights back, and only then one `os.replace` gives the folder its final name. A
process killed at any instant (SIGKILL included) leaves either the previous state or the new
complete checkpoint, plus at most a `.tmp-*` / `.old-*` folder that the next run removes.
Deleting goes the same way backwards: rename to `.old-*` first, then remove.

Multi-process: every rank calls `save` (the RNG states are gathered from all ranks), only the
main process writes, and every rank leaves `save` at the same collective with the same outcome,
so a failed save makes all ranks continue or all ranks raise.

FSDP (`sharded_root` given): every rank's shard differs, so `save` first gathers, on all ranks,
the full model state dict and the full optimizer state dict onto rank 0's CPU
(`torch.distributed.checkpoint.state_dict`, full_state_dict + cpu_offload). The weights are
written from that state dict; the optimizer state is stored keyed by parameter name
(`optimizer_layout: full-fqn` in training_state.pt) and loaded back on every rank with
`set_optimizer_state_dict`. The folder layout, manifest and verification are the same, so such a
checkpoint is as complete as a DDP one (it resumes only into an FSDP run of the same world size).

Nothing here unpickles arbitrary objects: tensors and plain containers go through
`torch.save` and are read with `torch.load(weights_only=True)`; everything else is JSON/YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from higgs_tune.errors import CheckpointError
from higgs_tune.train import distributed as dist_utils

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- names (the one place they are defined)
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_NAME = "final"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"
MANIFEST_FILE = "manifest.json"
TRAINING_STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
INDEX_FILE = "checkpoints.json"
FORMAT = "higgs-tune-checkpoint"
FORMAT_VERSION = 1
# First line of every config.yaml we write: marks the file (and its folder) as written by higgs-tune.
CONFIG_HEADER = "# higgs-tune resolved config: written by higgs-tune; resume compares it with the new config.\n"

# keys of training_state.pt
KEY_STEP = "step"
KEY_EPOCH = "epoch"
KEY_WORLD_SIZE = "world_size"
KEY_OPTIMIZER = "optimizer"
KEY_SCHEDULER = "scheduler"
KEY_GRAD_SCALER = "grad_scaler"
KEY_SAMPLER = "sampler_state"
KEY_RNG = "rng"  # list, one rng_state() per rank, in rank order
KEY_OPTIMIZER_LAYOUT = "optimizer_layout"  # absent: optimizer.state_dict(); OPTIMIZER_FULL_FQN: FSDP, gathered
OPTIMIZER_FULL_FQN = "full-fqn"  # torch.distributed.checkpoint full optimizer state dict (keyed by parameter name)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER_RE = re.compile(r"^\.(?:tmp|old)-.+-(\d+)$")  # .tmp-<name>-<pid> / .old-<name>-<pid>
_HASH_CHUNK = 8 << 20

# Config keys whose change makes a resumed run differ from the uninterrupted one. Everything
# else (logging, eval/sample cadence, checkpoint policy, attention backend, gradient
# checkpointing, worker count, the eval set) can change on resume without breaking exactness.
RESUME_KEYS = (
    # which weights are trained, their shapes and dtype
    "model.name_or_path", "model.dtype", "model.use_text_head", "model.audio_self_attention",
    "finetune.mode", "finetune.pathways", "finetune.train_modules", "finetune.freeze",
    "finetune.lora_r", "finetune.lora_alpha", "finetune.lora_dropout", "finetune.use_rslora", "finetune.use_dora",
    # which samples, in which order, batched how (the sampler state indexes into this)
    "data.train_cache", "data.eval_fraction", "data.task", "data.clone_probability", "data.system_prompt",
    "data.use_scene", "data.max_tokens_per_batch", "data.max_batch_size", "data.max_sequence_length", "data.bucket_size",
    # the gradients
    "loss.text_weight", "loss.audio_weight", "loss.codebook_weights",
    # the optimizer trajectory
    "train.seed", "train.learning_rate", "train.weight_decay", "train.adam_betas", "train.warmup_steps",
    "train.lr_scheduler", "train.gradient_accumulation_steps", "train.max_grad_norm", "train.mixed_precision",
)
# The run length shapes the warm-up/decay curve, so it breaks exactness unless the schedule is
# constant (then extending a finished run with a larger max_steps continues exactly).
SCHEDULE_LENGTH_KEYS = ("train.max_steps", "train.num_epochs")

# Optimizer state entries that have the parameter's shape in torch's optimizers (AdamW, SGD):
# checked before loading, because `Optimizer.load_state_dict` only checks parameter counts.
_PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


# ---------------------------------------------------------------- small file helpers


def format_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), the unit of checkpoint.min_free_gb and `df -H`."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames/creations in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_config_yaml(path: Path, config: Any) -> None:
    """The resolved config as YAML, with the header that marks it as ours. Not fsync'd here."""
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    text = CONFIG_HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def _files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder`, as sorted relative paths."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _dirs_under(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _checkpoint_step(name: str) -> int | None:
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def _short_torch_error(e: BaseException) -> str:
    """torch's weights_only failure is a page of advice; its one informative line names the type."""
    for line in str(e).splitlines():
        if line.strip().startswith("WeightsUnpickler error:"):
            return line.strip().split(" Please use", 1)[0].rstrip(". ")  # not the advice to allowlist it
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (an earlier failed attempt of this process): safe to remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ---------------------------------------------------------------- manifest and verification


def read_manifest(ckpt: Path) -> dict:
    """The parsed manifest of a checkpoint folder; CheckpointError if absent or unreadable."""
    path = Path(ckpt) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {MANIFEST_FILE}, so it is not a complete higgs-tune checkpoint (an interrupted save, or another tool's folder).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}): the checkpoint is damaged; resume from an older one.") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path} is not a higgs-tune checkpoint manifest (format {data.get('format') if isinstance(data, dict) else None!r}).")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {data['format_version']}, this higgs-tune reads up to {FORMAT_VERSION}: upgrade higgs-tune.")
    return data


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file of the manifest (present, same size, same sha256); return the manifest.

    Raises CheckpointError naming the first file at fault. Files not in the manifest are not
    an error (resume does not read them) but are logged.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a folder.")
    manifest = read_manifest(ckpt)
    files: dict = manifest["files"]
    for required in (TRAINING_STATE_FILE, CONFIG_FILE):
        if required not in files:
            raise CheckpointError(f"{ckpt / MANIFEST_FILE} does not list {required}: not a resumable checkpoint.")
    for rel, meta in files.items():
        path = ckpt / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing (listed in the manifest): the checkpoint is damaged.") from None
        if size != meta["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {meta['bytes']}: the file is truncated or was changed.")
        if sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest: the file is corrupted or was changed.")
    extra = [str(p) for p in _files_under(ckpt) if str(p) not in files and str(p) != MANIFEST_FILE]
    if extra:
        log.info("checkpoint %s: files not in its manifest (not used by resume): %s", ckpt, ", ".join(extra))
    return manifest


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_ABSENT = object()


def resume_config_changes(saved: Mapping, current: Any) -> list[str]:
    """Lines `key: saved -> current` for every change that breaks an exact resume (see RESUME_KEYS)."""
    cur = _flatten(current if isinstance(current, Mapping) else current.to_dict())
    old = _flatten(saved)
    keys = list(RESUME_KEYS)
    if cur.get("train.lr_scheduler") != "constant" or old.get("train.lr_scheduler") != "constant":
        keys += SCHEDULE_LENGTH_KEYS
    changes = []
    for key in keys:
        a, b = old.get(key, _ABSENT), cur.get(key, _ABSENT)
        if a != b:
            fmt = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
            changes.append(f"{key}: {fmt(a)} -> {fmt(b)}")
    return changes


def read_checkpoint_config(ckpt: Path) -> dict:
    path = Path(ckpt) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}): cannot check that the new config continues this run.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a config mapping.")
    return data


# ---------------------------------------------------------------- finding a checkpoint to resume


def _candidates(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N and final folder, newest first (final wins a tie)."""
    found: list[tuple[int, int, Path]] = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else ():
        if not entry.is_dir():
            continue
        step = _checkpoint_step(entry.name)
        if step is not None:
            found.append((step, 0, entry))
        elif entry.name == FINAL_NAME:
            try:
                step = int(read_manifest(entry)["step"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                step = -1  # unreadable: tried last, and reported as damaged there
            found.append((step, 1, entry))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [(s, p) for s, _, p in found]


def _find_main(run_dir: Path, which: str | Path) -> tuple[str, str | None]:
    """The search itself (main process): ('ok', path|None) or ('error', message)."""
    if str(which) != "auto":
        path = Path(which)
        if path.is_dir() and not (path / MANIFEST_FILE).exists() and _candidates(path):
            return _find_main(path, "auto")  # a run folder was named: its newest good checkpoint
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            return "error", f"cannot resume from {path}: {e}"
        log.info("resume: using %s (named explicitly; manifest verified)", path)
        return "ok", str(path)
    if not run_dir.is_dir():
        log.info("resume: %s does not exist yet; starting from step 0", run_dir)
        return "ok", None
    for entry in sorted(run_dir.iterdir()):
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and entry.is_dir():
            log.warning("resume: ignoring %s: an unfinished save or removal (process killed mid-way); it is removed at the next save", entry)
    skipped = []
    for step, path in _candidates(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("resume: skipping %s: %s", path, e)
            skipped.append(f"{path.name}: {e}")
            continue
        log.info("resume: using %s (step %d; newest checkpoint whose manifest verifies)", path, step)
        return "ok", str(path)
    if skipped:
        listing = "\n  ".join(skipped)
        return "error", (
            f"no usable checkpoint in {run_dir}: all {len(skipped)} are damaged:\n  {listing}\n"
            "Start over with --overwrite, or name a checkpoint from a copy with --resume PATH."
        )
    log.info("resume: no checkpoint in %s yet; starting from step 0", run_dir)
    return "ok", None


def newest_complete_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest checkpoint of `run_dir` with a readable manifest, or None.

    Cheap (no hashing): for messages such as "interrupted, resume from ..."; resuming itself
    re-verifies every file (`find_resume_checkpoint`).
    """
    for step, path in _candidates(Path(run_dir)):
        try:
            read_manifest(path)
        except CheckpointError:
            continue
        return step, path
    return None


def find_resume_checkpoint(run_dir: str | Path, which: str | Path = "auto") -> Path | None:
    """The checkpoint to resume from, or None when `run_dir` has none yet.

    which="auto": the newest `checkpoint-N` / `final` whose manifest verifies (every file's
    size and sha256); damaged ones are skipped with a warning saying why, `.tmp-*` folders
    (interrupted saves) are ignored. If checkpoints exist but all are damaged: CheckpointError
    (never a silent restart from step 0). which=<path>: that checkpoint, verified (a run
    folder may be named: its newest good checkpoint). Collective in a multi-process run: call
    it on every rank; the main process reads the disk and every rank gets its answer.
    """
    outcome: tuple[str, str | None] | None = None
    if dist_utils.is_main():
        outcome = _find_main(Path(run_dir), which)
    status, payload = dist_utils.broadcast_from_main(outcome)
    if status == "error":
        raise CheckpointError(payload)
    return Path(payload) if payload is not None else None


# ---------------------------------------------------------------- loading the training state


@dataclasses.dataclass
class TrainingState:
    """What `load_training_state` restored besides the optimizer/scheduler/RNG objects."""

    path: Path
    step: int  # optimizer steps done; the loop continues with step + 1
    epoch: int | float
    sampler_state: Any  # as passed to save(sampler_state=...)
    metrics: dict
    eval_loss: float | None
    world_size: int
    rng_warnings: list[str]


def _check_optimizer_shapes(ckpt: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise CheckpointError(f"{ckpt / TRAINING_STATE_FILE}: the optimizer has {len(groups)} parameter group(s), the checkpoint {len(saved_groups)}: the trained parameters changed. Resume with the same finetune settings, or use --resume-weights-only.")
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise CheckpointError(f"{ckpt / TRAINING_STATE_FILE}: parameter group {gi} has {len(g['params'])} parameters now, {len(sg['params'])} in the checkpoint: the trained parameters changed. Resume with the same finetune settings, or use --resume-weights-only.")
        for param, pid in zip(g["params"], sg["params"]):
            for key, value in saved.get("state", {}).get(pid, {}).items():
                if key in _PARAM_SHAPED_STATE and torch.is_tensor(value) and value.shape != param.shape:
                    raise CheckpointError(f"{ckpt / TRAINING_STATE_FILE}: optimizer state {key!r} of parameter {pid} has shape {tuple(value.shape)}, the parameter now {tuple(param.shape)}: the model changed. Use --resume-weights-only or the original model settings.")


def load_training_state(
    ckpt: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    world_size: int,
    rank: int,
    grad_scaler: Any | None = None,
    config: Any | None = None,
    sharded_root: torch.nn.Module | None = None,
) -> TrainingState:
    """Restore optimizer, scheduler, grad scaler and this rank's RNG states from `ckpt`.

    Call it after the model weights were loaded (`load_trainable`) and the optimizer and
    scheduler were built over the same parameters, and as the LAST thing before the loop:
    anything drawing random numbers after it moves the restored RNG streams away from the
    uninterrupted run. Raises CheckpointError (suggesting --resume-weights-only) when the
    world size differs or `config` changes a key of RESUME_KEYS. `sharded_root`: the FSDP-wrapped
    module (as given to CheckpointManager) in an FSDP run; collective then (call on every rank).
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    saved_ws = int(manifest["world_size"])
    if saved_ws != world_size:
        raise CheckpointError(
            f"{ckpt} was saved by {saved_ws} process(es), this run has {world_size}: the data order and the per-rank "
            f"random streams cannot continue exactly. Launch {saved_ws} process(es) to resume, or start a new run "
            f"from its weights with --resume-weights-only {ckpt}."
        )
    if config is not None:
        changes = resume_config_changes(read_checkpoint_config(ckpt), config)
        if changes:
            listing = "\n  ".join(changes)
            raise CheckpointError(
                f"the config changes settings that {ckpt} must keep to resume exactly:\n  {listing}\n"
                f"Restore them to resume, or start a new run from its weights with --resume-weights-only {ckpt}."
            )
    path = ckpt / TRAINING_STATE_FILE
    try:
        # weights_only: only tensors and plain containers can come back, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; resume from an older one.") from None
    except Exception as e:  # torch raises UnpicklingError/RuntimeError/EOFError for bad bytes
        raise CheckpointError(f"{path} cannot be read with weights_only=True ({_short_torch_error(e)}); the checkpoint is damaged or was not written by higgs-tune.") from e
    if state.get(KEY_STEP) != manifest["step"] or state.get(KEY_WORLD_SIZE) != saved_ws:
        raise CheckpointError(f"{path} says step {state.get(KEY_STEP)} / world size {state.get(KEY_WORLD_SIZE)}, its manifest step {manifest['step']} / {saved_ws}: the files come from different saves.")

    layout = state.get(KEY_OPTIMIZER_LAYOUT)
    if (layout == OPTIMIZER_FULL_FQN) != (sharded_root is not None):
        saved_by, run = ("an FSDP", "without FSDP") if sharded_root is None else ("a non-FSDP", "with FSDP")
        raise CheckpointError(f"{path} was saved by {saved_by} run, this run is {run}: the optimizer state cannot be "
                              f"restored. Launch as the checkpoint was saved, or use --resume-weights-only {ckpt}.")
    _check_optimizer_shapes(ckpt, state[KEY_OPTIMIZER], optimizer)
    try:
        if sharded_root is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # every rank read the full state; each keeps its own shard of it
            set_optimizer_state_dict(sharded_root, optimizer, state[KEY_OPTIMIZER],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state[KEY_OPTIMIZER])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({e}). Use --resume-weights-only.") from e
    if scheduler is not None:
        if state.get(KEY_SCHEDULER) is None:
            raise CheckpointError(f"{path} holds no scheduler state but this run has a scheduler: use --resume-weights-only.")
        scheduler.load_state_dict(state[KEY_SCHEDULER])
    if grad_scaler is not None:
        if state.get(KEY_GRAD_SCALER) is not None:
            grad_scaler.load_state_dict(state[KEY_GRAD_SCALER])
        else:
            log.warning("resume: %s has no grad scaler state (saved without fp16); the scaler starts fresh", ckpt)

    rngs = state[KEY_RNG]
    if len(rngs) != world_size or not 0 <= rank < world_size:
        raise CheckpointError(f"{path} holds RNG states of {len(rngs)} rank(s); rank {rank} of {world_size} cannot be restored.")
    rng_warnings = dist_utils.set_rng_state(rngs[rank])
    for w in rng_warnings:
        log.warning("resume: %s", w)
    log.info("resume: restored step %s, epoch %s, optimizer/scheduler/RNG (rank %d of %d) from %s",
             state[KEY_STEP], state[KEY_EPOCH], rank, world_size, ckpt)
    return TrainingState(
        path=ckpt,
        step=int(state[KEY_STEP]),
        epoch=state[KEY_EPOCH],
        sampler_state=state[KEY_SAMPLER],
        metrics=dict(manifest.get("metrics") or {}),
        eval_loss=manifest.get("eval_loss"),
        world_size=saved_ws,
        rng_warnings=rng_warnings,
    )


# ---------------------------------------------------------------- saving


@dataclasses.dataclass
class _Record:
    name: str
    step: int
    eval_loss: float | None
    bytes: int


def _failure_fix(e: BaseException, final: bool) -> str:
    """What to do after a save that failed with `e` (the line after the error)."""
    if final:
        first = "Free space or fix the disk" if isinstance(e, OSError) else "Fix the cause above"
        return f"{first}, then resume with --resume auto to write the final checkpoint again (the last complete one is still there)."
    if isinstance(e, OSError):
        return "Free space or fix the disk, then resume with --resume auto from the last complete checkpoint."
    return "Earlier checkpoints are intact: fix the cause above, then resume with --resume auto."


def is_fsdp(accelerator) -> bool:
    """True when `accelerator` shards the model with FSDP (the checkpoints then gather, see the module doc)."""
    return accelerator is not None and accelerator.distributed_type == "FSDP"


def require_unsharded(accelerator) -> None:
    """Refuse DeepSpeed / Megatron runs: their optimizer state differs on every rank, and saving
    rank 0's state would silently lose the others. FSDP is supported (its state is gathered), with
    FSDP1 only with use_orig_params=True (frozen parameters, optimizer state by parameter name).
    Call it before any model loads."""
    kind = accelerator.distributed_type  # a str enum: compares equal to its name
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise CheckpointError(f"checkpoints of {kind.value} runs (sharded optimizer state) are not supported yet: "
                              "launch with plain data parallelism (accelerate launch --multi_gpu) or FSDP.")
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if kind == "FSDP" and plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
        raise CheckpointError("FSDP1 needs fsdp_use_orig_params: true (LoRA freezes parameters, and checkpoints store "
                              "the optimizer state by parameter name); set it, or use fsdp_version: 2.")


class CheckpointManager:
    """Writes, verifies, rotates and indexes the checkpoints of one run folder.

    save_weights(dir): writes the trainable weights into `dir` (main process only; e.g.
        `lambda d: lora.save_trainable(model, d)`). verify_weights(dir): raises if the weights
        in `dir` do not load (e.g. the adapter loads onto the base model). Both are called
        with the temporary folder, before it gets its final name.
    ckpt_cfg: `cfg.checkpoint` (save_total_limit, keep_best, on_save_error, min_free_gb).
    estimate_bytes: expected size of one checkpoint (train.outdir.estimate_checkpoint_bytes),
        used for the free-space check of the first save; later saves use the previous size.
    sharded_root: FSDP runs only (required there): the FSDP-wrapped root module, and
        `weights_prefix` the name of the trained model inside it (e.g. "model."). The full state
        dicts are gathered from it, and save_weights / verify_weights are then called as
        `f(dir, state_dict=full_weights)` with the trained model's full state dict.
    """

    def __init__(
        self,
        run_dir: str | Path,
        accelerator: Any | None,
        ckpt_cfg: Any,
        save_weights: Callable[[Path], None],
        verify_weights: Callable[[Path], None],
        *,
        estimate_bytes: int | None = None,
        sharded_root: torch.nn.Module | None = None,
        weights_prefix: str = "",
    ):
        self.run_dir = Path(run_dir)
        self.cfg = ckpt_cfg
        self.save_weights = save_weights
        self.verify_weights = verify_weights
        self._estimate = estimate_bytes
        self._failures = 0
        self.sharded_root, self.weights_prefix = sharded_root, weights_prefix
        if is_fsdp(accelerator) and sharded_root is None:
            raise CheckpointError("an FSDP run needs CheckpointManager(sharded_root=...) to gather the sharded state.")
        if accelerator is not None:
            require_unsharded(accelerator)
            if accelerator.num_processes != dist_utils.world_size():
                raise CheckpointError(f"the accelerator has {accelerator.num_processes} processes but torch.distributed reports {dist_utils.world_size()}: the process group is not set up as accelerate expects.")
        self.is_main = dist_utils.is_main()
        self.world_size = dist_utils.world_size()
        self._records: dict[str, _Record] = {}
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            self._scan()

    # -------------------------------------------------------------- state of the folder

    def _remove_leftovers(self) -> None:
        """Remove `.tmp-*` / `.old-*` folders left by killed processes (never a live one's)."""
        for entry in sorted(self.run_dir.iterdir()):
            m = _LEFTOVER_RE.match(entry.name)
            if not m:
                continue
            if _pid_alive(int(m.group(1))):
                log.warning("checkpoint: leaving %s alone: process %s is still running (two runs in one folder?)", entry, m.group(1))
                continue
            log.warning("checkpoint: removing %s, left by an interrupted save or removal", entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _scan(self) -> None:
        """Read the manifests of the complete checkpoints (sizes, eval losses); no hashing."""
        for step, path in _candidates(self.run_dir):
            try:
                m = read_manifest(path)
            except CheckpointError as e:
                log.warning("checkpoint: %s is damaged and is not counted as a checkpoint of this run: %s", path, e)
                continue
            self._records[path.name] = _Record(path.name, int(m["step"]), m.get("eval_loss"),
                                               sum(f["bytes"] for f in m["files"].values()))
        if self._records and self._estimate is None:
            newest = max(self._records.values(), key=lambda r: r.step)
            self._estimate = newest.bytes

    @property
    def best(self) -> Path | None:
        """The checkpoint with the lowest eval loss (None when no save had an eval loss)."""
        scored = [r for r in self._records.values() if r.eval_loss is not None]
        if not scored:
            return None
        return self.run_dir / min(scored, key=lambda r: (r.eval_loss, -r.step)).name

    @property
    def latest(self) -> Path | None:
        if not self._records:
            return None
        return self.run_dir / max(self._records.values(), key=lambda r: (r.step, r.name == FINAL_NAME)).name

    # -------------------------------------------------------------- save

    def save(
        self,
        step: int,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        sampler_state: Any,
        epoch: int | float,
        metrics: Mapping[str, Any] | None,
        config: Any,
        grad_scaler: Any | None = None,
        eval_loss: float | None = None,
        final: bool = False,
    ) -> Path | None:
        """Write `checkpoint-<step>/` (or `final/`). Collective: call on every rank.

        Returns the checkpoint folder, or None when the save failed and
        `on_save_error: continue` (the error is logged with its cause; the next save tries
        again). Raises CheckpointError when it failed and the policy is `abort`, and always
        when `final=True`. `sampler_state` must be weights_only-safe (tensors, numbers,
        strings, lists, tuples, dicts); `metrics` and `eval_loss` must be JSON numbers/strings.
        """
        # verify_weights may draw random numbers (building a model initialises weights, LoRA
        # initialises adapters): the streams are put back, so that a run with saves, a run
        # without them and a run resumed from this save all draw the same numbers.
        with dist_utils.preserved_rng() as mine:
            rng = dist_utils.gather_to_main(mine)  # every rank's state, on rank 0
            full = self._gather_sharded(optimizer)  # FSDP: collective, the full state on rank 0
            outcome, error = self._save_on_main(step, optimizer=optimizer, scheduler=scheduler, sampler_state=sampler_state,
                                                epoch=epoch, metrics=dict(metrics or {}), config=config, grad_scaler=grad_scaler,
                                                eval_loss=eval_loss, final=final, rng=rng, full=full) if self.is_main else (None, None)
            del full
        # The one point where all ranks meet after a save: everyone learns the same outcome.
        status, message, fix = dist_utils.broadcast_from_main(outcome)
        if status == "ok":
            self._failures = 0
            return Path(message)
        self._failures += 1
        if final or self.cfg.on_save_error == "abort":
            if self.is_main:
                log.error("%s", message)
            raise CheckpointError(f"{message}\n{fix}") from error
        if self.is_main:
            # the message names the cause; a traceback only for an unexpected error (a bug, not a full disk)
            expected = isinstance(error, (CheckpointError, OSError))
            log.error("%s -- on_save_error=continue: training goes on and the next save tries again (%d failed save(s) in a row); "
                      "earlier checkpoints are intact.", message, self._failures, exc_info=None if expected else error)
        return None

    def _gather_sharded(self, optimizer) -> tuple[dict, dict] | None:
        """FSDP: (trained model's full state dict, full optimizer state dict) on rank 0's CPU
        (empty dicts on the other ranks); None without FSDP. Collective."""
        if self.sharded_root is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.sharded_root, options=options)
        n = len(self.weights_prefix)
        weights = {k[n:]: v for k, v in model_sd.items() if k.startswith(self.weights_prefix)}
        return weights, get_optimizer_state_dict(self.sharded_root, optimizer, options=options)

    def _save_on_main(self, step, *, final, **kw) -> tuple[tuple[str, str, str], BaseException | None]:
        """(("ok", path, ""), None) or (("failed", message, fix), the exception)."""
        try:
            return ("ok", str(self._write(step, final=final, **kw)), ""), None
        # Any failure of a save (disk full, I/O error, a bug in save_weights, a failed
        # verification) is handled by one policy; it is logged with its cause, never dropped.
        except Exception as e:  # noqa: BLE001
            what = "the final checkpoint" if final else f"checkpoint-{step}"
            return ("failed", f"saving {what} to {self.run_dir} failed: {type(e).__name__}: {e}", _failure_fix(e, final)), e

    def _write(self, step: int, *, optimizer, scheduler, sampler_state, epoch, metrics, config, grad_scaler,
               eval_loss, final, rng, full=None) -> Path:
        name = FINAL_NAME if final else f"{CHECKPOINT_PREFIX}{step}"
        target = self.run_dir / name
        tmp = self.run_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
        old = self.run_dir / f"{TRASH_PREFIX}{name}-{os.getpid()}"
        t0 = time.monotonic()
        log.info("checkpoint: saving step %d to %s (attempt %d)", step, target, self._failures + 1)
        self._check_space()
        try:
            json.dumps({"metrics": metrics, "eval_loss": eval_loss, "epoch": epoch})  # fail before writing anything
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"metrics/eval_loss/epoch of step {step} are not JSON numbers or strings ({e}); pass float(x) for tensors.") from e
        if tmp.exists():
            shutil.rmtree(tmp)
        moved_aside = False
        try:
            tmp.mkdir()
            if full is None:
                self.save_weights(tmp)
            else:
                self.save_weights(tmp, state_dict=full[0])
            state = {
                KEY_STEP: int(step),
                KEY_EPOCH: epoch,
                KEY_WORLD_SIZE: self.world_size,
                KEY_OPTIMIZER: optimizer.state_dict() if full is None else full[1],
                KEY_SCHEDULER: scheduler.state_dict() if scheduler is not None else None,
                KEY_GRAD_SCALER: grad_scaler.state_dict() if grad_scaler is not None else None,
                KEY_SAMPLER: sampler_state,
                KEY_RNG: rng,
            }
            if full is not None:
                state[KEY_OPTIMIZER_LAYOUT] = OPTIMIZER_FULL_FQN
            torch.save(state, tmp / TRAINING_STATE_FILE)
            write_config_yaml(tmp / CONFIG_FILE, config)
            # Durable before the manifest vouches for them: file data, then folder entries.
            for rel in _files_under(tmp):
                fsync_path(tmp / rel)
            files = {str(rel): {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)} for rel in _files_under(tmp)}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "epoch": epoch,
                "final": bool(final),
                "world_size": self.world_size,
                "eval_loss": eval_loss,
                "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch_version": torch.__version__,
                "files": files,
            }
            with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            for d in _dirs_under(tmp) + [tmp]:
                fsync_path(d)
            self._verify_written(tmp, manifest, None if full is None else full[0])

            # Publish: one atomic rename. An existing folder of that name (a damaged checkpoint
            # from an abandoned attempt, or an earlier final) is moved aside first, because a
            # rename cannot replace a non-empty folder, and is removed only afterwards.
            if target.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(target, old)
                moved_aside = True
            os.replace(tmp, target)
            fsync_path(self.run_dir)
        except BaseException:
            if moved_aside and not target.exists():
                os.replace(old, target)  # put the previous folder back: the failed save changed nothing
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                log.error("checkpoint: could not remove the temporary folder %s; the next run removes it", tmp)
            raise
        if moved_aside:
            shutil.rmtree(old, ignore_errors=True)

        total = sum(f["bytes"] for f in files.values())
        self._estimate = total
        self._records[name] = _Record(name, int(step), eval_loss, total)
        listing = ", ".join(f"{rel} ({format_bytes(f['bytes'])})" for rel, f in files.items())
        log.info("checkpoint: saved %s in %.1f s: %s; %s in total, %s free on the disk",
                 target, time.monotonic() - t0, listing, format_bytes(total), format_bytes(_disk_free(self.run_dir)))
        # Rotation and the index are housekeeping after a complete save: a failure there leaves
        # a good checkpoint and is logged (the next save's space check catches a filling disk).
        try:
            if not final:
                self._rotate(keep=name)
            self._write_index()
        except OSError as e:
            log.error("checkpoint: %s is complete, but rotating old checkpoints / writing %s failed: %s", target, INDEX_FILE, e)
        return target

    def _check_space(self) -> None:
        free = _disk_free(self.run_dir)
        reserve = int(self.cfg.min_free_gb * 1e9)
        if self._estimate is None:
            log.info("checkpoint: no size estimate yet; %s free on the disk", format_bytes(free))
            return
        needed = self._estimate + reserve
        if free < needed:
            raise CheckpointError(
                f"{self.run_dir}: {format_bytes(free)} free, a checkpoint needs about {format_bytes(self._estimate)} plus "
                f"checkpoint.min_free_gb={self.cfg.min_free_gb} GB kept free. Free space, or lower checkpoint.save_total_limit."
            )

    def _verify_written(self, folder: Path, manifest: dict, weights: dict | None = None) -> None:
        """Read back what was just written: the manifest, the file list, the training state, the weights.

        The hashes in the manifest were computed by reading the files back after their fsync,
        so they already vouch for the bytes on disk; hashing a second time would double the
        cost of a save and only check that nothing changed in between. What is re-read here:
        the manifest file itself, every file's presence and size, the training state through
        the safe loader, and the weights through `verify_weights`.
        """
        try:
            reread = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / MANIFEST_FILE} does not read back ({e}).") from e
        if reread != json.loads(json.dumps(manifest)):
            raise CheckpointError(f"{folder / MANIFEST_FILE} reads back different from what was written: the disk or file system is faulty.")
        on_disk = {str(p) for p in _files_under(folder)} - {MANIFEST_FILE}
        if on_disk != set(manifest["files"]):
            raise CheckpointError(f"{folder}: files on disk ({', '.join(sorted(on_disk))}) differ from the manifest ({', '.join(sorted(manifest['files']))}).")
        for rel, meta in manifest["files"].items():
            size = (folder / rel).stat().st_size
            if size != meta["bytes"]:
                raise CheckpointError(f"{folder / rel} has {size} bytes after writing, {meta['bytes']} when hashed: the file changed while being saved.")
        try:
            # mmap: the unpickling (and weights_only's type checks) run without reading all tensor bytes.
            torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch's safe unpickler raises UnpicklingError/RuntimeError
            raise CheckpointError(
                f"{folder / TRAINING_STATE_FILE} cannot be read back with weights_only=True ({_short_torch_error(e)}). "
                "sampler_state may hold only tensors, numbers, strings, lists, tuples and dicts."
            ) from e
        if weights is None:
            self.verify_weights(folder)
        else:
            self.verify_weights(folder, state_dict=weights)

    def _rotate(self, keep: str) -> None:
        """Keep the newest `save_total_limit` step checkpoints, the one just written and the best."""
        limit = self.cfg.save_total_limit
        if limit is None:
            return
        steps = sorted((r for r in self._records.values() if r.name != FINAL_NAME), key=lambda r: r.step, reverse=True)
        protected = {keep}
        best = self.best
        if best is not None and self.cfg.keep_best:
            protected.add(best.name)
        for rec in steps[limit:]:
            if rec.name in protected:
                continue
            path = self.run_dir / rec.name
            trash = self.run_dir / f"{TRASH_PREFIX}{rec.name}-{os.getpid()}"
            os.replace(path, trash)  # atomic: the folder disappears whole, never half-deleted
            del self._records[rec.name]
            shutil.rmtree(trash)
            log.info("checkpoint: removed %s (save_total_limit=%d)", path, limit)
        fsync_path(self.run_dir)

    def _write_index(self) -> None:
        best, latest = self.best, self.latest
        records = sorted(self._records.values(), key=lambda r: (r.step, r.name == FINAL_NAME))
        write_json_atomic(self.run_dir / INDEX_FILE, {
            "latest": latest.name if latest else None,
            "best": None if best is None else {"name": best.name, "step": self._records[best.name].step,
                                               "eval_loss": self._records[best.name].eval_loss},
            "final": FINAL_NAME if FINAL_NAME in self._records else None,
            "checkpoints": [dataclasses.asdict(r) for r in records],
        })
