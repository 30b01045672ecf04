"""What `higgs-tune generate` reads from its command line and from a --batch file.

requests = read_batch_file("requests.jsonl")          # one FileRequest per row, all rows checked first
audio, text, ident = pick_speaker_reference("data/manifest.jsonl", "en_b")
default_output_name(1, "Hello there.")                 # out-01-hello-there.wav
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from higgs_tune.errors import DataError

REQUEST_KEYS = ("text", "ref_audio", "ref_text", "out", "id", "scene")


@dataclass
class FileRequest:
    """A request read from the command line or a JSON Lines batch file (paths resolved)."""

    text: str
    out: Path
    ref_audio: Path | None = None
    ref_text: str | None = None
    id: str = ""
    scene: str | None = None


def read_batch_file(path: str | Path) -> list[FileRequest]:
    """JSON Lines rows {text, ref_audio, ref_text, out [, id, scene]}; paths relative to the file's folder.

    Every row is checked first; one DataError lists all problems (file:line, field, fix).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"batch file {path} not found. Fix: give a JSON Lines file with one {{text, ref_audio, ref_text, out}} "
            "object per line."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"batch file {path} is not UTF-8 ({e.reason} at byte {e.start}). Fix: save it as UTF-8."
        ) from None
    root = path.parent
    problems: list[str] = []
    out: list[FileRequest] = []
    outs: dict[Path, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: a JSON {type(row).__name__}, expected an object")
            continue
        unknown = sorted(set(row) - set(REQUEST_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(REQUEST_KEYS)})")
        bad = [k for k in REQUEST_KEYS if k in row and row[k] is not None and not isinstance(row[k], str)]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} must be strings")
            continue
        for key in ("text", "out"):
            if not (row.get(key) or "").strip():
                problems.append(f"{where}: {key!r} is missing or empty")
        if bool(row.get("ref_audio")) != bool(row.get("ref_text")):
            problems.append(
                f"{where}: ref_audio and ref_text go together (voice cloning needs both; plain TTS neither)"
            )
        ref_audio = root / row["ref_audio"] if row.get("ref_audio") else None
        if ref_audio is not None and not ref_audio.is_file():
            problems.append(f"{where}: ref_audio {row['ref_audio']!r} not found (looked for {ref_audio})")
        if not (row.get("text") or "").strip() or not (row.get("out") or "").strip():
            continue
        target = root / row["out"]
        if target in outs:
            problems.append(f"{where}: out {row['out']!r} is also the output of line {outs[target]}")
        outs[target] = number
        out.append(
            FileRequest(
                text=row["text"],
                out=target,
                ref_audio=ref_audio,
                ref_text=row.get("ref_text"),
                id=row.get("id") or target.stem,
                scene=row.get("scene"),
            )
        )
    if not problems and not out:
        problems.append(f"{path}: no rows")
    if problems:
        raise DataError(
            f"batch file {path}: {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix the rows above."
        )
    return out


def pick_speaker_reference(manifest: str | Path, speaker: str) -> tuple[Path, str, str]:
    """A reference clip of `speaker` from a manifest: the row whose id sorts first -> (audio, text, id).

    Deterministic and independent of the manifest's order. Rows with their own ref_audio are
    candidates like any other (their `audio` is still a clip of that speaker).
    """
    manifest = Path(manifest)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"manifest {manifest} not found. Fix: give the JSON Lines manifest that lists the speaker's clips."
        ) from None
    candidates: list[tuple[str, Path, str]] = []
    speakers: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{manifest}:{number}: not valid JSON ({e.msg}). Fix: validate the manifest with `higgs-tune inspect`."
            ) from None
        if not isinstance(row, dict):
            continue
        speakers.add(str(row.get("speaker")))
        if row.get("speaker") == speaker and row.get("audio") and row.get("text"):
            ident = row.get("id") or Path(row["audio"]).stem
            candidates.append((ident, manifest.parent / row["audio"], row["text"]))
    if not candidates:
        known = ", ".join(sorted(speakers)[:20]) or "none"
        raise DataError(
            f"speaker {speaker!r} has no clip in {manifest} (speakers there: {known}). Fix: pick one of those speakers."
        )
    ident, audio, text = min(candidates)
    return audio, text, ident


def default_output_name(index: int, text: str) -> str:
    """`out-01-hello-world.wav` style names for texts given on the command line."""
    stem = "".join(c if c.isalnum() else "-" for c in text.lower())[:32].strip("-")
    stem = "-".join(filter(None, stem.split("-")))
    return f"out-{index:02d}{'-' + stem if stem else ''}.wav"
