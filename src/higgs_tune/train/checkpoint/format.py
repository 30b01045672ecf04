"""What a checkpoint folder holds, and how it is written and verified.

    checkpoint-<step>/  (or final/)
      <weights files>     written by the caller's `save_weights(dir)`: a PEFT adapter
                          (adapter_model.safetensors + adapter_config.json [+ README.md])
                          or the full model in safetensors, audio-attention weights included
      training_state.pt   optimizer, scheduler, grad scaler, sampler state, step, epoch and the
                          RNG states of every rank (keys KEY_*); read back with weights_only=True
      config.yaml         the resolved config of the run (first line CONFIG_HEADER)
      manifest.json       step, epoch, world size, metrics, and every file's size + sha256

`write_checkpoint_files` writes the state, the config and the manifest into a folder that
already holds the weights, fsyncs everything, and `check_written` reads it back; the
manager then publishes the folder with one rename (`runfs.publish_dir`). `verify_checkpoint`
re-hashes every file of a published checkpoint before a resume trusts it.

Nothing here unpickles arbitrary objects: tensors and plain containers go through
`torch.save` and are read with `torch.load(weights_only=True)`; everything else is JSON/YAML.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from higgs_tune.errors import CheckpointError
from higgs_tune.infer.card import README, build_model_card, data_summary
from higgs_tune.runfs import (
    CONFIG_FILE,
    CONFIG_HEADER,
    FINAL_NAME,
    MANIFEST_FILE,
    TRAINING_STATE_FILE,
    checkpoint_step,
    fsync_path,
    fsync_tree,
    sha256_file,
    verify_listed_files,
)

log = logging.getLogger("higgs_tune.train.checkpoint")

FORMAT = "higgs-tune-checkpoint"
FORMAT_VERSION = 1

# keys of training_state.pt
KEY_STEP = "step"
KEY_EPOCH = "epoch"
KEY_WORLD_SIZE = "world_size"
KEY_OPTIMIZER = "optimizer"
KEY_SCHEDULER = "scheduler"
KEY_GRAD_SCALER = "grad_scaler"
KEY_SAMPLER = "sampler_state"
KEY_RNG = "rng"  # list, one rng_state() per rank, in rank order
# absent: optimizer.state_dict(); "dcp": FSDP, the optimizer state is in the dcp/ shards (sharded.py);
# OPTIMIZER_FULL_FQN: FSDP checkpoints of earlier versions, gathered on rank 0 (still read)
KEY_OPTIMIZER_LAYOUT = "optimizer_layout"
OPTIMIZER_FULL_FQN = "full-fqn"  # torch.distributed.checkpoint full optimizer state dict (keyed by parameter name)


def config_yaml_text(config: Any) -> str:
    """The resolved config as YAML, after the header that marks the file as ours."""
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    return CONFIG_HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_checkpoint_card(folder: Path, config: Any, step: int, metrics: Mapping[str, Any], eval_loss) -> None:
    """README.md: the model card (infer/card.py), replacing PEFT's blank template; hashed with the rest."""
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    model = data.get("model", {})
    card = build_model_card(
        base=str(model.get("name_or_path", "?")),
        config=data,
        step=step,
        metrics=metrics,
        eval_loss=eval_loss,
        data=data_summary(data.get("data", {}).get("train_cache")),
        use_text_head=bool(model.get("use_text_head")),
    )
    (folder / README).write_text(card, encoding="utf-8")


def files_under(folder: Path) -> list[Path]:
    """Every regular file below `folder`, as sorted relative paths."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def short_torch_error(e: BaseException) -> str:
    """torch's weights_only failure is a page of advice; its one informative line names the type."""
    for line in str(e).splitlines():
        if line.strip().startswith("WeightsUnpickler error:"):
            return line.strip().split(" Please use", 1)[0].rstrip(". ")  # not the advice to allowlist it
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---------------------------------------------------------------- writing


def training_state(
    *,
    step: int,
    epoch: int | float,
    world_size: int,
    optimizer: dict | None,
    scheduler: dict | None,
    grad_scaler: dict | None,
    sampler_state: Any,
    rng: list,
    layout: str | None = None,
) -> dict:
    """The contents of training_state.pt. `optimizer`: `optimizer.state_dict()`, or None with
    `layout` "dcp" (FSDP: the optimizer state is in the checkpoint's dcp/ shards)."""
    state = {
        KEY_STEP: int(step),
        KEY_EPOCH: epoch,
        KEY_WORLD_SIZE: world_size,
        KEY_OPTIMIZER: optimizer,
        KEY_SCHEDULER: scheduler,
        KEY_GRAD_SCALER: grad_scaler,
        KEY_SAMPLER: sampler_state,
        KEY_RNG: rng,
    }
    if layout is not None:
        state[KEY_OPTIMIZER_LAYOUT] = layout
    return state


def write_checkpoint_files(
    folder: Path,
    state: dict,
    config: Any,
    *,
    final: bool,
    eval_loss: float | None,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    hashed: Mapping[str, dict] | None = None,
) -> dict:
    """Complete a checkpoint in `folder` (which already holds the weights); return its manifest.

    Writes training_state.pt (`state`, keyed by KEY_*) and config.yaml, fsyncs them and the
    weights, hashes every file, writes manifest.json and fsyncs the folder tree. `hashed`:
    {relative path: {bytes, sha256}} of files already fsync'd and hashed by the process that wrote
    them (FSDP shards, each rank its own); every other file is hashed here.
    """
    hashed = dict(hashed or {})
    torch.save(state, folder / TRAINING_STATE_FILE)
    (folder / CONFIG_FILE).write_text(config_yaml_text(config), encoding="utf-8")
    write_checkpoint_card(folder, config, int(state[KEY_STEP]), metrics, eval_loss)
    # Durable before the manifest vouches for them: file data first, folder entries below.
    for rel in files_under(folder):
        if str(rel) not in hashed:
            fsync_path(folder / rel)
    files = {
        str(rel): hashed.get(str(rel)) or {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
        for rel in files_under(folder)
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(state[KEY_STEP]),
        "epoch": state[KEY_EPOCH],
        "final": bool(final),
        "world_size": state[KEY_WORLD_SIZE],
        "eval_loss": eval_loss,
        "metrics": dict(metrics),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "files": files,
    }
    if data:  # what the run trained on: cache content and codec fingerprints (resume compares them)
        manifest["data"] = dict(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fsync_tree(folder)
    return manifest


def check_written(folder: Path, manifest: dict) -> None:
    """Read back what was just written: the manifest, the file list and sizes, the training state.

    The hashes in the manifest were computed by reading the files back after their fsync,
    so they already vouch for the bytes on disk; hashing a second time would double the
    cost of a save and only check that nothing changed in between. The weights are checked
    by the caller's `verify_weights`.
    """
    try:
        reread = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / MANIFEST_FILE} does not read back ({e}).") from e
    if reread != json.loads(json.dumps(manifest)):
        raise CheckpointError(
            f"{folder / MANIFEST_FILE} reads back different from what was written: the disk or file system is faulty."
        )
    on_disk = {str(p) for p in files_under(folder)} - {MANIFEST_FILE}
    if on_disk != set(manifest["files"]):
        raise CheckpointError(
            f"{folder}: files on disk ({', '.join(sorted(on_disk))}) differ from the manifest "
            f"({', '.join(sorted(manifest['files']))})."
        )
    for rel, meta in manifest["files"].items():
        size = (folder / rel).stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{folder / rel} has {size} bytes after writing, {meta['bytes']} when hashed: the file changed "
                "while being saved."
            )
    try:
        # mmap: the unpickling (and weights_only's type checks) run without reading all tensor bytes.
        torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's safe unpickler raises UnpicklingError/RuntimeError
        raise CheckpointError(
            f"{folder / TRAINING_STATE_FILE} cannot be read back with weights_only=True ({short_torch_error(e)}). "
            "sampler_state may hold only tensors, numbers, strings, lists, tuples and dicts."
        ) from e


# ---------------------------------------------------------------- reading and verifying


def read_manifest(ckpt: Path) -> dict:
    """The parsed manifest of a checkpoint folder; CheckpointError if absent or unreadable."""
    path = Path(ckpt) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt}: no {MANIFEST_FILE}, so it is not a complete higgs-tune checkpoint (an interrupted save, or "
            "another tool's folder)."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({e}): the checkpoint is damaged; resume from an older one."
        ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointError(
            f"{path} is not a higgs-tune checkpoint manifest (format "
            f"{data.get('format') if isinstance(data, dict) else None!r})."
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {data['format_version']}, this higgs-tune reads up to {FORMAT_VERSION}: "
            "upgrade higgs-tune."
        )
    return data


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file of the manifest (present, same size, same sha256); return the manifest.

    Every file the format requires must be listed: training_state.pt, config.yaml and the
    weights (a weight file on disk that the manifest does not list is an error: weights edited
    after the save would otherwise pass); an entry without `bytes`/`sha256` is a damaged
    manifest. Raises CheckpointError naming the first file at fault. Other files not in the
    manifest are not an error (nothing reads them) but are logged.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a folder.")
    manifest = read_manifest(ckpt)
    files: dict = manifest["files"]
    # every file listed verifies, the resume files and the weights are listed, no weight file is unlisted
    problems = verify_listed_files(ckpt, files, required=(TRAINING_STATE_FILE, CONFIG_FILE))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) in {ckpt})" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    extra = [str(p) for p in files_under(ckpt) if str(p) not in files and str(p) != MANIFEST_FILE]
    if extra:
        log.info("checkpoint %s: files not in its manifest (not used by resume): %s", ckpt, ", ".join(extra))
    return manifest


def read_checkpoint_config(ckpt: Path) -> dict:
    path = Path(ckpt) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({e}): cannot check that the new config continues this run."
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a config mapping.")
    return data


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N and final folder, newest first (final wins a tie)."""
    found: list[tuple[int, int, Path]] = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else ():
        if not entry.is_dir():
            continue
        step = checkpoint_step(entry.name)
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
