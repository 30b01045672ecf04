"""The training manifest: JSON Lines, one clip per line, validated as a whole before any encoding.

Row format (paths relative to the manifest's folder, the "dataset root"):

    {"audio": "audio/a_001.flac", "text": "Hello there.", "speaker": "a", "language": "en",
     "id": "a_001", "scene": "A quiet room.",
     "ref_audio": "audio/a_000.flac", "ref_text": "Transcript of the reference."}

Required: audio, text, speaker. Optional: language (a row without one gets the caller's
`default_language`, else UNKNOWN_LANGUAGE, recorded as such), id (default: the audio file's stem;
must be unique), scene, and an explicit voice prompt ref_audio + ref_text (both or neither).
Any other key is an error (a misspelt "transcript" must not silently drop the text).

`validate_manifest` collects every problem of every row (file, line, field, fix) in one pass:
the manifest's own format first (UTF-8, JSON, keys, types, empty text, duplicate ids, paths
that leave the dataset root), then each distinct audio file is decoded once and checked
(`higgs_tune.data.audio.inspect_audio`). `Validation.raise_if_invalid` turns the result
into one `ManifestError`; with skip-invalid the caller keeps `rows` and writes `rejects`.

`convert_folder` turns a folder of `<name>.wav` + `<name>.txt` pairs (or a community-trainer
`metadata.json`) into such a manifest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from higgs_tune.data.audio import DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS, AudioInfo, inspect_audio
from higgs_tune.errors import DataError
from higgs_tune.progress import Progress, as_progress
from higgs_tune.runfs import atomic_write_bytes

REQUIRED_KEYS = ("audio", "text", "speaker")
OPTIONAL_KEYS = ("language", "id", "scene", "ref_audio", "ref_text", "text_source")
# The language recorded for a row that names none (ISO 639-2 "undetermined"); `inspect` lists it as such.
UNKNOWN_LANGUAGE = "und"
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
# Names other tools use for our keys: an unknown key that is one of these gets a precise fix.
KEY_ALIASES = {
    "audio_file": "audio",
    "audio_path": "audio",
    "path": "audio",
    "wav": "audio",
    "file": "audio",
    "transcript": "text",
    "transcription": "text",
    "sentence": "text",
    "normalized_text": "text",
    "speaker_id": "speaker",
    "spk": "speaker",
    "speaker_name": "speaker",
    "lang": "language",
    "locale": "language",
    "scene_desc": "scene",
    "scene_description": "scene",
    "ref_audio_path": "ref_audio",
    "reference_audio": "ref_audio",
    "prompt_audio": "ref_audio",
    "ref_transcript": "ref_text",
    "reference_text": "ref_text",
    "prompt_text": "ref_text",
    "utt_id": "id",
    "uid": "id",
    "name": "id",
}
# Shortest clip length a user may allow (the codec itself works from ~5 ms).
MIN_CODEC_SECONDS = 0.02
# Problems shown in one error message; the rest are counted (all of them are in `.problems`).
MAX_LISTED_PROBLEMS = 200
SKIP_HINT = "pass --skip-invalid to prepare the valid rows and list the rejected ones in rejects.jsonl"


@dataclass(frozen=True)
class Problem:
    """One problem of one row (row = 1-based line number; None for the file as a whole)."""

    row: int | None
    field: str
    message: str
    fix: str
    id: str | None = None

    def format(self, manifest_name: str) -> str:
        where = f"{manifest_name}:{self.row}" if self.row is not None else manifest_name
        who = f" (id {self.id!r})" if self.id else ""
        return f"{where}{who} {self.field}: {self.message}. Fix: {self.fix}."


class ManifestError(DataError):
    """A manifest with problems. `problems` holds every one; the message lists them with the fix."""

    def __init__(
        self,
        manifest: Path,
        problems: list[Problem],
        cache_dir: Path | None = None,
        skippable: bool = True,
        skip_hint: str = SKIP_HINT,
    ):
        self.manifest = manifest
        self.problems = list(problems)
        rows = {p.row for p in problems if p.row is not None}
        head = f"{manifest}: {len(problems)} problem(s) in {len(rows)} row(s)"
        if cache_dir is not None:
            head += f"; nothing was written to {cache_dir}"
        lines = [f"  - {p.format(manifest.name)}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            by_field: dict[str, int] = defaultdict(int)
            for p in self.problems[MAX_LISTED_PROBLEMS:]:
                by_field[p.field] += 1
            counts = ", ".join(f"{n} {f}" for f, n in sorted(by_field.items()))
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more ({counts})")
        tail = f"Fix the rows above, or {skip_hint}." if skippable and rows else "Fix the problems above."
        super().__init__("\n".join([head + ":", *lines, tail]))


@dataclass(frozen=True)
class ManifestRow:
    """A valid row. `audio`/`ref_audio` as written; `*_path` resolved against the dataset root."""

    row: int
    id: str
    audio: str
    audio_path: Path
    text: str
    speaker: str
    language: str
    scene: str | None = None
    ref_audio: str | None = None
    ref_audio_path: Path | None = None
    ref_text: str | None = None
    text_source: str | None = None  # "asr:<model>" when `prepare --transcribe` wrote the text


@dataclass
class _Draft:
    """A row while it is being checked: fields may be missing; problems accumulate."""

    row: int
    values: dict = field(default_factory=dict)
    audio_path: Path | None = None
    ref_audio_path: Path | None = None
    id: str | None = None
    problems: list[Problem] = field(default_factory=list)

    def add(self, field_name: str, message: str, fix: str) -> None:
        self.problems.append(Problem(self.row, field_name, message, fix, self.id))


@dataclass
class Validation:
    """The result of `validate_manifest`."""

    manifest: Path
    root: Path
    rows: list[ManifestRow]  # valid rows, manifest order
    rejects: list[dict]  # one per invalid row: row, id, audio, reason
    problems: list[Problem]  # every problem, by row
    audio: dict[Path, AudioInfo]  # decoded files (targets and references), by resolved path
    fatal: list[Problem]  # problems of the file as a whole (no row to skip)
    warnings: list[Problem] = field(default_factory=list)  # usable but suspicious (clipping): reported, kept

    def raise_if_invalid(
        self, cache_dir: Path | None = None, skip_invalid: bool = False, skip_hint: str = SKIP_HINT
    ) -> None:
        """Strict: any problem raises. Skip-invalid: only file-level problems or no valid row raise.
        `skip_hint`: how the command that reads the manifest skips bad rows (its own flag)."""
        if self.fatal:
            raise ManifestError(self.manifest, self.fatal + self.problems, cache_dir, skippable=False)
        if self.problems and not skip_invalid:
            raise ManifestError(self.manifest, self.problems, cache_dir, skip_hint=skip_hint)
        if not self.rows:
            raise ManifestError(
                self.manifest,
                self.problems + [Problem(None, "rows", "no valid row left to prepare", "fix the rows listed above")],
                cache_dir,
                skippable=False,
            )


def _resolve(root: Path, written: str) -> tuple[Path, bool]:
    """Resolve a manifest path against the root, lexically -> (path, inside_root).

    Lexical (normpath, not resolve()): '../x.wav' leaves the root, while a symlink the user
    placed inside the dataset folder is the user's deliberate choice and stays allowed.
    """
    full = Path(os.path.normpath(root / written))
    return full, full == root or root in full.parents


def visible_text(text: str) -> str:
    """`text` without invisible format characters (Unicode category Cf: bidi marks such as
    U+200F, zero-width spaces and joiners) and surrounding whitespace: empty when nothing is
    left to speak."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def _check_str(d: _Draft, key: str, *, required: bool, non_empty: bool = True) -> str | None:
    if key not in d.values or (not required and d.values[key] is None):
        return None
    value = d.values[key]
    if not isinstance(value, str):
        d.add(
            key,
            f"must be a string, got {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:60]}",
            f'write it as a JSON string, e.g. "{key}": "..."',
        )
        return None
    if non_empty and not visible_text(value):
        what = (
            "empty" if not value else ("empty or whitespace-only" if not value.strip() else "only invisible characters")
        )
        d.add(
            key,
            f"is {what}",
            "give the transcript of the clip"
            if key in ("text", "ref_text")
            else f"give a non-empty {key}" + (" or remove the key" if not required else ""),
        )
        return None
    return value


def _check_path(d: _Draft, key: str, root: Path, allow_outside_root: bool) -> Path | None:
    written = _check_str(d, key, required=key == "audio")
    if written is None:
        return None
    full, inside = _resolve(root, written)
    if not inside and not allow_outside_root:
        d.add(
            key,
            f"{written!r} is outside the dataset root {root}",
            "move the file under the manifest's folder and write the path relative to it, or pass --allow-outside-root",
        )
        return None
    return full


def _parse_rows(manifest: Path, root: Path, allow_outside_root: bool) -> tuple[list[_Draft], list[Problem]]:
    """Format checks that need no audio: encoding, JSON, keys, types, paths, refs, ids."""
    try:
        data = manifest.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"manifest not found: {manifest}. Fix: give the path of a JSON Lines file (one clip per line)."
        ) from None
    except IsADirectoryError:
        raise DataError(
            f"{manifest} is a folder. Fix: give the manifest file (e.g. {manifest / 'manifest.jsonl'}), or use "
            f"--from-folder {manifest}."
        ) from None
    except PermissionError:
        raise DataError(f"cannot read {manifest} (permission denied). Fix: make it readable.") from None

    drafts: list[_Draft] = []
    fatal: list[Problem] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) >= 4 and data.count(b"\x00") * 4 >= len(data)):
        fatal.append(
            Problem(
                None,
                "file",
                "is UTF-16 encoded (a byte order mark or NUL bytes between the characters), not UTF-8",
                f"save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 {manifest.name} > fixed.jsonl",
            )
        )
        return drafts, fatal
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark some editors add
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines (e.g. the trailing newline) are not rows
        d = _Draft(row=number)
        drafts.append(d)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            d.add(
                "line",
                f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})",
                "save the manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
            )
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            d.add(
                "line",
                f"is not valid JSON ({e.msg} at column {e.colno})",
                'write one JSON object per line, e.g. {"audio": "a.wav", "text": "...", "speaker": "s", '
                '"language": "en"}',
            )
            continue
        if not isinstance(obj, dict):
            d.add("line", f"is a JSON {type(obj).__name__}, not an object", "write one JSON object per line")
            continue
        d.values = obj
        if isinstance(obj.get("id"), str) and obj["id"].strip():
            d.id = obj["id"]

        for key in obj:
            if key in KNOWN_KEYS:
                continue
            target = KEY_ALIASES.get(key) or next(
                iter(difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.75)), None
            )
            if target and target in obj:
                fix = f"remove it (the row already has {target!r})"  # renaming would give the row the key twice
            else:
                fix = f"rename it to {target!r}" if target else f"remove it (known keys: {', '.join(KNOWN_KEYS)})"
            d.add(key, "unknown key", fix)
        for key in REQUIRED_KEYS:
            if key not in obj:
                d.add(
                    key,
                    "missing required key",
                    f'add "{key}"' + (" (path relative to the manifest's folder)" if key == "audio" else ""),
                )

        d.audio_path = _check_path(d, "audio", root, allow_outside_root)
        for key in ("text", "speaker"):
            _check_str(d, key, required=True)
        _check_str(d, "language", required=False)
        _check_str(d, "scene", required=False)
        _check_str(d, "text_source", required=False)
        if obj.get("id") is not None:
            _check_str(d, "id", required=False)
        elif d.audio_path is not None:
            d.id = d.audio_path.stem  # "id" absent or null: the audio file's name

        has_ref_audio = obj.get("ref_audio") is not None
        has_ref_text = obj.get("ref_text") is not None
        d.ref_audio_path = _check_path(d, "ref_audio", root, allow_outside_root)
        _check_str(d, "ref_text", required=False)
        if has_ref_audio and not has_ref_text:
            d.add(
                "ref_text",
                "missing: ref_audio is set but ref_text is not",
                'add the transcript of ref_audio as "ref_text", or remove ref_audio',
            )
        elif has_ref_text and not has_ref_audio:
            d.add(
                "ref_audio",
                "missing: ref_text is set but ref_audio is not",
                'add the reference clip as "ref_audio", or remove ref_text',
            )
        if d.audio_path is not None and d.audio_path == d.ref_audio_path:
            d.add(
                "ref_audio",
                f"is the target clip itself ({obj['ref_audio']!r})",
                "use another clip of the same speaker as the reference, or remove ref_audio and ref_text",
            )
            d.ref_audio_path = None

    if not drafts:
        fatal.append(
            Problem(None, "file", "has no rows", "write one JSON object per line (audio, text, speaker[, language])")
        )

    by_id: dict[str, list[_Draft]] = defaultdict(list)
    for d in drafts:
        if d.id is not None:
            by_id[d.id].append(d)
    for ident, same in by_id.items():
        if len(same) > 1:
            for d in same:
                others = ", ".join(str(o.row) for o in same if o is not d)
                d.add(
                    "id",
                    f"duplicate id {ident!r} (also on line {others})",
                    'give every row a unique "id" (default is the audio file\'s name without extension)',
                )
    return drafts, fatal


def validate_manifest(
    manifest: str | Path,
    *,
    target_rate: int = 24000,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    allow_outside_root: bool = False,
    progress: Progress | bool = False,
    default_language: str | None = None,
) -> Validation:
    """Check every row and every audio file; never raises for row problems (see Validation).

    A row without a language gets `default_language`, else UNKNOWN_LANGUAGE."""
    manifest = Path(os.path.abspath(manifest))
    root = manifest.parent
    if not MIN_CODEC_SECONDS <= min_seconds < max_seconds:
        raise DataError(
            f"clip length bounds must satisfy {MIN_CODEC_SECONDS:g} <= min_seconds < max_seconds (the codec needs "
            f"a few milliseconds of audio), got {min_seconds:g} and {max_seconds:g}. Fix: change --min-seconds / "
            "--max-seconds."
        )
    drafts, fatal = _parse_rows(manifest, root, allow_outside_root)

    # Decode each distinct file once (a reference is often another row's target).
    paths = list(dict.fromkeys(p for d in drafts for p in (d.audio_path, d.ref_audio_path) if p is not None))
    infos: dict[Path, AudioInfo] = {}
    audio_problems: dict[Path, list[tuple[str, str]]] = {}
    progress = as_progress(progress)
    progress.start(len(paths), "checking audio", "files")
    for n, path in enumerate(paths, start=1):
        info, problems = inspect_audio(path, target_rate=target_rate, min_seconds=min_seconds, max_seconds=max_seconds)
        if info is not None:
            infos[path] = info
        audio_problems[path] = problems
        progress.update(n)
    progress.close()

    rows: list[ManifestRow] = []
    rejects: list[dict] = []
    for d in drafts:
        for key, path in (("audio", d.audio_path), ("ref_audio", d.ref_audio_path)):
            if path is None:
                continue
            for message, fix in audio_problems[path]:
                looked = f" (looked for {path})" if message == "file not found" else ""
                d.add(key, f"{d.values[key]!r} {message}{looked}", fix)
        if (
            d.audio_path in infos
            and d.ref_audio_path in infos
            and infos[d.audio_path].sha256 == infos[d.ref_audio_path].sha256
        ):
            d.add(
                "ref_audio",
                f"{d.values['ref_audio']!r} has the same audio content as the target {d.values['audio']!r}",
                "use a different recording of the same speaker as the reference, or remove ref_audio and ref_text",
            )
        # The id is known only after the row's checks (default: audio stem); stamp it on each problem.
        d.problems = [dataclasses.replace(p, id=d.id) for p in d.problems]
        if d.problems:
            rejects.append(
                {
                    "row": d.row,
                    "id": d.id,
                    "audio": d.values.get("audio") if isinstance(d.values.get("audio"), str) else None,
                    "reason": "; ".join(f"{p.field}: {p.message}" for p in d.problems),
                }
            )
            continue
        v = d.values
        rows.append(
            ManifestRow(
                row=d.row,
                id=d.id,
                audio=v["audio"],
                audio_path=d.audio_path,
                text=v["text"],
                speaker=v["speaker"],
                language=v.get("language") or default_language or UNKNOWN_LANGUAGE,
                scene=v.get("scene"),
                ref_audio=v.get("ref_audio"),
                ref_audio_path=d.ref_audio_path,
                ref_text=v.get("ref_text"),
                text_source=v.get("text_source"),
            )
        )
    problems = [p for d in drafts for p in d.problems]
    warnings = [
        Problem(d.row, key, f"{d.values[key]!r} {message}", fix, d.id)
        for d in drafts
        if not d.problems
        for key, path in (("audio", d.audio_path), ("ref_audio", d.ref_audio_path))
        if path in infos
        for message, fix in infos[path].warnings
    ]
    return Validation(
        manifest=manifest,
        root=root,
        rows=rows,
        rejects=rejects,
        problems=problems,
        audio=infos,
        fatal=fatal,
        warnings=warnings,
    )


# ---------------------------------------------------------------------------- folder -> manifest

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class ConvertResult:
    manifest: Path
    rows: int
    ignored_keys: list[str]  # metadata.json keys that have no manifest equivalent
    outside_root: bool  # some audio lies outside the manifest's folder: prepare needs --allow-outside-root
    unchanged: bool = False  # the manifest already held exactly these rows: nothing was written


def _read_transcript(path: Path, problems: list[str], missing_ok: bool = False) -> str | None:
    """The transcript's text; None (and a problem) when unreadable. `missing_ok`: a missing file
    is not a problem (prepare --transcribe fills the text), the row is kept with text None."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        if missing_ok:
            return None
        problems.append(
            f'{path}: transcript file not found. Fix: add it, or put the text into metadata.json as "text".'
        )
    except UnicodeDecodeError:
        problems.append(f"{path}: not valid UTF-8. Fix: save the transcript as UTF-8.")
    return None


def _from_metadata(
    folder: Path, meta_path: Path, language: str | None, problems: list[str], missing_text_ok: bool = False
) -> tuple[list[dict], list[str]]:
    """Rows from a community-trainer metadata.json: a list of samples, or {"samples": [...]}."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{meta_path}: not valid UTF-8 JSON ({e}). Fix: repair the file, or remove it to convert the "
            "<name>.wav + <name>.txt pairs."
        ) from None
    samples = meta.get("samples") if isinstance(meta, dict) else meta
    if not isinstance(samples, list):
        raise DataError(
            f'{meta_path}: expected a list of samples or an object with a "samples" list, got '
            f"{type(meta).__name__}. Fix: use one of these two layouts."
        )
    used = {
        "audio_file",
        "audio",
        "text",
        "transcript",
        "transcript_file",
        "speaker",
        "speaker_id",
        "language",
        "scene",
        "id",
        "ref_audio",
        "ref_text",
    }
    ignored: set[str] = set()
    rows = []
    for i, s in enumerate(samples, start=1):
        where = f"{meta_path} sample {i}"
        if not isinstance(s, dict):
            problems.append(f"{where}: not an object. Fix: each sample must be a JSON object.")
            continue
        ignored.update(k for k in s if k not in used)
        audio = s.get("audio_file", s.get("audio"))
        if not isinstance(audio, str) or not audio:
            problems.append(f'{where}: no "audio_file"/"audio". Fix: name the audio file (relative to {folder}).')
            continue
        audio_path = Path(os.path.normpath(folder / audio))
        text = s.get("text", s.get("transcript"))
        if text is None:
            tfile = s.get("transcript_file")
            text = _read_transcript(
                folder / tfile if tfile else audio_path.with_suffix(".txt"), problems, missing_ok=missing_text_ok
            )
        if text is not None and not isinstance(text, str):
            problems.append(
                f'{where}: "text"/"transcript" is {type(text).__name__} {json.dumps(text)[:40]}, not a string. '
                "Fix: write the transcript as a JSON string."
            )
            continue
        speaker = s.get("speaker", s.get("speaker_id"))
        # numeric speaker ids (LibriTTS-style 1034) are names too
        speaker = str(speaker) if isinstance(speaker, int) and not isinstance(speaker, bool) else speaker or folder.name
        row = {
            "id": s.get("id") or audio_path.stem,
            "audio": audio_path,
            "text": text,
            "speaker": speaker,
            "language": s.get("language") or language,
        }
        for key in ("scene", "ref_audio", "ref_text"):
            if s.get(key) is not None:
                row[key] = Path(os.path.normpath(folder / s[key])) if key == "ref_audio" else s[key]
        if text is not None or missing_text_ok:
            rows.append(row | {"_where": where})
    return rows, sorted(ignored)


def _from_pairs(folder: Path, language: str | None, problems: list[str], missing_text_ok: bool = False) -> list[dict]:
    """Rows from <name>.<audio ext> + <name>.txt pairs (any depth); speaker = the file's folder name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    audio = [p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS]
    stems = {p.with_suffix("") for p in audio}
    for t in files:
        if t.suffix.lower() == ".txt" and t.with_suffix("") not in stems:
            problems.append(
                f"{t}: transcript without an audio file. Fix: add {t.stem}.wav next to it, or move the .txt out of "
                f"{folder}."
            )
    counts: dict[str, int] = defaultdict(int)
    for p in audio:
        counts[p.stem] += 1
    rows = []
    for p in audio:
        text = _read_transcript(p.with_suffix(".txt"), problems, missing_ok=missing_text_ok)
        if text is None and not missing_text_ok:
            continue
        ident = p.stem if counts[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        rows.append(
            {"id": ident, "audio": p, "text": text, "speaker": p.parent.name, "language": language, "_where": str(p)}
        )
    if not audio:
        problems.append(
            f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no metadata.json. Fix: point "
            "--from-folder at the dataset folder."
        )
    return rows


def convert_folder(
    folder: str | Path,
    *,
    manifest_out: str | Path | None = None,
    overwrite: bool = False,
    language: str | None = None,
    missing_text_ok: bool = False,
) -> ConvertResult:
    """Write a manifest for `folder`; default location `<folder>/../<folder name>.jsonl`.

    With `metadata.json` in the folder its samples are used (audio_file/audio,
    text/transcript/transcript_file/<stem>.txt, speaker/speaker_id, language, scene, id);
    otherwise every audio file with a same-name .txt, speaker = the folder it sits in.
    `language` fills rows that have none. `missing_text_ok` (prepare --transcribe): an audio file
    without a transcript becomes a row without text, for the ASR to fill. All problems are raised at once. An existing
    manifest with exactly these rows is kept (`unchanged`); a different one is replaced
    only with overwrite.
    """
    folder = Path(os.path.abspath(folder))
    if not folder.is_dir():
        raise DataError(
            f"--from-folder {folder}: not a folder. Fix: give the folder holding the audio and transcripts."
        )
    out = Path(os.path.abspath(manifest_out)) if manifest_out else folder.parent / f"{folder.name}.jsonl"
    if out.exists() and not out.is_file():
        raise DataError(f"{out} is not a file. Fix: pass --manifest-out PATH.jsonl to write the manifest elsewhere.")

    problems: list[str] = []
    meta_path = folder / "metadata.json"
    if meta_path.is_file():
        rows, ignored = _from_metadata(folder, meta_path, language, problems, missing_text_ok)
    else:
        rows, ignored = _from_pairs(folder, language, problems, missing_text_ok), []
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"cannot convert {folder}: {len(problems)} problem(s); nothing was written:\n{listed}{more}")

    return write_manifest_rows(rows, out, overwrite=overwrite, source=str(folder), ignored_keys=ignored)


MANIFEST_ROW_KEYS = ("id", "audio", "text", "speaker", "language", "scene", "ref_audio", "ref_text", "text_source")


def write_manifest_rows(
    rows: list[dict], out: Path, *, overwrite: bool, source: str, ignored_keys: list[str] = ()
) -> ConvertResult:
    """Write converted rows (audio paths as Path, made relative to the manifest) to `out`.

    An existing identical manifest is reused (`unchanged`); a different one is replaced only with
    overwrite. The one writer of `convert_folder` and of the other sources (data/sources.py)."""
    ignored = list(ignored_keys)
    folder = source
    base = out.parent
    outside = False
    lines = []
    for row in rows:
        record = {}
        for key in MANIFEST_ROW_KEYS:
            if row.get(key) is None:  # e.g. no language: the manifest records none (prepare: UNKNOWN_LANGUAGE)
                continue
            value = row[key]
            if isinstance(value, Path):
                value = Path(os.path.relpath(value, base)).as_posix()
                outside = outside or value.startswith("../")
            record[key] = value
        lines.append(json.dumps(record, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    result = ConvertResult(manifest=out, rows=len(lines), ignored_keys=ignored, outside_root=outside)
    if out.exists():
        # Re-running the same `prepare --from-folder ... --out CACHE` must stay incremental:
        # an unchanged manifest is reused (a changed one needs --overwrite, which rebuilds CACHE too).
        if out.read_bytes() == data:
            return dataclasses.replace(result, unchanged=True)
        if not overwrite:
            raise DataError(
                f"{out} already exists and differs from what {folder} converts to now. Fix: delete it (the code "
                "cache stays incremental), pass --overwrite to replace it (with --model/--out this also rebuilds "
                "the cache from scratch), or pass --manifest-out to write elsewhere."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return result
