"""Resuming a run: which checkpoint, whether the new config may continue it, and its state.

Resume policy. A resumed run must continue exactly as the uninterrupted one would have. The
config keys whose change breaks that are marked on the config itself
(`metadata={"resume": "must_match"}` in `higgs_tune.config`) and listed here as RESUME_KEYS;
everything else (logging, eval/sample cadence, checkpoint policy, attention backend, gradient
checkpointing, worker count, the eval set) may change. The run length
(SCHEDULE_LENGTH_KEYS, `"resume": "schedule_length"`) may change too: extending a finished run
with a larger max_steps (or shortening one) is allowed; the warm-up/decay curve is recomputed
for the new length from the resumed step on (`schedule_length_changes` lists what changed, the
recipe logs it). With a constant schedule that continues exactly.

`find_resume_checkpoint` picks the newest checkpoint whose every file verifies;
`load_training_state` restores optimizer, scheduler, grad scaler and the RNG streams.
Both are collective in a multi-process run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from higgs_tune.config import RESUME_MUST_MATCH, RESUME_SCHEDULE_LENGTH, resume_keys
from higgs_tune.errors import CheckpointError
from higgs_tune.runfs import (
    MANIFEST_FILE,
    TMP_PREFIX,
    TRAINING_STATE_FILE,
    TRASH_PREFIX,
)
from higgs_tune.train import distributed as dist_utils
from higgs_tune.train.checkpoint.format import (
    KEY_EPOCH,
    KEY_GRAD_SCALER,
    KEY_OPTIMIZER,
    KEY_OPTIMIZER_LAYOUT,
    KEY_RNG,
    KEY_SAMPLER,
    KEY_SCHEDULER,
    KEY_STEP,
    KEY_WORLD_SIZE,
    OPTIMIZER_FULL_FQN,
    checkpoint_folders,
    read_checkpoint_config,
    read_manifest,
    short_torch_error,
    verify_checkpoint,
)
from higgs_tune.train.checkpoint.sharded import OPTIMIZER_DCP, is_sharded_checkpoint, load_shards

log = logging.getLogger("higgs_tune.train.checkpoint")

RESUME_KEYS = resume_keys(RESUME_MUST_MATCH)
SCHEDULE_LENGTH_KEYS = resume_keys(RESUME_SCHEDULE_LENGTH)

# Optimizer state entries that have the parameter's shape in torch's optimizers (AdamW, SGD):
# checked before loading, because `Optimizer.load_state_dict` only checks parameter counts.
_PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


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
    return _changes(saved, current, RESUME_KEYS)


def schedule_length_changes(saved: Mapping, current: Any) -> list[str]:
    """Lines `key: saved -> current` for changes of the run length (SCHEDULE_LENGTH_KEYS): allowed
    on resume, the learning-rate schedule is recomputed for the new length."""
    return _changes(saved, current, SCHEDULE_LENGTH_KEYS)


def _changes(saved: Mapping, current: Any, keys) -> list[str]:
    cur = _flatten(current if isinstance(current, Mapping) else current.to_dict())
    old = _flatten(saved)
    changes = []
    for key in keys:
        a, b = old.get(key, _ABSENT), cur.get(key, _ABSENT)
        if a != b:
            fmt = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
            changes.append(f"{key}: {fmt(a)} -> {fmt(b)}")
    return changes


# ---------------------------------------------------------------- finding a checkpoint to resume


def _find_main(run_dir: Path, which: str | Path) -> tuple[str, str | None]:
    """The search itself (main process): ('ok', path|None) or ('error', message)."""
    if str(which) != "auto":
        path = Path(which)
        if path.is_dir() and not (path / MANIFEST_FILE).exists() and checkpoint_folders(path):
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
            log.warning(
                "resume: ignoring %s: an unfinished save or removal (process killed mid-way); it is removed at the "
                "next save",
                entry,
            )
    skipped = []
    for step, path in checkpoint_folders(run_dir):
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
    for step, path in checkpoint_folders(Path(run_dir)):
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
    schedule_changes: list[str] = dataclasses.field(default_factory=list)  # run length changed: schedule recomputed


def _check_optimizer_shapes(ckpt: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise CheckpointError(
            f"{ckpt / TRAINING_STATE_FILE}: the optimizer has {len(groups)} parameter group(s), the checkpoint "
            f"{len(saved_groups)}: the trained parameters changed. Resume with the same finetune settings, or use "
            "--resume-weights-only."
        )
    for gi, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(g["params"]) != len(sg["params"]):
            raise CheckpointError(
                f"{ckpt / TRAINING_STATE_FILE}: parameter group {gi} has {len(g['params'])} parameters now, "
                f"{len(sg['params'])} in the checkpoint: the trained parameters changed. Resume with the same "
                "finetune settings, or use --resume-weights-only."
            )
        for param, pid in zip(g["params"], sg["params"], strict=True):
            for key, value in saved.get("state", {}).get(pid, {}).items():
                if key in _PARAM_SHAPED_STATE and torch.is_tensor(value) and value.shape != param.shape:
                    raise CheckpointError(
                        f"{ckpt / TRAINING_STATE_FILE}: optimizer state {key!r} of parameter {pid} has shape "
                        f"{tuple(value.shape)}, the parameter now {tuple(param.shape)}: the model changed. Use "
                        "--resume-weights-only or the original model settings."
                    )


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
    model_root: torch.nn.Module | None = None,
) -> TrainingState:
    """Restore optimizer, scheduler, grad scaler and this rank's RNG states from `ckpt`.

    Call it after the model weights were loaded (`load_trainable`) and the optimizer and
    scheduler were built over the same parameters, and as the LAST thing before the loop:
    anything drawing random numbers after it moves the restored RNG streams away from the
    uninterrupted run. Raises CheckpointError (suggesting --resume-weights-only) when the
    world size differs or `config` changes a key of RESUME_KEYS. `sharded_root`: the FSDP-wrapped
    module (as given to CheckpointManager) in an FSDP run; collective then (call on every rank).

    A checkpoint of an FSDP run (dcp/ shards, sharded.py) also restores the trained weights, into
    `model_root` (the module whose parameter names the shards use: the FSDP-wrapped root, or the
    unwrapped one in a run without FSDP; default `sharded_root`), and loads into any number of
    processes: with another world size the weights, optimizer and schedule are exact, while the data
    order continues at the same fraction of the epoch with the batches regrouped, and the random
    streams start from rank 0's saved state (logged as a warning).
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    saved_ws = int(manifest["world_size"])
    sharded = is_sharded_checkpoint(ckpt)
    if saved_ws != world_size and not sharded:
        raise CheckpointError(
            f"{ckpt} was saved by {saved_ws} process(es), this run has {world_size}: the data order and the per-rank "
            f"random streams cannot continue exactly. Launch {saved_ws} process(es) to resume, or start a new run "
            f"from its weights with --resume-weights-only {ckpt}."
        )
    schedule_changes: list[str] = []
    if config is not None:
        saved_config = read_checkpoint_config(ckpt)
        changes = resume_config_changes(saved_config, config)
        schedule_changes = schedule_length_changes(saved_config, config)
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
        raise CheckpointError(
            f"{path} cannot be read with weights_only=True ({short_torch_error(e)}); the checkpoint is damaged or "
            "was not written by higgs-tune."
        ) from e
    if state.get(KEY_STEP) != manifest["step"] or state.get(KEY_WORLD_SIZE) != saved_ws:
        raise CheckpointError(
            f"{path} says step {state.get(KEY_STEP)} / world size {state.get(KEY_WORLD_SIZE)}, its manifest step "
            f"{manifest['step']} / {saved_ws}: the files come from different saves."
        )

    layout = state.get(KEY_OPTIMIZER_LAYOUT)
    if sharded or layout == OPTIMIZER_DCP:
        root = model_root if model_root is not None else sharded_root
        if root is None:
            raise CheckpointError(f"{ckpt} holds FSDP shards: load_training_state needs model_root= to load them.")
        load_shards(ckpt, root, optimizer)  # weights + optimizer, resharded to this run's processes
        _load_scheduler_and_scaler(ckpt, path, state, scheduler, grad_scaler)
        rngs, warnings = state[KEY_RNG], []
        if saved_ws == world_size:
            warnings = dist_utils.set_rng_state(rngs[rank])
        else:
            state[KEY_SAMPLER] = regroup_sampler_state(state[KEY_SAMPLER], saved_ws, world_size)
            warnings = dist_utils.set_rng_state(rngs[0]) + [
                f"{ckpt} was saved by {saved_ws} process(es), this run has {world_size}: the weights, optimizer "
                "state and schedule are restored exactly (resharded), but the batches are regrouped for "
                f"{world_size} process(es) from batch {state[KEY_SAMPLER]['batches_consumed']} of the epoch on and the "
                "random streams continue from rank 0's, so the losses differ from an uninterrupted run's. "
                "Keep the global batch: multiply train.gradient_accumulation_steps by "
                f"{saved_ws}/{world_size} if your config allows it."
            ]
        return _restored(ckpt, state, manifest, saved_ws, rank, world_size, warnings, schedule_changes)
    if (layout == OPTIMIZER_FULL_FQN) != (sharded_root is not None):
        saved_by, run = ("an FSDP", "without FSDP") if sharded_root is None else ("a non-FSDP", "with FSDP")
        raise CheckpointError(
            f"{path} was saved by {saved_by} run, this run is {run}: the optimizer state cannot be "
            f"restored. Launch as the checkpoint was saved, or use --resume-weights-only {ckpt}."
        )
    _check_optimizer_shapes(ckpt, state[KEY_OPTIMIZER], optimizer)
    try:
        if sharded_root is not None:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            # every rank read the full state; each keeps its own shard of it
            set_optimizer_state_dict(
                sharded_root, optimizer, state[KEY_OPTIMIZER], options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(state[KEY_OPTIMIZER])
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this optimizer ({e}). Use --resume-weights-only."
        ) from e
    _load_scheduler_and_scaler(ckpt, path, state, scheduler, grad_scaler)
    rngs = state[KEY_RNG]
    if len(rngs) != world_size or not 0 <= rank < world_size:
        raise CheckpointError(
            f"{path} holds RNG states of {len(rngs)} rank(s); rank {rank} of {world_size} cannot be restored."
        )
    rng_warnings = dist_utils.set_rng_state(rngs[rank])
    return _restored(ckpt, state, manifest, saved_ws, rank, world_size, rng_warnings, schedule_changes)


def regroup_sampler_state(sampler_state: dict, saved_ws: int, world_size: int) -> dict:
    """The sampler state of a `saved_ws`-process run for a `world_size`-process one: the same epoch,
    at the same number of batches consumed by all ranks together (rounded down)."""
    out = dict(sampler_state)
    out["num_replicas"] = world_size
    out["batches_consumed"] = int(sampler_state["batches_consumed"]) * saved_ws // world_size
    return out


def _load_scheduler_and_scaler(ckpt: Path, path: Path, state: dict, scheduler, grad_scaler) -> None:
    if scheduler is not None:
        if state.get(KEY_SCHEDULER) is None:
            raise CheckpointError(
                f"{path} holds no scheduler state but this run has a scheduler: use --resume-weights-only."
            )
        scheduler.load_state_dict(state[KEY_SCHEDULER])
    if grad_scaler is not None:
        if state.get(KEY_GRAD_SCALER) is not None:
            grad_scaler.load_state_dict(state[KEY_GRAD_SCALER])
        else:
            log.warning("resume: %s has no grad scaler state (saved without fp16); the scaler starts fresh", ckpt)


def _restored(ckpt, state, manifest, saved_ws, rank, world_size, rng_warnings, schedule_changes) -> TrainingState:
    for w in rng_warnings:
        log.warning("resume: %s", w)
    log.info(
        "resume: restored step %s, epoch %s, optimizer/scheduler/RNG (rank %d of %d) from %s",
        state[KEY_STEP],
        state[KEY_EPOCH],
        rank,
        world_size,
        ckpt,
    )
    return TrainingState(
        path=ckpt,
        step=int(state[KEY_STEP]),
        epoch=state[KEY_EPOCH],
        sampler_state=state[KEY_SAMPLER],
        metrics=dict(manifest.get("metrics") or {}),
        eval_loss=manifest.get("eval_loss"),
        world_size=saved_ws,
        rng_warnings=rng_warnings,
        schedule_changes=schedule_changes,
    )


# ---------------------------------------------------------------- what the run trains on


def data_identity(train_cache: Any) -> dict:
    """What a checkpoint records of the data it was trained on (a CodeCache): its folder, the
    fingerprint of its content and that of the codec that encoded it."""
    return {
        "train_cache": str(train_cache.cache_dir),
        "train_cache_fingerprint": train_cache.content_fingerprint,
        "codec_fingerprint": train_cache.codec_fingerprint,
    }


def check_resume_data(ckpt: Path, identity: Mapping[str, Any]) -> None:
    """Refuse to resume `ckpt` on a cache whose content or codec differs from what it trained on.

    A checkpoint written before fingerprints were recorded (no "data" in its manifest) passes."""
    saved = read_manifest(ckpt).get("data")
    if not isinstance(saved, Mapping):
        log.info("resume: %s records no data fingerprint (an older checkpoint); the cache is not compared", ckpt)
        return
    what = {"train_cache_fingerprint": "content", "codec_fingerprint": "audio tokenizer (codec)"}
    changed = [label for key, label in what.items() if saved.get(key) != identity.get(key)]
    if changed:
        was, now = str(saved.get("train_cache_fingerprint"))[:12], str(identity.get("train_cache_fingerprint"))[:12]
        raise CheckpointError(
            f"{ckpt} was trained on a cache with another {' and '.join(changed)} than {identity.get('train_cache')} "
            f"has now (it was {saved.get('train_cache')}, fingerprint {was}; now {now}): the cache was re-prepared, "
            "so resuming would not continue the same run. Fix: point data.train_cache at the cache the run used, or "
            f"start a new run from these weights with --resume-weights-only {ckpt}."
        )
