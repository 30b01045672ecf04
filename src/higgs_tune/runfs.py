"""The run folder on disk: the names higgs-tune writes there, and the one way it writes files.

Bottom layer: imports only the standard library and `higgs_tune.errors`.

Names. Everything higgs-tune puts into a run folder (`checkpoint.output_dir`) is named here,
so the writer (recipe, logger, checkpoint manager, evaluate, report) and the readers
(`--overwrite`, `--resume`, the report) cannot drift apart. `RUN_FILES` / `RUN_DIRS` /
`is_run_entry` say what counts as ours: `--overwrite` removes only those.

Writing. `atomic_write_bytes` (and its text/JSON forms) is the single implementation of a
crash-safe file write: the bytes go to a temporary file in the same folder
(`.tmp-<name>-<pid>`), the file is fsync'd, renamed over the target, and the folder is
fsync'd so the rename itself survives a power cut. A reader sees the old file or the whole
new one, never part of either; a failed write leaves the old file and no temporary file.
`publish_dir` does the same for a finished folder (a checkpoint, an export), `discard_dir`
removes a folder so that it disappears whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- run-folder names

CONFIG_FILE = "config.yaml"  # the resolved config (the run's, and every checkpoint's)
# First line of every config.yaml we write: marks the file (and its folder) as written by higgs-tune.
CONFIG_HEADER = "# higgs-tune resolved config: written by higgs-tune; resume compares it with the new config.\n"
METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train.log"
PARAM_REPORT_FILE = "param_report.txt"
DATA_REPORT_FILE = "data_report.txt"
REPORT_FILE = "report.html"
REPORT_JSON_FILE = "report.json"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "checkpoints.json"  # index of the checkpoints: latest, best, final

SAMPLES_DIR = "samples"  # samples/step-<N>/ during training
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
LOGS_DIR = "logs"
EVAL_DIR = "eval"  # where `higgs-tune evaluate` writes for a run

# checkpoints: checkpoint-<step>/ and final/, each holding these files besides the weights
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_NAME = "final"
MANIFEST_FILE = "manifest.json"
TRAINING_STATE_FILE = "training_state.pt"

# evaluation results (in EVAL_DIR for a run, or any --out folder)
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
WAVS_DIR = "wavs"

# in-progress and on-the-way-out entries: .tmp-<name>-<pid>, .old-<name>-<pid>
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"
PROBE_PREFIX = ".higgs-tune-probe-"  # the write probe of the output-dir check

# Top-level names higgs-tune writes into a run folder (files and folders). `--overwrite` removes only these.
RUN_FILES = frozenset(
    {
        CONFIG_FILE,
        INDEX_FILE,
        METRICS_FILE,
        TRAIN_LOG_FILE,
        PARAM_REPORT_FILE,
        DATA_REPORT_FILE,
        REPORT_FILE,
        REPORT_JSON_FILE,
        SUMMARY_FILE,
    }
)
RUN_DIRS = frozenset({FINAL_NAME, SAMPLES_DIR, TENSORBOARD_DIR, WANDB_DIR, LOGS_DIR, EVAL_DIR})
RUN_PATTERN = re.compile(
    rf"^(?:{re.escape(CHECKPOINT_PREFIX)}\d+|{re.escape(TMP_PREFIX)}.+|{re.escape(TRASH_PREFIX)}.+|{re.escape(PROBE_PREFIX)}\d+)$"
)
CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
LEFTOVER_RE = re.compile(
    rf"^(?:{re.escape(TMP_PREFIX)}|{re.escape(TRASH_PREFIX)}).+-(\d+)$"
)  # group 1: the writer's pid

_HASH_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` folder name; None for any other name."""
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def temp_path(path: Path) -> Path:
    """Where `path` is written before it gets its name: `.tmp-<name>-<pid>` in the same folder."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def trash_path(path: Path) -> Path:
    """Where `path` goes on its way out: `.old-<name>-<pid>` in the same folder."""
    path = Path(path)
    return path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")


# ---------------------------------------------------------------- durability


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames and creations in it durable)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then every folder, deepest first, `folder` last."""
    folder = Path(folder)
    below = list(folder.rglob("*"))
    for path in below:
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in below if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never part.

    Temporary file in the same folder, fsync'd, renamed over `path`, then the folder fsync'd.
    On any failure the old file is untouched and the temporary file is removed.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON (one trailing newline), written with `atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def publish_dir(tmp: Path, target: Path) -> None:
    """Give the finished, fsync'd folder `tmp` the name `target` in one rename.

    An existing `target` (an earlier export or final checkpoint, a damaged folder of an
    abandoned attempt) is moved aside to `.old-<name>-<pid>` first, because a rename cannot
    replace a non-empty folder, and removed only once `tmp` holds the name. If the rename
    fails the earlier folder is put back: a failed publish changes nothing. The caller removes
    `tmp` on failure.
    """
    tmp, target = Path(tmp), Path(target)
    old = trash_path(target)
    moved_aside = False
    try:
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            moved_aside = True
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        if moved_aside and not target.exists():
            os.replace(old, target)
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def discard_dir(path: Path) -> None:
    """Remove a folder so that it disappears whole: renamed to `.old-*` first (atomic), then deleted.

    A folder already named `.tmp-*` / `.old-*` is deleted in place. A crash mid-way leaves an
    `.old-*` folder that the next run removes, never a half-deleted checkpoint.
    """
    path = Path(path)
    trash = path if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)) else trash_path(path)
    if trash != path:
        os.replace(path, trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------- content


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), the unit of checkpoint.min_free_gb and `df -H`."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
