"""Is a Hub id usable right now? Answer in a second instead of letting the Hub client retry.

Offline, `from_pretrained("openai/whisper-large-v3")` retries its HTTP calls for minutes before
it fails. `check_hub_source(name, ...)` decides up front:
  - a local folder (or a path that looks like one): nothing to check;
  - a Hub id already in the local Hub cache: usable offline -> returns True (load it with
    `local_files_only=True`, which never touches the network);
  - HF_HUB_OFFLINE set, or the Hub endpoint not reachable within a few seconds, and the id is
    not cached: ModelLoadError at once, with the fix (download it elsewhere, pass a folder).
Returns False when the Hub is reachable and the id is not cached (a normal download).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from higgs_tune.errors import ModelLoadError

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


def hub_offline_requested() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The folder of the newest cached snapshot of `repo_id` (the revision `refs/main` names), or None."""
    root = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = root / "refs" / "main"
    if ref.is_file():
        snap = root / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snap.is_dir():
            return snap
    snaps = sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
    return snaps[-1] if snaps else None


def snapshot_repo_id(path: str | Path, repo_type: str = "model") -> str | None:
    """The repo id whose Hub-cache snapshot `path` is (`.../models--org--name/snapshots/REV`), else None.

    Only a snapshot's root names a repo: a folder inside a snapshot is not addressable by an id."""
    path = Path(path).expanduser()
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith(f"{repo_type}s--"):
        return None
    parts = path.parent.parent.name.split("--")[1:]
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def is_hub_id(name: str | Path) -> bool:
    """`org/name`, not an existing path and not written like one."""
    return not _looks_local(str(name)) and str(name).count("/") == 1


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hub endpoint be opened within `timeout` seconds?"""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_hub_source(name: str | Path, *, what: str, option: str, repo_type: str = "model") -> bool:
    """See the module docstring. True: load `name` with local_files_only=True (cached, Hub not used)."""
    name = str(name)
    if _looks_local(name):
        return False
    if cached_snapshot(name, repo_type) is not None:
        return hub_offline_requested() or not hub_reachable()
    if hub_offline_requested():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = f"the Hub ({hub_endpoint()}) cannot be reached from this machine"
    else:
        return False
    raise ModelLoadError(
        f"the {what} {name!r} is not a local folder and not in the Hub cache ({hub_cache_dir()}), and {why}. "
        f"Fix: download it where there is network (`huggingface-cli download {name} --local-dir DIR`), copy DIR "
        f"here and pass {option} DIR; or unset HF_HUB_OFFLINE if this machine is online."
    )
