"""Paths named in UI requests stay inside the folders the user chose (`higgs-tune ui --root`).

A relative path is taken relative to the first root; `..` components are refused outright
(even when the result would land inside a root: a path that climbs is a mistake or an
attack); an absolute path must resolve (symlinks followed) to a root or a folder under one.
Read-only roots (the bundled demo data) may be read but never written.
"""

from __future__ import annotations

import os
from pathlib import Path

from higgs_tune.errors import HiggsTuneError


class PathNotAllowed(HiggsTuneError):
    """A request named a path outside the allowed folders."""


class Roots:
    def __init__(self, roots: list[str | Path], read_only: list[str | Path] = ()):
        if not roots:
            raise PathNotAllowed("the UI needs at least one folder it may use (--root DIR).")
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.read_only = [Path(os.path.realpath(r)) for r in read_only]

    @property
    def home(self) -> Path:
        """The first root: relative paths start here, the UI keeps its own files in HOME/.higgs-tune-ui."""
        return self.roots[0]

    def describe(self) -> list[str]:
        return [str(r) for r in self.roots] + [f"{r} (read only)" for r in self.read_only]

    def resolve(self, value: str | Path, *, write: bool = False, what: str = "path") -> Path:
        """The real path of `value` when it lies under an allowed root, else PathNotAllowed."""
        text = str(value).strip()
        if not text:
            raise PathNotAllowed(f"{what} is empty: give a path under {self.home}.")
        if "\x00" in text:
            raise PathNotAllowed(f"{what} contains a NUL character.")
        raw = Path(text).expanduser()
        if ".." in raw.parts:
            raise PathNotAllowed(f"{what} {text!r} contains '..': give a path under {', '.join(self.describe())}.")
        full = Path(os.path.realpath(raw if raw.is_absolute() else self.home / raw))
        allowed = self.roots if write else self.roots + self.read_only
        if any(full == r or r in full.parents for r in allowed):
            return full
        verb, where = ("write", self.roots) if write else ("use", allowed)
        names = ", ".join(str(r) for r in where)
        raise PathNotAllowed(
            f"{what} {text!r} is outside the folders this UI may {verb}: {names}. "
            "Fix: choose a path under one of them, or restart `higgs-tune ui` with --root for that folder."
        )
