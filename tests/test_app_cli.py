"""The app layer's own promises: `train --help-config` lists the config, `python -m higgs_tune` runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from click.testing import CliRunner

from higgs_tune.app.cli import main
from higgs_tune.config import Config


def test_train_help_config_lists_every_key_with_type_default_and_help():
    result = CliRunner().invoke(main, ["train", "--help-config"])  # no CONFIG needed
    assert result.exit_code == 0, result.output
    listed: dict[str, dict[str, str]] = {}  # section -> key -> "type, default ...): help"
    for line in result.output.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            section = listed.setdefault(line[:-1], {})
        elif line.startswith("  "):
            name, _, rest = line.strip().partition(" (")
            section[name] = rest
    for sec in dataclasses.fields(Config):
        keys = [f.name for f in dataclasses.fields(getattr(Config(), sec.name))]
        assert list(listed[sec.name]) == keys
        for key, rest in listed[sec.name].items():
            assert ", default " in rest and rest.split("): ", 1)[1].strip(), (
                f"{sec.name}.{key} lacks type, default or help"
            )
    assert "  lora_r (an integer, default " in result.output
    assert "--help-config" in CliRunner().invoke(main, ["train", "--help"]).output


def test_python_dash_m_higgs_tune_is_the_command():
    out = subprocess.run([sys.executable, "-m", "higgs_tune", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "make-tiny" in out.stdout and "report" in out.stdout


def test_help_loads_every_command_module_but_not_transformers():
    """Why app/commands/ keeps some imports inside the commands: `--help` stays quick."""
    code = (
        "import sys; from click.testing import CliRunner; from higgs_tune.app.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
