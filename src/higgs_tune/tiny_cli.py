"""`higgs-tune make-tiny OUT_DIR`: the tiny offline stack used by the demo and the tests."""

import click

from higgs_tune.errors import OutputDirError


@click.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights and codebooks.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty OUT_DIR.")
def make_tiny_command(out_dir, seed, overwrite):
    """Build a tiny random-weight Higgs Audio v2 stack (text tokenizer, audio tokenizer,
    model with text head, processor) in OUT_DIR, offline, deterministic from SEED."""
    from higgs_tune.tiny import OutputDirNotEmpty, make_tiny

    try:
        out = make_tiny(out_dir, seed=seed, overwrite=overwrite)
    except OutputDirNotEmpty as e:
        raise OutputDirError(str(e)) from None
    click.echo(f"tiny Higgs Audio v2 stack written to {out}")
