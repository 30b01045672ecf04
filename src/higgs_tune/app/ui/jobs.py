"""Background jobs of the UI: the real `higgs-tune prepare` / `higgs-tune train` commands as subprocesses.

A job writes its stdout and stderr to STATE/logs/<id>.log. One job at a time per output
folder: an exclusive `flock` on STATE/locks/<sha of the folder>.lock is taken before the
start and handed to the process (the UI closes its own copy), so the lock lives exactly as
long as the process and a second start (from this UI or another `higgs-tune ui` on the same
folders) is refused with the folder named. Stop sends SIGINT: `higgs-tune train` then keeps
its verified checkpoints and prints the resume command; `prepare` keeps its finished shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from higgs_tune.errors import HiggsTuneError


class JobConflict(HiggsTuneError):
    """A second job for an output folder that already has one."""


# prepare's progress: tqdm ("encoding:  40%|####| 8/20") or higgs_tune.progress's plain line
# ("encoding: 8/20 clips (40%) elapsed ...")
_PROGRESS = re.compile(r"encoding:\s*(?:\d+%\|[^|]*\|\s*)?(\d+)/(\d+)")


def read_progress(log_text: str) -> tuple[int, int] | None:
    """(done, total) from the newest progress line of `higgs-tune prepare` (tqdm or plain)."""
    found = _PROGRESS.findall(log_text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


@dataclass
class Job:
    id: str
    kind: str  # "prepare" | "train"
    key: Path  # the output folder it owns
    argv: list[str]
    log_path: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop_requested: bool = False

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def state(self) -> str:
        rc = self.returncode
        if rc is None:
            return "stopping" if self.stop_requested else "running"
        if rc == 0:
            return "finished"
        # 130: the command handled Ctrl-C; -SIGINT: it was stopped before it could install a handler
        return "stopped" if rc in (130, -signal.SIGINT) else "failed"

    def log_tail(self, max_chars: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_chars))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        # tqdm redraws its bar with \r: keep the last state of each line
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))

    def to_dict(self) -> dict:
        tail = self.log_tail()
        progress = read_progress(tail) if self.kind == "prepare" else None
        return {
            "id": self.id,
            "kind": self.kind,
            "folder": str(self.key),
            "state": self.state,
            "returncode": self.returncode,
            "command": " ".join(self.argv[2:]) if self.argv[1:2] == ["-m"] else " ".join(self.argv),
            "started": self.started,
            "progress": progress,
            "log": tail,
        }


class JobRegistry:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.jobs: dict[str, Job] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def _lock_path(self, folder: Path) -> Path:
        digest = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:16]
        return self.state_dir / "locks" / f"{digest}.lock"

    def _note_finished(self) -> None:
        for job in self.jobs.values():
            if job.returncode is not None and job.finished is None:
                job.finished = time.time()

    def start(self, kind: str, folder: Path, args: list[str]) -> Job:
        """Start `higgs-tune ARGS` owning `folder`; JobConflict when a job already holds it."""
        with self._lock:
            self._note_finished()
            lock_path = self._lock_path(folder)
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = open(lock_path, "a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                raise JobConflict(
                    f"a job is already running for {folder} (one job at a time per output folder): "
                    "wait for it to finish or stop it first."
                ) from None
            job_id = f"{kind}-{next(self._counter)}-{int(time.time())}"
            log_path = self.state_dir / "logs" / f"{job_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "higgs_tune", *args]
            # a plain progress line every second: the page follows prepare/train from the job's log
            env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120", HIGGS_TUNE_PROGRESS_EVERY_S="1")
            with lock_file, open(log_path, "wb") as log:
                # own session: a Ctrl-C in the terminal of `higgs-tune ui` reaches the UI, which
                # then stops its jobs itself (shutdown), each exactly once. pass_fds: the process
                # holds the lock; closing the UI's copy here leaves it held until the process ends.
                process = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    pass_fds=(lock_file.fileno(),),
                )
            job = Job(job_id, kind, folder, argv, log_path, process)
            self.jobs[job_id] = job
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._note_finished()
            if job_id not in self.jobs:
                raise JobConflict(f"no job {job_id!r} in this UI session.")
            return self.jobs[job_id]

    def for_folder(self, folder: Path) -> Job | None:
        """The newest job of `folder` (running or not)."""
        with self._lock:
            self._note_finished()
            found = [j for j in self.jobs.values() if j.key == folder]
            return found[-1] if found else None

    def stop(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.returncode is None:
            job.stop_requested = True
            job.process.send_signal(signal.SIGINT)
        return job

    def shutdown(self, timeout: float = 60.0) -> None:
        """SIGINT every running job and wait for each (a training run saves nothing half-written)."""
        running = [j for j in self.jobs.values() if j.returncode is None]
        for job in running:
            job.stop_requested = True
            job.process.send_signal(signal.SIGINT)
        deadline = time.time() + timeout
        for job in running:
            try:
                job.process.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
        with self._lock:
            self._note_finished()
