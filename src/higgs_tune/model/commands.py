"""`higgs-tune convert SRC DST`: original boson_multimodal checkpoint -> transformers layout."""

import click


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
    from higgs_tune.model.convert import convert_checkpoint

    summary = convert_checkpoint(src, dst, audio_tokenizer=audio_tokenizer, overwrite=overwrite)
    click.echo(f"converted {summary['source']} -> {dst}: {summary['tensors']} tensors ({summary['dtype']})")
    click.echo(f"  text head: {'yes' if summary['text_head'] else 'no'}; audio self-attention: {'yes' if summary['audio_self_attention'] else 'no'}")
    if summary["dropped"]:
        click.echo(f"  dropped {len(summary['dropped'])} tensor(s) the port does not use, e.g. {', '.join(summary['dropped'][:3])}")
    if summary["audio_tokenizer"] is None:
        click.echo("  no audio tokenizer copied: set model.audio_tokenizer when loading, or rerun with --audio-tokenizer")
    if summary["text_head"]:
        click.echo("  load with model.use_text_head: true to keep the text head")
    if summary["audio_self_attention"]:
        click.echo("  load with model.audio_self_attention: true (the checkpoint has the audio-only attention block)")
