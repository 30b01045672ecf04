"""Datasets where they already live, converted into our manifest rows (then `validate` / `prepare`
as any manifest: one path in).

    convert_source(folder)                  a folder: LJSpeech layout (metadata.csv + wavs/), a
                                            community metadata.json, or <name>.wav + <name>.txt pairs
    convert_hf_dataset(path_or_name, ...)   a Hugging Face `datasets` dataset: a folder written by
                                            `save_to_disk`, or a dataset id in the local Hub cache

LJSpeech: `metadata.csv` lines `id|text|normalized text` (the normalized column, when present and
non-empty, is used: numbers and abbreviations spelled out), audio in `wavs/<id>.wav`; one speaker
(the folder's name unless given).

Hugging Face datasets: the audio column is read without decoding (no audio backend needed) and
each clip written once as a file under `<manifest folder>/<manifest stem>_audio/`, so the
manifest is self-contained; text, speaker and (optional) language come from the named columns.
`datasets` is an optional dependency (`pip install higgs-tune[hf]`).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from higgs_tune.data.manifest import MAX_LISTED_PROBLEMS, ConvertResult, convert_folder, write_manifest_rows
from higgs_tune.errors import DataError
from higgs_tune.model.hub import cached_snapshot, check_hub_source
from higgs_tune.runfs import atomic_write_bytes

LJSPEECH_METADATA = "metadata.csv"
_SAFE = re.compile(r"[^\w.-]+")  # characters kept in file names and speaker names made from ids


def _raise_problems(source, problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"cannot convert {source}: {len(problems)} problem(s); nothing was written:\n{listed}{more}")


def is_ljspeech(folder: str | Path) -> bool:
    return (Path(folder) / LJSPEECH_METADATA).is_file()


def ljspeech_rows(folder: Path, *, speaker: str | None = None, language: str | None = None) -> list[dict]:
    """Rows of an LJSpeech-style folder; every problem (bad line, missing wav) raised at once."""
    meta = folder / LJSPEECH_METADATA
    problems: list[str] = []
    rows = []
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{meta} is not UTF-8 ({e.reason} at byte {e.start}). Fix: save it as UTF-8.") from None
    for number, fields in enumerate(csv.reader(text.splitlines(), delimiter="|", quoting=csv.QUOTE_NONE), start=1):
        if not fields or not "".join(fields).strip():
            continue
        where = f"{meta} line {number}"
        if len(fields) not in (2, 3):
            problems.append(f"{where}: {len(fields)} field(s). Fix: write `id|text` or `id|text|normalized text`.")
            continue
        ident = fields[0].strip()
        transcript = (fields[2] if len(fields) == 3 and fields[2].strip() else fields[1]).strip()
        audio = folder / "wavs" / f"{ident}.wav"
        if not ident or not transcript:
            problems.append(f"{where}: empty id or text. Fix: give both.")
            continue
        if not audio.is_file():
            problems.append(f"{where}: {audio} not found. Fix: put the clip in wavs/ or remove the line.")
            continue
        rows.append(
            {"id": ident, "audio": audio, "text": transcript, "speaker": speaker or folder.name, "language": language}
        )
    if not rows and not problems:
        problems.append(f"{meta} has no lines. Fix: write one `id|text` line per clip in wavs/.")
    _raise_problems(folder, problems)
    return rows


def convert_source(
    folder: str | Path,
    *,
    manifest_out: str | Path | None = None,
    overwrite: bool = False,
    language: str | None = None,
    speaker: str | None = None,
    missing_text_ok: bool = False,
) -> ConvertResult:
    """A folder in any layout we read -> a manifest (default `<folder>/../<folder name>.jsonl`).
    `missing_text_ok` (prepare --transcribe): audio without a transcript is kept, without text."""
    folder = Path(os.path.abspath(folder))
    if not is_ljspeech(folder):
        return convert_folder(
            folder, manifest_out=manifest_out, overwrite=overwrite, language=language, missing_text_ok=missing_text_ok
        )
    out = Path(os.path.abspath(manifest_out)) if manifest_out else folder.parent / f"{folder.name}.jsonl"
    rows = ljspeech_rows(folder, speaker=speaker, language=language)
    return write_manifest_rows(rows, out, overwrite=overwrite, source=str(folder))


# ----------------------------------------------------------------------------- Hugging Face datasets
def _load_hf(path_or_name: str, split: str):
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(
            "reading a Hugging Face dataset needs the `datasets` package. Fix: pip install 'higgs-tune[hf]'."
        ) from None
    path = Path(path_or_name).expanduser()
    if path.exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(
                f"{path} is not a dataset written by `save_to_disk` ({e}). Fix: pass that folder, or a dataset id "
                "from the Hub cache."
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path} has no split {split!r} (it has {', '.join(ds)}). Fix: pass --split NAME.")
            ds = ds[split]
        return ds
    check_hub_source(path_or_name, what="dataset", option="--hf-dataset", repo_type="dataset")
    # a cached id is read from its snapshot folder (the data files as downloaded): no network at all
    snapshot = cached_snapshot(path_or_name, "dataset")
    try:
        return datasets.load_dataset(str(snapshot) if snapshot else path_or_name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise DataError(f"cannot load the dataset {path_or_name!r} split {split!r}: {e}") from None


def convert_hf_dataset(
    path_or_name: str | Path,
    manifest_out: str | Path,
    *,
    split: str = "train",
    audio_column: str = "audio",
    text_column: str | None = "text",
    speaker_column: str | None = None,
    language_column: str | None = None,
    id_column: str | None = None,
    speaker: str | None = None,
    language: str | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """A `datasets` dataset -> audio files beside `manifest_out` + the manifest (see the module docstring).

    text_column None: rows without text (for `prepare --transcribe`). speaker_column None: one
    speaker, `speaker` or the dataset's name."""
    from datasets import Audio

    name = str(path_or_name)
    ds = _load_hf(name, split)
    columns = set(ds.column_names)
    wanted = {"--audio-column": audio_column, "--text-column": text_column, "--speaker-column": speaker_column}
    wanted |= {"--language-column": language_column, "--id-column": id_column}
    missing = [f"{opt} {col!r}" for opt, col in wanted.items() if col is not None and col not in columns]
    if missing:
        raise DataError(
            f"the dataset {name} (split {split}) has no column {', '.join(missing)}; its columns: "
            f"{', '.join(sorted(columns))}. Fix: name the right columns."
        )
    ds = ds.cast_column(audio_column, Audio(decode=False))  # bytes/path as stored: no decoding backend needed
    out = Path(os.path.abspath(manifest_out))
    audio_dir = out.parent / f"{out.stem}_audio"
    default_speaker = speaker or _SAFE.sub("_", Path(name.rstrip("/")).name)
    problems: list[str] = []
    rows, files = [], {}
    for i, ex in enumerate(ds):
        ident = str(ex[id_column]) if id_column else f"{split}_{i:06d}"
        audio = ex[audio_column] or {}
        data, src = audio.get("bytes"), audio.get("path")
        suffix = Path(src).suffix if src and Path(src).suffix else ".wav"
        target = audio_dir / (_SAFE.sub("_", ident) + suffix)
        if data is None and src and Path(src).is_file():
            data = Path(src).read_bytes()
        if data is None:
            problems.append(f"{name} {split} row {i} (id {ident}): no audio bytes and no readable file {src!r}.")
            continue
        text = ex[text_column] if text_column else None
        rows.append(
            {
                "id": ident,
                "audio": target,
                "text": text if text is None else str(text),
                "speaker": str(ex[speaker_column]) if speaker_column else default_speaker,
                "language": (str(ex[language_column]) if language_column else None) or language,
            }
        )
        files[target] = data
    _raise_problems(f"{name} (split {split})", problems)
    # the manifest first: an existing different one is refused before any audio file is touched
    result = write_manifest_rows(rows, out, overwrite=overwrite, source=f"{name} (split {split})")
    for target, data in files.items():
        if not (target.is_file() and target.read_bytes() == data):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
    return result
