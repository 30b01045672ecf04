"""Shared fixtures: the tiny offline Higgs stack (built once per session) and the demo data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "examples" / "data" / "demo"

# The CI machine has 2 shared cores: one thread keeps timings stable and tests deterministic.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Higgs Audio v2 stack saved with save_pretrained (seed 0)."""
    from higgs_tune.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "stack", seed=0)


@pytest.fixture(scope="session")
def demo_manifest() -> Path:
    return DEMO_DIR / "manifest.jsonl"


@pytest.fixture(scope="session")
def demo_heldout() -> Path:
    return DEMO_DIR / "heldout.jsonl"


# Prepared code caches of the demo data (tests/fixtures_data.py): v2 and v3, training and held-out clips.
from fixtures_data import demo_cache, demo_heldout_cache, tiny_v3_stack, v3_demo_cache, v3_heldout_cache  # noqa: E402,F401
