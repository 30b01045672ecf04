"""Library noise is off unless --verbose; our own warnings always reach the user."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from higgs_tune.app.noise import quiet_libraries

NOISE = ("torch/utils/_pytree.py", "is an Enum subclass", "Loading weights")


def _prepare(tiny_dir, demo_manifest, out, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    heldout = demo_manifest.parent / "heldout.jsonl"
    cmd = [sys.executable, "-m", "higgs_tune", *flags, "prepare", str(heldout), "--model", str(tiny_dir)]
    return subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_quiet_by_default_and_verbose_shows_the_libraries(tiny_dir, demo_manifest, tmp_path):
    quiet = _prepare(tiny_dir, demo_manifest, tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    said = quiet.stdout + quiet.stderr
    assert "prepared 6 clips" in said
    assert not [n for n in NOISE if n in said], said
    loud = _prepare(tiny_dir, demo_manifest, tmp_path / "b", "--verbose")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stderr


def test_quiet_filters_theirs_not_ours(monkeypatch):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    levels = {n: logging.getLogger(n).level for n in ("transformers", "torch")}
    try:
        quiet_libraries(verbose=False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            quiet_libraries(verbose=False)  # the filters go in front of "default"
            warnings.warn_explicit("theirs", FutureWarning, "x.py", 1, module="transformers.generation")
            warnings.warn_explicit("ours", UserWarning, "y.py", 2, module="higgs_tune.train.recipe")
        assert [str(w.message) for w in seen] == ["ours"]
        assert not logging.getLogger("transformers.generation.utils").isEnabledFor(logging.WARNING)
        assert logging.getLogger("higgs_tune.train").level == logging.NOTSET  # untouched
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _launch_warnings(argv, monkeypatch) -> list[str]:
    """What accelerate's own launcher logs while it checks `accelerate launch ARGV` (no process started)."""
    import accelerate.commands.launch as launch

    monkeypatch.setattr(launch, "default_config_file", "/nonexistent/default_config.yaml")  # no user config
    # as in a fresh `accelerate launch` process: no quieting by an earlier test in this one
    monkeypatch.setattr(launch.logger, "level", logging.WARNING)
    monkeypatch.setattr(launch.logger, "disabled", False)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    keep = Keep()
    launch.logger.addHandler(keep)
    try:
        launch._validate_launch_command(launch.launch_command_parser().parse_args(argv))
    finally:
        launch.logger.removeHandler(keep)
    return said


def test_readme_launch_commands_print_no_defaults_block(monkeypatch):
    """accelerate's "defaults used" block is printed by the launcher before higgs-tune runs: every
    `accelerate launch` line in the README passes what it asks for (flags or a config file)."""
    import shlex
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.strip().startswith("accelerate launch")]
    assert len(commands) >= 4, commands  # DDP with flags, DDP config file, FSDP2 one node, FSDP2 two nodes
    monkeypatch.chdir(repo)  # the config files are named relative to the repository
    for command in commands:
        argv = shlex.split(command)[2:]
        assert _launch_warnings(argv, monkeypatch) == [], command
    # the block the README avoids: flags left out
    said = _launch_warnings(["--multi_gpu", "--num_processes", "8", "-m", "higgs_tune", "train", "x.yaml"], monkeypatch)
    assert len(said) == 1 and "had defaults used instead" in said[0]
