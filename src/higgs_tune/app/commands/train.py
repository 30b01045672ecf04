"""`higgs-tune train CONFIG.yaml [key=value ...]` and `higgs-tune demo [--out DIR]`."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import click
from rich.logging import RichHandler

from higgs_tune.config import ConfigError, config_help, load_config
from higgs_tune.errors import HiggsTuneError


class ConfigProblem(HiggsTuneError):
    """A config that failed validation (the message lists every problem)."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, markup=False)],
        force=True,
    )
    for noisy in ("transformers", "accelerate", "peft", "torch", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_config_help(ctx, param, value):
    """--help-config: every config key with its type, default and help, then exit (no CONFIG needed)."""
    if not value or ctx.resilient_parsing:
        return
    click.echo(config_help())
    ctx.exit()


@click.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--resume", default=None, help="'auto' (newest verified checkpoint of output_dir) or a checkpoint folder."
)
@click.option(
    "--resume-weights-only",
    is_flag=True,
    help="Start a new run from the --resume checkpoint's weights (fresh optimizer, schedule and data order).",
)
@click.option("--overwrite", is_flag=True, help="Replace higgs-tune's own artefacts in a non-empty output_dir.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
@click.option(
    "--help-config",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_config_help,
    help="List every config key (section.key) with its type, default and help, and exit.",
)
def train_command(config, overrides, resume, resume_weights_only, overwrite, verbose):
    """Fine-tune Higgs Audio v2 as CONFIG.yaml says; OVERRIDES are section.key=value pairs."""
    from higgs_tune.train.recipe import train  # lazy: the recipe loads transformers, too slow for `higgs-tune --help`

    _setup_logging(verbose)
    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None
    if resume_weights_only and (not resume or resume == "auto"):
        raise ConfigProblem(
            "--resume-weights-only needs --resume PATH: the checkpoint folder whose weights start the new run."
        )
    try:
        result = train(cfg, resume=resume, overwrite=overwrite, resume_weights_only=resume_weights_only)
    except KeyboardInterrupt:
        # Ctrl-C: a save in progress removed its temporary folder, so every checkpoint is complete
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(interrupted_message(cfg, config, overrides), err=True)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"done: {result.steps} steps; final weights in {result.final_dir}")


def interrupted_message(cfg, config: str, overrides) -> str:
    """What a person needs after Ctrl-C: the newest complete checkpoint and the command to resume."""
    from higgs_tune.train.checkpoint import newest_complete_checkpoint  # lazy: transformers (see train_command)

    folders = [cfg.checkpoint.output_dir] + (
        [cfg.checkpoint.output_dir_fallback] if cfg.checkpoint.output_dir_fallback else []
    )
    found = [c for c in (newest_complete_checkpoint(Path(f)) for f in folders) if c is not None]
    command = shlex.join(["higgs-tune", "train", config, *overrides, "--resume", "auto"])
    if not found:
        return (
            f"interrupted before the first checkpoint: nothing to resume from; `{command}` starts the run again "
            "from step 0."
        )
    step, path = max(found)
    return f"interrupted: the newest complete checkpoint is {path} (step {step}). Continue with:\n  {command}"


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="demo-run",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the tiny stack, the code caches and the run.",
)
@click.option("--max-steps", type=int, default=None, help="Override the preset's train.max_steps.")
@click.option("--overwrite", is_flag=True, help="Start the demo run afresh if DIR/run exists.")
@click.option("--verbose", is_flag=True)
def demo_command(out_dir, max_steps, overwrite, verbose):
    """Fine-tune the tiny offline Higgs stack on the bundled demo data (CPU, a few minutes),
    evaluate it and write DIR/run/report.html."""
    from higgs_tune.app.demo import run_demo  # lazy: the whole stack, too slow for `higgs-tune --help`

    _setup_logging(verbose)
    report = run_demo(Path(out_dir), max_steps=max_steps, overwrite=overwrite)
    click.echo(f"demo finished; open {report}")
