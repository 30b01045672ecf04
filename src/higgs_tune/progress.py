"""Progress of long work (training steps, clips encoded, clips generated), for people and programs.

The library functions take a `Progress` (train, prepare_manifest, evaluate_manifest,
generate_speech); the CLI passes a `TerminalProgress`, a UI its own subclass or a
`CallbackProgress(fn)`. The protocol:

    progress.start(total, desc, unit, done=0)   # a new task: `total` units, `done` already done
    progress.update(done, **info)               # absolute position; info: loss=2.31, tokens_per_s=...
    progress.close()

`TerminalProgress`: on a terminal a rich bar (description, bar, done/total, the info fields,
elapsed, ETA); when the stream is not a terminal (a log file, a cluster job's stdout) plain
lines every `every_s` seconds and at the end, e.g.
    train: 30/120 (25%) loss 3.214 tokens/s 1234 elapsed 0:01:02 ETA 0:03:06
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta


class Progress:
    """Does nothing: the default when nobody watches."""

    def start(self, total: int, desc: str, unit: str = "it", done: int = 0) -> None:
        pass

    def update(self, done: int, **info) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackProgress(Progress):
    """Calls `fn(event, state)` with event "start" / "update" / "close" and a dict: desc, unit,
    total, done, elapsed_s, eta_s (None until known) and the info fields."""

    def __init__(self, fn: Callable[[str, dict], None]):
        self.fn = fn
        self.state: dict = {}
        self._t0 = 0.0
        self._done0 = 0

    def start(self, total, desc, unit="it", done=0):
        self._t0, self._done0 = time.monotonic(), done
        self.state = {"desc": desc, "unit": unit, "total": total, "done": done, "elapsed_s": 0.0, "eta_s": None}
        self.fn("start", dict(self.state))

    def update(self, done, **info):
        elapsed = time.monotonic() - self._t0
        self.state.update(
            info, done=done, elapsed_s=elapsed, eta_s=eta_seconds(self._done0, done, self.state["total"], elapsed)
        )
        self.fn("update", dict(self.state))

    def close(self):
        self.fn("close", dict(self.state))


def eta_seconds(done0: int, done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the rate since start (None before the first unit of this session)."""
    if done <= done0 or total is None:
        return None
    return elapsed / (done - done0) * max(0, total - done)


def _hms(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(seconds)))


def _fmt_info(info: dict) -> str:
    parts = []
    for k, v in info.items():
        if v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"
        parts.append(f"{k.replace('_per_s', '/s').replace('_', ' ')} {v}")
    return " ".join(parts)


DEFAULT_EVERY_S = 30.0
EVERY_ENV = "HIGGS_TUNE_PROGRESS_EVERY_S"  # seconds between plain progress lines (not on a terminal)


class TerminalProgress(Progress):
    """A rich bar on a terminal, plain periodic lines otherwise (see the module docstring)."""

    def __init__(self, stream=None, *, every_s: float | None = None, tty: bool | None = None, console=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        # plain lines every 30 s by default; a program that reads them (the web UI) asks for more
        self.every_s = every_s if every_s is not None else float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
        self.console = console  # share the run's rich console: its lines print above the bar
        self._bar = None
        self._task = None
        self._last_line = 0.0

    def start(self, total, desc, unit="it", done=0):
        self.close()
        self.desc, self.unit, self.total, self._done0, self.done = desc, unit, total, done, done
        self._t0 = self._last_line = time.monotonic()
        self.info: dict = {}
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console or Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(desc, total=total, completed=done, info="")

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        info = _fmt_info(self.info)
        eta = _hms(eta_seconds(self._done0, self.done, self.total, elapsed))
        info = f" {info}" if info else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}{info} elapsed {_hms(elapsed)} ETA {eta}"

    def update(self, done, **info):
        self.done = done
        self.info.update(info)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=_fmt_info(self.info))
        elif time.monotonic() - self._last_line >= self.every_s or done >= (self.total or 0):
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def as_progress(progress: Progress | bool | None) -> Progress:
    """Library arguments accept a Progress, True (a TerminalProgress on stderr) or False/None (none)."""
    if isinstance(progress, Progress):
        return progress
    return TerminalProgress() if progress else Progress()
