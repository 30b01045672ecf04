"""Every subcommand's --help shows examples; `train --help-config` lists every config key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from higgs_tune.app.cli import _COMMANDS
from higgs_tune.app.cli import main as cli
from higgs_tune.config import config_keys


@pytest.mark.parametrize("name", list(_COMMANDS))
def test_every_subcommand_help_shows_examples(name):
    res = CliRunner().invoke(cli, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = [line.strip() for line in res.output.splitlines()]
    examples = [line for line in lines if line.startswith(f"higgs-tune {name} ")]
    assert 1 <= len(examples) <= 4, res.output


def test_help_config_lists_every_key():
    res = CliRunner().invoke(cli, ["train", "--help-config"])
    assert res.exit_code == 0, res.output
    section = None
    listed = set()
    for line in res.output.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            section = line[:-1]
        elif line.startswith("  "):
            listed.add(f"{section}.{line.strip().split(' ', 1)[0]}")
    assert listed == {k.name for k in config_keys()}
