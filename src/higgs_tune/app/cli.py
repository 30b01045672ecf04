"""The `higgs-tune` command line: one group; the subcommands live in app/commands/, one module per area.

Subcommands are imported lazily (start-up time: `higgs-tune train` need not load the
inference code) and a broken optional area cannot break the others. Everything below the CLI raises typed errors
(`HiggsTuneError` subclasses) whose message says what to do; this module turns them into one clean line
and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from higgs_tune.errors import HiggsTuneError

# name -> "module:attribute" of a click.Command
_COMMANDS = {
    "make-tiny": "higgs_tune.app.commands.model:make_tiny_command",
    "prepare": "higgs_tune.app.commands.data:prepare_command",
    "inspect": "higgs_tune.app.commands.data:inspect_command",
    "convert": "higgs_tune.app.commands.model:convert_command",
    "train": "higgs_tune.app.commands.train:train_command",
    "demo": "higgs_tune.app.commands.train:demo_command",
    "generate": "higgs_tune.app.commands.infer:generate_command",
    "evaluate": "higgs_tune.app.commands.infer:evaluate_command",
    "export": "higgs_tune.app.commands.infer:export_command",
    "report": "higgs_tune.app.commands.infer:report_command",
}


def _load(name: str) -> click.Command | None:
    module_name, attr = _COMMANDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            return None  # that area is not built (yet): the command is absent, not a stub
        raise
    return getattr(module, attr, None)


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n in _COMMANDS if _load(n) is not None]

    def get_command(self, ctx, name):
        return _load(name) if name in _COMMANDS else None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HiggsTuneError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="higgs-tune")
def main():
    """higgs-tune: fine-tune Higgs Audio v2 (LoRA or full), with the training signal checked."""


if __name__ == "__main__":
    main()
