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
    # third-party notes only with --verbose (app/noise.py); our own loggers are not touched
    for noisy in ("transformers", "accelerate", "peft", "torch", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


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
@click.option("--verbose", is_flag=True, help="Debug logging, and the libraries' own warnings and progress bars.")
@click.option(
    "--help-config",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_config_help,
    help="List every config key (section.key) with its type, default and help, and exit.",
)
def train_command(config, overrides, resume, resume_weights_only, overwrite, verbose):
    """Fine-tune Higgs Audio v2 as CONFIG.yaml says; OVERRIDES are section.key=value pairs
    (every key: --help-config).

    \b
    Examples:
      higgs-tune train configs/lora-1gpu.yaml checkpoint.output_dir=runs/my-voice
      higgs-tune train configs/lora-1gpu.yaml checkpoint.output_dir=runs/my-voice --resume auto
    """
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
    except KeyboardInterrupt as e:
        # Ctrl-C / SIGTERM: the recipe finished the step and saved it (TrainingInterrupted); a save
        # in progress removed its temporary folder, so every checkpoint is complete
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(interrupted_message(cfg, config, overrides), err=True)
        sys.exit(getattr(e, "exit_code", 130))
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
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Override the preset's train.max_steps (120); the warm-up is scaled to the same share.",
)
@click.option(
    "--family",
    type=click.Choice(["v2", "v3"]),
    default="v2",
    show_default=True,
    help="Which tiny stack: Higgs Audio v2 or v3.",
)
@click.option("--overwrite", is_flag=True, help="Start the demo run afresh if DIR/run exists.")
@click.option("--verbose", is_flag=True)
def demo_command(out_dir, max_steps, family, overwrite, verbose):
    """Fine-tune the tiny offline Higgs stack (v2, or v3 with --family v3) on the bundled demo
    data (CPU, a few minutes), evaluate it and write DIR/run/report.html.

    \b
    Examples:
      higgs-tune demo --out demo-run
      higgs-tune demo --out demo-run --max-steps 20 --overwrite
      higgs-tune demo --out demo-v3 --family v3
    """
    from higgs_tune.app.demo import run_demo  # lazy: the whole stack, too slow for `higgs-tune --help`

    _setup_logging(verbose)
    report = run_demo(Path(out_dir), max_steps=max_steps, overwrite=overwrite, family=family)
    click.echo(f"demo finished; open {report}")
