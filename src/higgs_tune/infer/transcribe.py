"""`prepare --transcribe`: fill the missing text of untranscribed recordings with an ASR model.

    result = transcribe_missing("data/manifest.jsonl", AsrModel.load("openai/whisper-large-v3"))

Rows without text (the key absent, null or blank) are transcribed (in their language, or
`language`); every other line is copied as written. The result goes to a new manifest beside the
original (`<stem>.transcribed.jsonl`; the user's file is never rewritten) and each filled row is
marked `"text_source": "asr:<model>"`, which prepare carries into the code cache so that
`inspect` lists those clips for a human check. Nothing to fill: the original manifest is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from higgs_tune.errors import DataError
from higgs_tune.infer.evaluate import AsrModel
from higgs_tune.infer.generate import load_codec_audio
from higgs_tune.progress import Progress
from higgs_tune.runfs import atomic_write_bytes

ASR_TEXT_SOURCE = "asr:"  # + the model name


@dataclass
class TranscribeResult:
    manifest: Path  # what to prepare: the new manifest, or the original when nothing was missing
    transcribed: list[str] = field(default_factory=list)  # ids (or audio paths) of the filled rows


def _needs_text(row: dict) -> bool:
    text = row.get("text")
    return text is None or (isinstance(text, str) and not text.strip())


def transcribed_path(manifest: str | Path) -> Path:
    """Where the filled manifest goes: `<stem>.transcribed.jsonl` beside the original."""
    manifest = Path(os.path.abspath(manifest))
    return manifest.with_name(f"{manifest.stem}.transcribed.jsonl")


def check_transcribed_target(target: str | Path, overwrite: bool = False) -> None:
    """An existing filled manifest may hold the user's corrections of the ASR text: it is replaced
    only with `overwrite` (DataError otherwise, before any model loads)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise DataError(
            f"{target} exists already (a filled manifest of an earlier --transcribe, perhaps with your "
            f"corrections): it is left as it is. Fix: prepare it directly (`higgs-tune prepare {target} ...`, "
            "without --transcribe), or pass --overwrite to transcribe again and replace it."
        )


def transcribe_missing(
    manifest: str | Path,
    asr: AsrModel,
    *,
    language: str | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> TranscribeResult:
    """See the module docstring. `out` (default `transcribed_path(manifest)`) is replaced only with
    `overwrite`."""
    manifest = Path(os.path.abspath(manifest))
    target = Path(out) if out else transcribed_path(manifest)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the manifest {manifest} ({e}). Fix: give a UTF-8 JSON Lines file.") from None
    parsed: list[dict | None] = []
    for line in lines:
        try:
            obj = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            obj = None  # validation reports it, with its line number
        parsed.append(obj if isinstance(obj, dict) else None)
    todo = [
        i for i, obj in enumerate(parsed) if obj is not None and _needs_text(obj) and isinstance(obj.get("audio"), str)
    ]
    if not todo:
        return TranscribeResult(manifest)
    check_transcribed_target(target, overwrite)
    progress = progress or Progress()
    progress.start(len(todo), "transcribing", "clips")
    transcribed = []
    try:
        for n, i in enumerate(todo, start=1):
            row = parsed[i]
            wav = load_codec_audio(
                manifest.parent / row["audio"], asr.sample_rate, f"{manifest.name} line {i + 1} audio"
            )
            (text,) = asr.transcribe([wav], row.get("language") or language)
            row["text"] = text.strip()
            row["text_source"] = ASR_TEXT_SOURCE + asr.name
            lines[i] = json.dumps(row, ensure_ascii=False)
            transcribed.append(str(row.get("id") or row["audio"]))
            progress.update(n)
    finally:
        progress.close()
    atomic_write_bytes(target, ("\n".join(lines) + "\n").encode("utf-8"))
    return TranscribeResult(target, transcribed)
