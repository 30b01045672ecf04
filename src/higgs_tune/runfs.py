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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from higgs_tune.errors import OutputDirError

log = logging.getLogger("higgs_tune.runfs")

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
QUALITY_DIR = "quality"  # in-training quality evaluation: quality/step-<N>/ (wavs, results.json)
QUALITY_HISTORY_FILE = "history.json"  # quality/history.json: the base model's scores and every evaluation
BEST_NAME = "best"  # the checkpoint with the best checkpoint.best_metric (hard links into checkpoint-<N>)

# checkpoints: checkpoint-<step>/ and final/, each holding these files besides the weights
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_NAME = "final"
MANIFEST_FILE = "manifest.json"
TRAINING_STATE_FILE = "training_state.pt"
DCP_DIR = "dcp"  # an FSDP checkpoint's shards (torch.distributed.checkpoint), see train/checkpoint/sharded.py

# evaluation results (in EVAL_DIR for a run, or any --out folder)
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
WAVS_DIR = "wavs"

# in-progress and on-the-way-out entries: .tmp-<name>-<pid>, .old-<name>-<pid>
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"
PROBE_PREFIX = ".higgs-tune-probe-"  # the write probe of the output-dir check
LOCK_FILE = ".higgs-tune.lock"  # held (flock) by the process running in the folder; see RunLock

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
RUN_DIRS = frozenset({FINAL_NAME, SAMPLES_DIR, TENSORBOARD_DIR, WANDB_DIR, LOGS_DIR, EVAL_DIR, QUALITY_DIR, BEST_NAME})
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status):
    setting it to read it would leave a moment in which other threads create files with mode 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def files_follow_umask(folder: Path) -> None:
    """Give every file below `folder` the mode a new file gets here (0o666 & ~umask).

    safetensors writes its files owner-only (0600) whatever the umask: a checkpoint or an export
    on a shared file system would then be unreadable to the rest of the team. Best effort: a file
    whose mode cannot be changed (another owner, a file system without modes) keeps its mode, with
    a warning, and the save goes on."""
    mode = 0o666 & ~current_umask()
    kept = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
                path.chmod(mode)
        except OSError as e:
            kept.append(f"{path.name} ({e.strerror})")
    if kept:
        log.warning("could not give %s the mode %o: %s", folder, mode, describe_names(kept))


def publish_dir(tmp: Path, target: Path) -> None:
    """Give the finished, fsync'd folder `tmp` the name `target` in one rename (its files get
    the umask's mode first: `files_follow_umask`).

    An existing `target` (an earlier export or final checkpoint, a damaged folder of an
    abandoned attempt) is moved aside to `.old-<name>-<pid>` first, because a rename cannot
    replace a non-empty folder, and removed only once `tmp` holds the name. If the rename
    fails the earlier folder is put back: a failed publish changes nothing. The caller removes
    `tmp` on failure.
    """
    tmp, target = Path(tmp), Path(target)
    files_follow_umask(tmp)
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


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to write into; fsynced and published as `target`
    (`publish_dir`) when the block ends, removed if it raises: the folder is whole or absent."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# ---------------------------------------------------------------- ownership: what higgs-tune wrote

# The ownership manifest of a folder higgs-tune writes into (a run folder, a make-tiny folder):
# the top-level names it created there. `--overwrite` removes exactly these and refuses when
# anything else is in the folder; a file name alone never makes a file ours.
OWNED_FILE = ".higgs-tune-owned.json"
OWNED_FORMAT = "higgs-tune-owned"


def owned_names(folder: Path) -> set[str]:
    """The top-level names the ownership manifest of `folder` lists (empty without one)."""
    path = Path(folder) / OWNED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()  # unreadable: nothing is provably ours, so --overwrite refuses and names the files
    if not isinstance(data, dict) or data.get("format") != OWNED_FORMAT or not isinstance(data.get("entries"), list):
        return set()
    return {e for e in data["entries"] if isinstance(e, str) and e and "/" not in e and e not in (".", "..")}


def claim(folder: Path, *names: str) -> None:
    """Record that higgs-tune created the top-level entries `names` of `folder` (atomic update)."""
    folder = Path(folder)
    have = owned_names(folder)
    new = {n for n in names if n and n != OWNED_FILE} - have
    if not new and (folder / OWNED_FILE).is_file():
        return
    write_json_atomic(folder / OWNED_FILE, {"format": OWNED_FORMAT, "entries": sorted(have | new)})


def disown(folder: Path, *names: str) -> None:
    """Forget entries higgs-tune removed (a rotated checkpoint)."""
    folder = Path(folder)
    have = owned_names(folder)
    if have & set(names):
        write_json_atomic(folder / OWNED_FILE, {"format": OWNED_FORMAT, "entries": sorted(have - set(names))})


def split_owned(folder: Path, ignore: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    """(entries of `folder` higgs-tune created, names of the others), sorted.

    Ours: listed in the ownership manifest, plus the manifest itself, the lock file and the
    leftovers named with a pid (`.tmp-*`, `.old-*`, the write probe). `ignore`: names left out of both.
    """
    folder = Path(folder)
    listed = owned_names(folder)
    ours, foreign = [], []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in ignore:
            continue
        bookkeeping = name in (OWNED_FILE, LOCK_FILE) or name.startswith(PROBE_PREFIX)
        if name in listed or bookkeeping or LEFTOVER_RE.match(name):
            ours.append(entry)
        else:
            foreign.append(name)
    return ours, foreign


def remove_owned(folder: Path, entries: list[Path]) -> None:
    """Remove entries (folders renamed away first, so none is left half-deleted); the manifest last."""
    folder = Path(folder)
    manifest = folder / OWNED_FILE
    for entry in entries:
        if entry == manifest:
            continue
        if entry.is_dir() and not entry.is_symlink():
            discard_dir(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    if manifest in entries or manifest.exists():
        manifest.unlink(missing_ok=True)
    fsync_path(folder)


def describe_names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------- safe output names


def safe_file_stem(name: str) -> str:
    """A file name derived from an id that cannot leave its folder: path separators, NUL, `%`
    and a leading dot are percent-escaped (injective: two ids never share a name)."""
    out = []
    for i, c in enumerate(str(name)):
        if c in "%/\\\0" or (i == 0 and c == ".") or ord(c) < 32:
            out.append(f"%{ord(c):02X}")
        else:
            out.append(c)
    return "".join(out) or "%00"


def inside_folder(path: Path, folder: Path) -> bool:
    """True when `path` (resolved, symlinks followed) lies inside `folder`."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def path_in_folder(folder: Path, name: str) -> Path:
    """folder/<safe_file_stem(name)>: a path that is certain to lie inside `folder`."""
    path = Path(folder) / safe_file_stem(name)
    if path.parent != Path(folder):
        raise ValueError(f"{name!r} does not make a file name inside {folder}")
    return path


# ---------------------------------------------------------------- verifying a folder's manifest


# Weight files of a checkpoint (a PEFT adapter or full fine-tune weights): every one on disk must be listed.
WEIGHT_FILE_RE = re.compile(
    r"^(?:adapter_config\.json|config\.json|.*\.safetensors|.*\.bin|.*\.safetensors\.index\.json|.*\.distcp)$"
)


def verify_listed_files(folder: Path, files: Any, required: tuple[str, ...] = ()) -> list[str]:
    """Problems (one sentence each) of the files a manifest lists ({relpath: {bytes, sha256}}):
    missing, wrong size or hash, an entry without its fields, a path leaving the folder, a
    `required` file not listed, a weight file on disk that the manifest does not list (weights
    added or swapped after the save), no weights listed at all. Empty: every file verifies."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not isinstance(files, dict):
        return [f"{manifest} has no file list: the manifest is damaged."]
    problems = [f"{manifest} does not list {req}: not a resumable checkpoint." for req in required if req not in files]
    for rel, meta in files.items():
        path = folder / rel
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{manifest} lists {rel!r}, not a path inside the checkpoint: the manifest is damaged.")
            continue
        meta = meta if isinstance(meta, dict) else {}
        if not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            problems.append(f"{manifest}: the entry of {rel} lacks 'bytes' or 'sha256': the manifest is damaged.")
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing (listed in the manifest): the checkpoint is damaged.")
            continue
        if size != meta["bytes"]:
            problems.append(
                f"{path} has {size} bytes, the manifest says {meta['bytes']}: the file is truncated or was changed."
            )
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest: the file is corrupted or was changed.")
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    for rel in on_disk:
        if WEIGHT_FILE_RE.match(Path(rel).name) and rel not in files:
            problems.append(
                f"{folder / rel} is not listed in {manifest}: weights added or replaced after the save, "
                "which the checkpoint cannot vouch for."
            )
    if not any(isinstance(rel, str) and Path(rel).suffix in (".safetensors", ".bin", ".distcp") for rel in files):
        problems.append(
            f"{manifest} lists no weights file (*.safetensors, or *.distcp shards): the checkpoint is incomplete."
        )
    return problems


# ---------------------------------------------------------------- the run-folder lock


class RunLock:
    """An exclusive lock on a run folder, held for the whole run: `RUN_FOLDER/.higgs-tune.lock`.

    `fcntl.flock` on the open file: the OS releases it when the process ends, however it ends
    (a crash or SIGKILL included), so a lock is never stuck. The file holds who took it (pid,
    host, start time, command) so that a second run can say who holds it. A lock file left by
    a dead process (its flock is free) is reported and taken over. One process re-locking a
    folder it already holds (a run that raised, then a retry in the same notebook) takes its
    own lock back. `release()` removes the file.
    """

    _held: dict[str, RunLock] = {}  # resolved folder -> the lock this process holds

    def __init__(self, folder: Path, fd: int):
        self.folder, self.fd = Path(folder), fd
        self.path = self.folder / LOCK_FILE

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        folder = Path(folder)
        key = str(folder.resolve())
        if key in cls._held:
            return cls._held[key]
        path = folder / LOCK_FILE
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirError(
                    f"{folder} is in use by another higgs-tune run ({_describe_holder(holder)}; lock file {path}). "
                    "Two runs in one folder would overwrite each other's checkpoints and metrics: wait for it to end, "
                    "stop it, or choose another checkpoint.output_dir."
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the file may have been removed (released) between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _read_holder(fd)
            if stale:
                log.warning(
                    "run lock: %s was left by %s, which no longer holds it (the process ended without releasing it, "
                    "e.g. killed); taking it over",
                    path,
                    _describe_holder(stale),
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:300],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
            lock = cls(folder, fd)
            cls._held[key] = lock
            return lock
        raise OutputDirError(f"{path}: could not take the run lock (the file keeps being replaced).")

    def release(self) -> None:
        if self.fd < 0:
            return
        self._held.pop(str(self.folder.resolve()), None)
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody locks a file being removed
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = -1

    @classmethod
    def release_folder(cls, folder: Path) -> None:
        """Release this process's lock on `folder`, if it holds one."""
        lock = cls._held.get(str(Path(folder).resolve()))
        if lock is not None:
            lock.release()


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def _describe_holder(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}" + (
        f": {holder['command']}" if holder.get("command") else ""
    )
