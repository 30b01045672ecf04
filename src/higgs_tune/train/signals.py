"""Stopping a run cleanly on SIGTERM (what cluster schedulers send before they kill a job) or Ctrl-C.

    with StopSignals() as stop:
        ... setup (a signal here stops at once: KeyboardInterrupt / TrainingInterrupted) ...
        stop.armed = True
        while training:
            ... one optimizer step ...
            if stop.agreed(accelerator):      # every rank sees the same answer
                save a checkpoint of this step; raise TrainingInterrupted(stop.signal_name, ...)

The handler only records the signal: the step in progress finishes, so the checkpoint holds a
consistent state (optimizer, scheduler, data position) that `--resume auto` continues exactly.
A second Ctrl-C raises KeyboardInterrupt at once (a person who really wants out now). Handlers
are installed only in the main thread (Python allows no other) and restored on exit.
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, what shells report


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; `checkpoint`: the one saved for `step` (None when the signal
    came before the loop, with nothing to save)."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = EXIT_CODES.get(signal_name, 1)
        super().__init__(f"{signal_name} at step {step}")


class StopSignals:
    """Records SIGTERM / SIGINT while active (see the module docstring)."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: str | None = None
        self.armed = False  # True while the loop checks `agreed` after each step
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed or (self.signal_name == "SIGINT" and name == "SIGINT"):
            # during setup (nothing to save yet), or the second Ctrl-C: out now
            if name == "SIGINT":
                raise KeyboardInterrupt
            raise TrainingInterrupted(name, None, None)
        self.signal_name = self.signal_name or name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank received a signal (one small all-reduce per step when distributed)."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        got = float(accelerator.reduce(flag, "sum")) > 0
        if got and self.signal_name is None:
            self.signal_name = "SIGTERM"  # another rank received it; the scheduler stops the whole job
        return got
