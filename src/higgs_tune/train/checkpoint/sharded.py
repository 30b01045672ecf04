"""FSDP checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own shards.

    checkpoint-<step>/            (FSDP run)
      dcp/__<rank>_0.distcp       this rank's shards of the trained weights and of the optimizer
                                  state (AdamW moments, step), written by that rank
      dcp/.metadata               where every shard lives (written by rank 0)
      training_state.pt           scheduler, sampler state, step, RNG states of every rank (no
                                  optimizer: it is in dcp/); optimizer_layout "dcp"
      config.yaml, README.md, manifest.json   as in every checkpoint (the manifest lists every
                                  rank's shard file with its sha256, hashed by the rank that wrote it)
    final/                        the same, plus the consolidated weights in the usual format (PEFT
                                  adapter or full safetensors) for `generate` / `export`; so does a
                                  checkpoint that became the new best (best/ links it)

No rank gathers the whole state: each rank writes and hashes its own part, rank 0 writes the small
files, checks that every rank succeeded and publishes the folder with one rename. Only final/ (and
a new best) also gathers the trained weights (not the optimizer state) into rank 0's host memory, to write them in
the usual format: the trained model's weights in their dtype (LoRA: the adapter, megabytes; full
fine-tuning of v2 in bf16: ~11.6 GB of host RAM on rank 0), one tensor at a time on the GPU.

Resume: DCP reshards on load, so a checkpoint saved by N processes loads into M processes, FSDP or
not (M = 1: an unsharded run gets the whole weights and optimizer state). The weights and optimizer
are then exact; the data order and the per-rank random streams are not (see resume.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from higgs_tune.errors import CheckpointError
from higgs_tune.runfs import DCP_DIR, fsync_path, sha256_file
from higgs_tune.train import distributed as dist_utils

DCP_METADATA = ".metadata"
OPTIMIZER_DCP = "dcp"  # training_state.pt's optimizer_layout: the optimizer state is in dcp/


def trained_names(root: torch.nn.Module) -> set[str]:
    """Names (in `root`) of the parameters the run trains: what the shards hold."""
    return {n for n, p in root.named_parameters() if p.requires_grad}


def _state(root: torch.nn.Module, optimizer) -> dict:
    """{"model": trained weights, "optim": optimizer state}, keyed by parameter name; sharded
    tensors (DTensors) under FSDP, whole tensors otherwise. Builds the optimizer state when empty."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = trained_names(root)
    model = {k: v for k, v in get_model_state_dict(root).items() if k in names}
    return {"model": model, "optim": get_optimizer_state_dict(root, optimizer)}


def save_shards(folder: Path, root: torch.nn.Module, optimizer) -> dict[str, dict]:
    """Write this rank's shards into `folder`/dcp (collective: every rank calls it with the same
    folder) and return {relative path: {bytes, sha256}} of the files this rank wrote."""
    import torch.distributed.checkpoint as dcp

    out = Path(folder) / DCP_DIR
    dcp.save(_state(root, optimizer), checkpoint_id=str(out))
    rank = dist_utils.rank()
    mine = sorted(out.glob(f"__{rank}_*.distcp"))
    if dist_utils.is_main():
        mine.append(out / DCP_METADATA)
    hashed = {}
    for path in mine:
        fsync_path(path)
        hashed[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return hashed


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / DCP_DIR / DCP_METADATA).is_file()


def check_shards(folder: Path, names: set[str]) -> None:
    """The shards' metadata lists every trained weight (and nothing the model lacks)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(Path(folder) / DCP_DIR)).read_metadata()
    except Exception as e:  # noqa: BLE001  (a damaged file raises pickle/OS errors)
        raise CheckpointError(f"{Path(folder) / DCP_DIR / DCP_METADATA} cannot be read: {e}") from e
    saved = {k[len("model.") :] for k in meta.state_dict_metadata if k.startswith("model.")}
    if saved != names:
        missing, extra = sorted(names - saved)[:3], sorted(saved - names)[:3]
        raise CheckpointError(
            f"{folder / DCP_DIR}: the shards hold other weights than the model trains (missing {missing}, "
            f"unexpected {extra}): the finetune settings or the model changed. Resume with the settings the run "
            "was saved with, or start from final/ with --resume-weights-only."
        )


def load_shards(folder: Path, root: torch.nn.Module, optimizer) -> None:
    """Load the trained weights and the optimizer state of `folder`/dcp into `root` (FSDP-wrapped or
    plain) and `optimizer`, resharded to this run's processes. Collective under FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    check_shards(folder, trained_names(root))
    state = _state(root, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(Path(folder) / DCP_DIR))
    except Exception as e:  # noqa: BLE001  (DCP wraps every rank's failure in CheckpointException)
        raise CheckpointError(
            f"{folder / DCP_DIR}: the shards do not load into this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Resume with the settings the run was saved with."
        ) from e
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    set_model_state_dict(root, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(root, optimizer, state["optim"])


def rank_tmp_ok(tmp: Path) -> bool:
    """Every rank sees the temporary folder rank 0 made (a run folder on a shared file system)."""
    return Path(tmp).is_dir() and os.access(tmp, os.W_OK)
