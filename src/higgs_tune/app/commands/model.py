"""`higgs-tune convert SRC DST` (original boson_multimodal checkpoint -> transformers layout) and
`higgs-tune make-tiny OUT_DIR` (the tiny offline stack used by the demo and the tests)."""

import click

from higgs_tune.errors import OutputDirError


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option(
    "--audio-tokenizer",
    default=None,
    help="HiggsAudioV2TokenizerModel folder or Hub id (transformers layout) to copy into DST/audio_tokenizer "
    "and build the processor with. Without it DST holds model + text tokenizer only.",
)
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty DST.")
def convert_command(src, dst, audio_tokenizer, overwrite):
    """Convert an original Higgs Audio checkpoint (model_type higgs_audio, folder or Hub id SRC)
    into a transformers HiggsAudioV2ForConditionalGeneration folder DST that higgs-tune loads."""
    from higgs_tune.model.convert import convert_checkpoint  # lazy: transformers, too slow for `higgs-tune --help`

    summary = convert_checkpoint(src, dst, audio_tokenizer=audio_tokenizer, overwrite=overwrite)
    click.echo(f"converted {summary['source']} -> {dst}: {summary['tensors']} tensors ({summary['dtype']})")
    click.echo(
        f"  text head: {'yes' if summary['text_head'] else 'no'}; audio self-attention: "
        f"{'yes' if summary['audio_self_attention'] else 'no'}"
    )
    if summary["dropped"]:
        click.echo(
            f"  dropped {len(summary['dropped'])} tensor(s) the port does not use, e.g. "
            f"{', '.join(summary['dropped'][:3])}"
        )
    if summary["audio_tokenizer"] is None:
        click.echo(
            "  no audio tokenizer copied: set model.audio_tokenizer when loading, or rerun with --audio-tokenizer"
        )
    if summary["text_head"]:
        click.echo("  load with model.use_text_head: true to keep the text head")
    if summary["audio_self_attention"]:
        click.echo("  load with model.audio_self_attention: true (the checkpoint has the audio-only attention block)")


@click.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights and codebooks.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty OUT_DIR.")
def make_tiny_command(out_dir, seed, overwrite):
    """Build a tiny random-weight Higgs Audio v2 stack (text tokenizer, audio tokenizer,
    model with text head, processor) in OUT_DIR, offline, deterministic from SEED."""
    from higgs_tune.tiny import OutputDirNotEmpty, make_tiny  # lazy: transformers, too slow for `higgs-tune --help`

    try:
        out = make_tiny(out_dir, seed=seed, overwrite=overwrite)
    except OutputDirNotEmpty as e:
        raise OutputDirError(str(e)) from None
    click.echo(f"tiny Higgs Audio v2 stack written to {out}")
