"""Shared helpers for the tests/test_v3_*.py files: one tiny v3 checkpoint per test process."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch


@functools.cache
def tiny_v3_dir(head_copies: bool = False) -> Path:
    """A tiny v3 checkpoint (released layout), built once per process; treat it as read-only."""
    from higgs_tune.tiny.v3 import make_tiny_v3

    out = Path(tempfile.mkdtemp(prefix="higgs-v3-tiny-"))
    atexit.register(shutil.rmtree, out, True)
    return make_tiny_v3(out / "ckpt", seed=0, head_copies=head_copies)


def copy_tiny(dst: Path, head_copies: bool = False) -> Path:
    return Path(shutil.copytree(tiny_v3_dir(head_copies), dst))


@functools.cache
def tiny_tokenizer():
    from higgs_tune.families.v3.checkpoint import load_v3_tokenizer

    return load_v3_tokenizer(tiny_v3_dir())


def tiny_tokens():
    from higgs_tune.families.v3.layout import V3Tokens

    return V3Tokens.from_tokenizer(tiny_tokenizer())


def load_tiny_model(**kwargs):
    from higgs_tune.families.v3.checkpoint import load_v3_checkpoint

    return load_v3_checkpoint(tiny_v3_dir(), **kwargs).model


def random_codes(num_frames: int, seed: int, k: int = 8) -> torch.Tensor:
    return torch.randint(0, 1024, (k, num_frames), generator=torch.Generator().manual_seed(seed))
