"""The run folder, checked before the model loads: created, writable, big enough, and ours.

`prepare_output_dir` is the first thing a training run does after reading its config. It
fails in seconds, with the path and the fix, where a run would otherwise fail hours later at
its first save: a folder that cannot be created or written, a disk without room for the
checkpoints, or a folder holding someone else's files or a different run.

What counts as "ours" (RUN_ARTEFACTS): the names higgs-tune writes into a run folder. A
`config.yaml` is ours only when it starts with `runfs.CONFIG_HEADER`. `--overwrite`
removes only these; when anything else is in the folder it refuses (it never deletes files
it did not write). A folder is "a run of the same config" when its `config.yaml` is ours and
agrees with the new config on every key that exact resumption depends on
(`checkpoint.RESUME_KEYS`); all other keys (logging, eval cadence, checkpoint policy, ...)
may change between the first run and a resume.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import yaml

from higgs_tune import config as cfg_names  # the pathway and module names
from higgs_tune.errors import OutputDirError
from higgs_tune.runfs import (
    CHECKPOINT_RE,
    CONFIG_FILE,
    CONFIG_HEADER,
    FINAL_NAME,
    LOCK_FILE,
    OWNED_FILE,
    PROBE_PREFIX,
    RUN_DIRS,  # noqa: F401 - re-exported: the names a run may hold
    RUN_FILES,  # noqa: F401
    RUN_PATTERN,
    RunLock,
    atomic_write_text,
    claim,
    describe_names,
    format_bytes,
    owned_names,
    remove_owned,
)
from higgs_tune.train import distributed as dist_utils
from higgs_tune.train.checkpoint import config_yaml_text, resume_config_changes

log = logging.getLogger(__name__)

# RUN_FILES / RUN_DIRS (from runfs): the top-level names higgs-tune writes into a run folder;
# `--overwrite` removes only these (and RUN_PATTERN: checkpoint-N, .tmp-*, .old-*, probes).

# Fallback sizes when the model's weights are not on this machine yet (a hub id that is not
# cached): the released 3B base, about 5.8e9 parameters; LoRA adapters with r <= 64 on every
# pathway stay below 1e8; a fully trained extra module below 4e8 (the text head, 3072 x 128256).
_FALLBACK_PARAMS = 5_800_000_000
_FALLBACK_LORA_PARAMS = 100_000_000
_FALLBACK_MODULE_PARAMS = 400_000_000
_OVERHEAD_BYTES = 8 << 20  # config, manifest, RNG states, pickle framing
_OPTIMIZER_BYTES_PER_PARAM = 8  # AdamW: two moments, counted as fp32 (the upper bound)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


# ---------------------------------------------------------------- size estimates


def estimate_checkpoint_bytes(model: Any, mode: str) -> int:
    """Bytes of one checkpoint of a loaded model: weights saved + AdamW state + overhead.

    mode "full": every parameter is saved (the checkpoint is a complete model); "lora": only
    the trainable ones (adapters, modules_to_save, audio attention). The optimizer state is
    two fp32 moments per trainable parameter. Shared (tied) parameters count once.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    saved = params if mode == "full" else trainable + _frozen_audio_attention(model)
    weights = sum(p.numel() * p.element_size() for p in saved)
    optim = _OPTIMIZER_BYTES_PER_PARAM * sum(p.numel() for p in trainable)
    return int((weights + optim) * 1.01) + _OVERHEAD_BYTES


def _frozen_audio_attention(model: Any) -> list:
    """LoRA mode: frozen audio self-attention weights, which `save_trainable` writes beside the adapter
    (extra_weights.safetensors: no base checkpoint has them)."""
    from higgs_tune.model.audio_attention import AUDIO_ATTN_KEY_PARTS

    return [
        p
        for name, p in model.named_parameters()
        if not p.requires_grad and "lora_" not in name and any(part in name for part in AUDIO_ATTN_KEY_PARTS)
    ]


def _read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors file's JSON header, without reading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _local_weight_files(name_or_path: str) -> list[Path]:
    """The model's safetensors files if they are on this machine (a folder, or the hub cache)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return sorted(folder.glob("*.safetensors"))
    if str(name_or_path).startswith(("/", ".", "~")):  # a local path, never a hub id: say it is missing now
        from higgs_tune.model.load import resolve_checkpoint

        resolve_checkpoint(name_or_path)  # raises the model loader's own ModelLoadError
    from huggingface_hub import (
        try_to_load_from_cache,  # offline: looks only at the local cache
    )

    try:
        index = try_to_load_from_cache(name_or_path, "model.safetensors.index.json")
    except ValueError:  # not a folder here and not a valid hub id (a typo'd path): loading the model says so
        return []
    if isinstance(index, str):
        shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        paths = [try_to_load_from_cache(name_or_path, s) for s in shards]
        return [Path(p) for p in paths] if all(isinstance(p, str) for p in paths) else []
    single = try_to_load_from_cache(name_or_path, "model.safetensors")
    return [Path(single)] if isinstance(single, str) else []


# Rough name patterns of the LoRA pathways / fully trained modules in the transformers layout;
# only for this estimate before loading (model/lora.py resolves the real targets after load).
_PATHWAY_PATTERNS = {
    cfg_names.TEXT_ATTN: re.compile(r"\.self_attn\.[qkvo]_proj\.weight$"),
    cfg_names.TEXT_MLP: re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$"),
    cfg_names.AUDIO_MLP: re.compile(r"\.audio_mlp\.(gate|up|down)_proj\.weight$"),
    cfg_names.AUDIO_ATTN: re.compile(r"\.audio_attn\..*\.weight$"),
}
_MODULE_PATTERNS = {
    cfg_names.AUDIO_LM_HEAD: re.compile(r"^audio_lm_head\."),
    cfg_names.AUDIO_EMBEDDINGS: re.compile(r"embed_audio_tokens\."),
    cfg_names.TEXT_LM_HEAD: re.compile(r"^text_lm_head\."),
    cfg_names.TEXT_EMBEDDINGS: re.compile(r"embed_tokens\.weight$"),
    cfg_names.AUDIO_ATTN: re.compile(r"\.audio_attn\."),
}


def rough_checkpoint_bytes(cfg: Any) -> int:
    """A checkpoint's size from the config alone, before the model loads.

    Reads only the headers of the model's safetensors files when they are on this machine
    (exact parameter counts); otherwise assumes the released 3B model. Refine after loading
    with `estimate_checkpoint_bytes(model, mode)`.
    """
    dtype_bytes = _DTYPE_BYTES.get(cfg.model.dtype, 4)
    f = cfg.finetune
    files = _local_weight_files(cfg.model.name_or_path)
    shapes: dict[str, tuple[str, list[int]]] = {}
    for path in files:
        shapes.update(_read_safetensors_header(path))

    def numel(shape):
        n = 1
        for s in shape:
            n *= s
        return n

    if shapes:
        total = sum(numel(s) for _, s in shapes.values())
        block, block_lora = _added_audio_attention(cfg, shapes, numel)
        if f.mode == "full":
            frozen = sum(
                numel(s)
                for name, (_, s) in shapes.items()
                if any(
                    p.search(name) for key, p in {**_PATHWAY_PATTERNS, **_MODULE_PATTERNS}.items() if key in f.freeze
                )
            )
            frozen += block if cfg_names.AUDIO_ATTN in f.freeze else 0
            saved, trainable = total + block, total + block - frozen
        else:
            lora = sum(
                f.lora_r * (s[0] + s[1])
                for name, (_, s) in shapes.items()
                if len(s) == 2 and any(_PATHWAY_PATTERNS[p].search(name) for p in f.pathways if p in _PATHWAY_PATTERNS)
            )
            lora += block_lora if cfg_names.AUDIO_ATTN in f.pathways else 0
            modules = sum(
                numel(s)
                for name, (_, s) in shapes.items()
                if any(_MODULE_PATTERNS[m].search(name) for m in f.train_modules if m in _MODULE_PATTERNS)
            )
            trained_block = block if cfg_names.AUDIO_ATTN in f.train_modules else 0
            trainable = lora + modules + trained_block
            # peft keeps LoRA weights in float32 whatever the model dtype (autocast_adapter_dtype); an added
            # audio self-attention is saved beside the adapter (extra_weights) even when it is frozen
            weights = lora * 4 + (modules + block) * dtype_bytes
            return int((weights + trainable * _OPTIMIZER_BYTES_PER_PARAM) * 1.01) + _OVERHEAD_BYTES
    else:
        log.info(
            "output dir: %s is not on this machine yet; the space check assumes the released 3B model",
            cfg.model.name_or_path,
        )
        if f.mode == "full":
            saved = trainable = _FALLBACK_PARAMS
        else:
            saved = trainable = _FALLBACK_LORA_PARAMS + _FALLBACK_MODULE_PARAMS * len(f.train_modules)
    return int((saved * dtype_bytes + trainable * _OPTIMIZER_BYTES_PER_PARAM) * 1.01) + _OVERHEAD_BYTES


def _added_audio_attention(cfg: Any, shapes: dict, numel) -> tuple[int, int]:
    """(parameters, LoRA parameters) of an audio self-attention the loader adds because the
    checkpoint has none (model.audio_self_attention on a checkpoint without `audio_attn` weights):
    per layer a copy of the shared attention's q/k/v/o plus one norm."""
    if not cfg.model.audio_self_attention or any(".audio_attn." in name for name in shapes):
        return 0, 0
    attn = [s for name, (_, s) in shapes.items() if _PATHWAY_PATTERNS[cfg_names.TEXT_ATTN].search(name)]
    norms = sum(numel(s) for name, (_, s) in shapes.items() if name.endswith(".input_layernorm.weight"))
    return sum(numel(s) for s in attn) + norms, sum(cfg.finetune.lora_r * (s[0] + s[1]) for s in attn if len(s) == 2)


def checkpoints_on_disk(cfg: Any, total_steps: int | None = None) -> tuple[int, str]:
    """How many checkpoints the disk holds at most during the run, and why.

    save_total_limit step checkpoints + the final one + the one being written before the
    oldest is rotated away (+ the best one when keep_best keeps it beyond the limit).
    """
    c = cfg.checkpoint
    steps = total_steps or cfg.train.max_steps
    best = 1 if c.keep_best else 0
    if c.save_total_limit is not None:
        return c.save_total_limit + 2 + best, f"save_total_limit {c.save_total_limit} + final + one being written" + (
            " + best" if best else ""
        )
    if steps:
        n = steps // c.save_steps
        return n + 2, f"{n} saves (all kept) + final + one being written"
    log.warning(
        "output dir: save_total_limit is null (keep all) and the run length is not known yet: the space check "
        "counts 5 checkpoints"
    )
    return 5, "5 (keep-all, run length unknown)"


# ---------------------------------------------------------------- folder checks


def _is_our_config(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            # the header's first words only: a later wording of it still marks the file as ours
            return f.readline().startswith(CONFIG_HEADER.split(":")[0])
    except (OSError, UnicodeDecodeError):
        return False


def _is_ours(entry: Path, listed: set[str] | None = None) -> bool:
    """Written by higgs-tune: listed in the folder's ownership manifest (`runfs.claim`), or
    proven by content (a config.yaml with our header, a checkpoint with our manifest), or a
    pid-named leftover. A name alone (logs/, eval/, train.log, ...) never makes an entry ours."""
    name = entry.name
    if listed is None:
        listed = owned_names(entry.parent)
    if name == CONFIG_FILE:
        return _is_our_config(entry)
    if name in listed:
        return True
    if RUN_PATTERN.match(name) and not CHECKPOINT_RE.match(name):
        return True  # .tmp-*, .old-*, the write probe: named with our pid
    if (CHECKPOINT_RE.match(name) or name == FINAL_NAME) and entry.is_dir():
        return _is_our_checkpoint(entry)
    return False


def _is_our_checkpoint(folder: Path) -> bool:
    from higgs_tune.errors import CheckpointError
    from higgs_tune.train.checkpoint import read_manifest  # the format's own check

    try:
        read_manifest(folder)
    except CheckpointError:
        return False
    return True


def _reason(e: OSError) -> str:
    hint = {
        errno.EACCES: "permission denied: fix its permissions or choose another folder",
        errno.EPERM: "operation not permitted (immutable or protected folder): choose another folder",
        errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
        errno.ENOSPC: "the disk is full: free space or choose another disk",
        errno.EDQUOT: "the disk quota is exhausted: free space or choose another disk",
        errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    }.get(e.errno)
    return f"{e.strerror or e}" + (f" ({hint})" if hint else "")


def _ensure_writable(path: Path) -> None:
    """Create `path` and prove it takes a file: write, fsync, remove a probe."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"checkpoint.output_dir {path} is a file, not a folder: choose a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"checkpoint.output_dir {path} cannot be created: {_reason(e)}.") from e
    probe = path / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"higgs-tune write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the folder refuses changes: the probe was never created; the error below says why
        raise OutputDirError(f"checkpoint.output_dir {path} is not writable: {_reason(e)}.") from e


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_our_artefacts(path: Path, entries: list[Path]) -> None:
    """--overwrite: remove our entries; folders are renamed away first so none is left half-deleted."""
    remove_owned(path, entries)
    log.warning(
        "output dir: --overwrite removed %d earlier run artefact(s) from %s: %s",
        len(entries),
        path,
        ", ".join(sorted(e.name for e in entries)),
    )


def _check_contents(path: Path, cfg: Any, overwrite: bool, resume: str | Path | None) -> tuple[list[Path], bool]:
    """Decide what to do with an existing folder: (our entries to remove, is a continued run)."""
    entries = sorted(path.iterdir())
    # the probe, the lock (held by this process now) and the ownership manifest are bookkeeping
    entries = [e for e in entries if not e.name.startswith(PROBE_PREFIX) and e.name not in (LOCK_FILE, OWNED_FILE)]
    if not entries:
        return [], False
    listed = owned_names(path)
    ours = [e for e in entries if _is_ours(e, listed)]
    foreign = [e.name for e in entries if not _is_ours(e, listed)]
    shown = describe_names(foreign)
    run_config = path / CONFIG_FILE
    is_run = run_config.is_file() and _is_our_config(run_config)

    resume_inside = resume is not None and (str(resume) == "auto" or _inside(Path(resume), path))
    if overwrite and resume_inside:
        raise OutputDirError(
            f"--overwrite would remove the checkpoints that --resume {resume} continues from in {path}: use one of "
            "the two."
        )
    if resume is not None and not overwrite and (is_run or ours):
        if not is_run:
            raise OutputDirError(
                f"{path} holds higgs-tune artefacts but no config.yaml written by higgs-tune, so it cannot be "
                "checked to be a run of this config. Copy a checkpoint's config.yaml there to continue it, or "
                "start over with --overwrite."
            )
        try:
            saved = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise OutputDirError(
                f"{run_config} cannot be read ({e}): cannot check that this is a run of the same config. Start "
                "over with --overwrite or choose another output_dir."
            ) from e
        changes = resume_config_changes(saved, cfg)
        if changes:
            listing = "\n  ".join(changes)
            raise OutputDirError(
                f"{path} is a run of a different config; changed settings that resuming must keep:\n  {listing}\n"
                "Restore them to resume, start over there with --overwrite, or choose a new output_dir "
                "(and --resume-weights-only CHECKPOINT to start from its weights)."
            )
        if foreign:
            log.info("output dir: %s also holds files higgs-tune did not write (kept): %s", path, shown)
        return [], True
    if foreign:
        if overwrite:
            raise OutputDirError(
                f"{path} holds files higgs-tune did not write ({shown}); --overwrite removes only higgs-tune's own "
                "files and never these. Move them away or choose another checkpoint.output_dir."
            )
        raise OutputDirError(
            f"{path} is not empty and is not a higgs-tune run (it holds {shown}): choose an empty or new "
            "checkpoint.output_dir."
        )
    if overwrite:
        return ours, False
    names = ", ".join(e.name for e in ours[:5]) + (" ..." if len(ours) > 5 else "")
    raise OutputDirError(
        f"{path} holds an earlier higgs-tune run ({names}): continue it with --resume auto, start over with "
        "--overwrite (removes only higgs-tune's files), or choose another checkpoint.output_dir."
    )


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _existing_checkpoints(path: Path) -> int:
    return sum(1 for e in path.iterdir() if e.is_dir() and (e.name == FINAL_NAME or CHECKPOINT_RE.match(e.name)))


def _prepare_main(
    cfg: Any, overwrite: bool, resume: str | Path | None, estimate_bytes: int, total_steps: int | None
) -> Path:
    c = cfg.checkpoint
    path = Path(c.output_dir)
    try:
        _ensure_writable(path)
    except OutputDirError as first:
        if not c.output_dir_fallback:
            raise OutputDirError(
                f"{first} Or set checkpoint.output_dir_fallback to a folder to use instead."
            ) from first
        fallback = Path(c.output_dir_fallback)
        log.warning("!" * 78)
        log.warning("OUTPUT DIR FALLBACK: %s", first)
        log.warning("OUTPUT DIR FALLBACK: writing this run to checkpoint.output_dir_fallback = %s", fallback)
        log.warning("!" * 78)
        try:
            _ensure_writable(fallback)
        except OutputDirError as second:
            raise OutputDirError(f"{first}\nThe fallback is not usable either: {second}") from second
        path = fallback

    # One run per folder: held until the run ends (or the process dies; the OS releases it then).
    lock = RunLock.acquire(path)
    try:
        return _prepare_locked(path, cfg, overwrite, resume, estimate_bytes, total_steps)
    except BaseException:
        lock.release()  # a run that does not start leaves no lock behind
        raise


def _prepare_locked(
    path: Path, cfg: Any, overwrite: bool, resume: str | Path | None, estimate_bytes: int, total_steps: int | None
) -> Path:
    c = cfg.checkpoint
    remove, continued = _check_contents(path, cfg, overwrite, resume)

    # Space: the checkpoints this run will hold at once, minus those already there (a
    # continued run), plus min_free_gb; what --overwrite is about to free counts as free.
    n, why = checkpoints_on_disk(cfg, total_steps)
    if continued:
        n = max(1, n - _existing_checkpoints(path))
        why += ", minus the checkpoints already there"
    reserve = int(c.min_free_gb * 1e9)
    needed = n * estimate_bytes + reserve
    free = shutil.disk_usage(path).free
    reclaim = sum(_tree_bytes(e) for e in remove)
    if free + reclaim < needed:
        raise OutputDirError(
            f"{path}: {format_bytes(free)} "
            f"free{f' (+{format_bytes(reclaim)} freed by --overwrite)' if reclaim else ''}, the run needs about "
            f"{format_bytes(needed)} = {n} checkpoint(s) x {format_bytes(estimate_bytes)} ({why}) + "
            f"checkpoint.min_free_gb {c.min_free_gb} GB. Free space, choose another disk, or lower "
            "checkpoint.save_total_limit."
        )
    if remove:
        _remove_our_artefacts(path, remove)

    # The run's config.yaml marks the folder as a run of this config (for --resume and
    # --overwrite later); a continued run's non-resume settings may have changed, so rewrite.
    atomic_write_text(path / CONFIG_FILE, config_yaml_text(cfg))
    claim(path, CONFIG_FILE)
    log.info(
        "output dir: %s (%s); %s free, needs about %s (%d checkpoint(s) x %s + min_free_gb %s GB)",
        path,
        "continuing the run there" if continued else "new run",
        format_bytes(shutil.disk_usage(path).free),
        format_bytes(needed),
        n,
        format_bytes(estimate_bytes),
        c.min_free_gb,
    )
    return path


def prepare_output_dir(
    cfg: Any,
    *,
    overwrite: bool = False,
    resume: str | Path | None = None,
    estimate_bytes: int,
    total_steps: int | None = None,
) -> Path:
    """Create and check the run folder; return it (the fallback when that was used).

    Checks, in order: it can be created and written (a probe file is written, fsync'd and
    removed; on failure `checkpoint.output_dir_fallback` is used, with a warning, if set);
    its contents (empty; or, with `resume`, a run of the same config; or, with `overwrite`,
    only higgs-tune's own artefacts, which are then removed); free space >= estimate_bytes x
    checkpoints kept at once + min_free_gb. Then writes the run's `config.yaml`.
    `estimate_bytes`: one checkpoint (`rough_checkpoint_bytes(cfg)` before the model loads).
    `total_steps`: the run length when only num_epochs is set (for save_total_limit: null).
    Raises OutputDirError naming the path and the fix. Collective in a multi-process run:
    the main process checks and writes, every rank gets the same path or the same error.
    """
    outcome: tuple[str, str] | None = None
    error: OutputDirError | None = None
    if dist_utils.is_main():
        try:
            outcome = ("ok", str(_prepare_main(cfg, overwrite, resume, estimate_bytes, total_steps)))
        except OutputDirError as e:
            outcome = ("error", str(e))
            error = e
    status, payload = dist_utils.broadcast_from_main(outcome)
    if status == "error":
        if error is not None:
            raise error
        raise OutputDirError(payload)
    return Path(payload)
