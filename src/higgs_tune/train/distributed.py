"""Small multi-process helpers: who is the main process, a barrier, and RNG states per rank.

Everything here works the same with one process (no process group: rank 0 of 1) and under
`torchrun` / `accelerate launch` (a `torch.distributed` process group, gloo or NCCL), so the
callers never branch on "am I distributed?".

RNG states are kept in a form that `torch.load(weights_only=True)` reads back: Python's
`random.getstate()` is a tuple of 625 ints and NumPy's `get_state()` holds a uint32 array,
neither of which the safe unpickler accepts as is, so both become int64 tensors + plain
numbers here. A checkpoint therefore never needs pickle's arbitrary-object loading.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on the one process that writes files (global rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives; a no-op with one process."""
    if _initialized():
        dist.barrier()


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank sends `obj`; rank 0 gets the list in rank order, the others get None.

    Collective: every rank must call it at the same point. `obj` is pickled for transport
    between our own processes only; it is read back with the safe unpickler, so it may
    hold only tensors, numbers, strings, lists, tuples and dicts (what `rng_state` returns).
    """
    if not _initialized():
        return [obj]
    out: list[T] | None = [None] * world_size() if is_main() else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0, weights_only=True)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's `obj` on every rank (the others' argument is ignored). Collective."""
    if not _initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (CPU) and CUDA RNG states, weights_only-safe.

    Layout (all tensors on CPU):
      python: {"version": int, "state": int64 (625,), "gauss_next": float | None}
      numpy:  {"kind": "MT19937", "keys": int64 (624,), "pos": int, "has_gauss": int, "cached_gaussian": float}
      torch:  uint8 tensor (torch.get_rng_state())
      cuda:   list of uint8 tensors, one per visible device, or None without CUDA
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what `rng_state` captured. Returns warnings (empty when restored exactly).

    A CUDA state saved on a machine with a different number of GPUs (or none) cannot be
    restored exactly; that is reported, not raised: the CPU generators are still exact.
    """
    warnings: list[str] = []
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.append(
                f"the checkpoint holds CUDA RNG states for {len(cuda)} device(s) but CUDA is not available: GPU "
                "random numbers will differ from the uninterrupted run."
            )
        elif len(cuda) != torch.cuda.device_count():
            warnings.append(
                f"the checkpoint holds CUDA RNG states for {len(cuda)} device(s), this process sees "
                f"{torch.cuda.device_count()}: restored the first {min(len(cuda), torch.cuda.device_count())}."
            )
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, device=i)
        else:
            torch.cuda.set_rng_state_all(cuda)
    elif torch.cuda.is_available():
        warnings.append(
            "the checkpoint holds no CUDA RNG state (saved without CUDA): GPU random numbers will differ from the "
            "uninterrupted run."
        )
    return warnings


@contextlib.contextmanager
def preserved_rng() -> Iterator[dict[str, Any]]:
    """Run a block without moving any RNG stream of this process (python, NumPy, torch, CUDA).

    For work beside training that draws random numbers (generating samples, building a model to
    verify a checkpoint): with it, how often that work runs does not change the training run, so
    such settings may differ between a run and its resume. Yields the state it restores.
    """
    state = rng_state()
    try:
        yield state
    finally:
        set_rng_state(state)


def gather_rng_states() -> list[dict[str, Any]] | None:
    """Every rank's `rng_state()`, in rank order, on rank 0 (None elsewhere). Collective."""
    return gather_to_main(rng_state())


# ---------------------------------------------------------------- generation on a sharded model


def outermost_fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units of `model` that no other unit of it holds (for the module given to
    `accelerator.prepare`: the root unit, i.e. embeddings, heads, final norm and whatever no nested
    unit wraps; all of the model when it is one unit)."""
    from torch.distributed.fsdp import FSDPModule

    named = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    names = [n for n, _ in named]
    return [m for n, m in named if not any(o != n and (o == "" or n.startswith(o + ".")) for o in names)]


@contextlib.contextmanager
def gathered_for_generation(sharded_root: torch.nn.Module | None) -> Iterator[None]:
    """Make the model inside an FSDP2-sharded `sharded_root` (the module given to
    `accelerator.prepare`) usable by a generation loop on every rank at once.

    Generation calls the model's own methods (transformers' `generate`, the v3 stepper), never the
    root module's forward, so the root unit's hooks would never gather its weights: they are gathered
    here for the block and sharded again after it (the embeddings and heads; nested units, one per
    decoder layer, gather and free themselves per call as in training). Collective: every rank enters
    with the same generation to run (`generate_speech(..., synced=True)`). With None it does nothing.
    """
    units = outermost_fsdp_units(sharded_root) if sharded_root is not None else []
    for unit in units:
        # Before the first training step (the quality baseline) no forward has run through the root,
        # so FSDP has not yet decided which unit is the root; a layer called first would take that
        # role and the next training forward fail ("already been lazily initialized"). torch offers
        # no public call for it: the root's own lazy init, a no-op once done.
        unit._get_fsdp_state()._lazy_init()
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
