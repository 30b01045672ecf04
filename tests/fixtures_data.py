"""Session fixtures: the bundled demo data prepared into code caches with the tiny stack.

tests/conftest.py imports them (`from fixtures_data import demo_cache, demo_heldout_cache`),
so every test can ask for `demo_cache` / `demo_heldout_cache` (a cache folder Path; open it
with `higgs_tune.data.cache.CodeCache.open`). Preparing the 26 + 6 demo clips with the tiny
codec takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from higgs_tune.data.prepare import prepare_manifest


def prepare_demo_cache(manifest: Path, model_dir: Path, out_dir: Path, **kw) -> Path:
    """Prepare `manifest` with the tiny stack into `out_dir` (strict, no progress bars)."""
    return prepare_manifest(manifest, model_dir, out_dir, progress=False, **kw).cache_dir


@pytest.fixture(scope="session")
def demo_cache(tiny_dir, demo_manifest, tmp_path_factory) -> Path:
    """Code cache of examples/data/demo/manifest.jsonl: 26 clips, 2 with an explicit ref_audio."""
    return prepare_demo_cache(demo_manifest, tiny_dir, tmp_path_factory.mktemp("demo_cache") / "cache")


@pytest.fixture(scope="session")
def demo_heldout_cache(tiny_dir, demo_heldout, tmp_path_factory) -> Path:
    """Code cache of examples/data/demo/heldout.jsonl: 6 clips, 2 per speaker."""
    return prepare_demo_cache(demo_heldout, tiny_dir, tmp_path_factory.mktemp("demo_heldout_cache") / "cache")


@pytest.fixture(scope="session")
def tiny_v3_stack(tmp_path_factory) -> Path:
    """The tiny Higgs Audio v3 checkpoint (released layout, seed 0); read-only."""
    from higgs_tune.tiny.v3 import make_tiny_v3

    return make_tiny_v3(tmp_path_factory.mktemp("tiny_v3") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def v3_demo_cache(tiny_v3_stack, demo_manifest, tmp_path_factory) -> Path:
    """The demo clips encoded with the tiny v3 checkpoint's bundled codec (`prepare --model V3`)."""
    from higgs_tune.families.select import load_codec_for

    out = tmp_path_factory.mktemp("v3_demo_cache") / "cache"
    return prepare_demo_cache(demo_manifest, tiny_v3_stack, out, load_codec=load_codec_for)


@pytest.fixture(scope="session")
def v3_heldout_cache(tiny_v3_stack, demo_heldout, tmp_path_factory) -> Path:
    """The held-out demo clips encoded with the tiny v3 checkpoint's bundled codec."""
    from higgs_tune.families.select import load_codec_for

    out = tmp_path_factory.mktemp("v3_heldout_cache") / "cache"
    return prepare_demo_cache(demo_heldout, tiny_v3_stack, out, load_codec=load_codec_for)
