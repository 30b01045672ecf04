"""Which model family a checkpoint belongs to: `model.family` when set, else config.json `model_type`.

    family = family_for("models/higgs-v3")            # V3
    family = family_for(cfg.model.name_or_path, cfg.model.family)

Two families, two entries: no plugin registry.
"""

from __future__ import annotations

import json
from pathlib import Path

from higgs_tune.errors import ModelLoadError
from higgs_tune.families.base import ModelFamily
from higgs_tune.families.v2.family import V2
from higgs_tune.families.v3.family import V3
from higgs_tune.model.load import resolve_checkpoint

FAMILIES: dict[str, ModelFamily] = {"v2": V2, "v3": V3}


def family_by_name(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ModelLoadError(f"model.family {name!r} is not one of {', '.join(FAMILIES)} (or null: detect it).")
    return FAMILIES[name]


def model_type_of(name_or_path: str | Path) -> str | None:
    """config.json `model_type` of a checkpoint folder or Hub id (None when it has no config.json)."""
    path = resolve_checkpoint(name_or_path) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}). Restore the checkpoint's config.json.") from None


def family_for(name_or_path: str | Path, family: str | None = None) -> ModelFamily:
    """`family` ("v2" | "v3") when given, else the family whose model_type config.json names; a
    checkpoint of neither is v2's to load (its loader names what it found)."""
    if family:
        return family_by_name(family)
    model_type = model_type_of(name_or_path)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return V2


def load_codec_for(name_or_path: str | Path, device="cpu"):
    """The codec `prepare` encodes with: a v3 checkpoint's bundled codec; otherwise v2's loader
    (a model folder with audio_tokenizer/, an audio tokenizer folder, or a Hub id)."""
    path = Path(name_or_path)
    if (path / "config.json").is_file() and model_type_of(path) in V3.model_types:
        return V3.load_codec(path, device)
    return V2.load_codec(name_or_path, device)
