"""`higgs-tune convert SRC DST` (original boson_multimodal checkpoint -> transformers layout) and
`higgs-tune make-tiny OUT_DIR` (the tiny offline stack used by the demo and the tests)."""

from pathlib import Path

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
    into a transformers HiggsAudioV2ForConditionalGeneration folder DST that higgs-tune loads.

    \b
    Examples:
      higgs-tune convert bosonai/higgs-audio-v2-generation-3B-base models/higgs \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer
      higgs-tune convert /data/boson-ckpt models/higgs --audio-tokenizer models/tokenizer
    """
    from higgs_tune.model.convert import convert_checkpoint  # lazy: transformers, too slow for `higgs-tune --help`

    summary = convert_checkpoint(src, dst, audio_tokenizer=audio_tokenizer, overwrite=overwrite)
    click.echo(f"converted {summary['source']} -> {dst}: {summary['tensors']} tensors ({summary['dtype']})")
    click.echo(
        f"  text head: {'yes' if summary['text_head'] else 'no'}; audio self-attention: {'yes' if summary['audio_self_attention'] else 'no'}"
    )
    if summary["dropped"]:
        click.echo(
            f"  dropped {len(summary['dropped'])} tensor(s) the port does not use, e.g. {', '.join(summary['dropped'][:3])}"
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
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights and codebooks.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty OUT_DIR.")
@click.option(
    "--eval-models",
    "eval_dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Also (or only) build the tiny ASR and speaker models for `evaluate` in DIR/asr and DIR/speaker.",
)
def make_tiny_command(out_dir, seed, overwrite, eval_dir):
    """Build a tiny random-weight Higgs Audio v2 stack (text tokenizer, audio tokenizer,
    model with text head, processor) in OUT_DIR, offline, deterministic from SEED; with
    --eval-models, the tiny ASR and speaker models `evaluate` can use offline.

    \b
    Examples:
      higgs-tune make-tiny models/tiny
      higgs-tune make-tiny models/tiny --eval-models models/eval     (then evaluate
          --asr-model models/eval/asr --speaker-model models/eval/speaker)
    """
    if out_dir is None and eval_dir is None:
        raise click.UsageError("give OUT_DIR (the tiny Higgs stack), --eval-models DIR, or both.")
    if out_dir is not None:
        from higgs_tune.tiny import OutputDirNotEmpty, make_tiny  # lazy: transformers, too slow for `--help`

        try:
            out = make_tiny(out_dir, seed=seed, overwrite=overwrite)
        except OutputDirNotEmpty as e:
            raise OutputDirError(str(e)) from None
        click.echo(f"tiny Higgs Audio v2 stack written to {out}")
    if eval_dir is not None:
        from higgs_tune.tiny.eval_models import make_tiny_eval_models  # lazy: transformers

        taken = [d for d in (Path(eval_dir) / "asr", Path(eval_dir) / "speaker") if d.exists() and any(d.iterdir())]
        if taken and not overwrite:
            raise OutputDirError(
                f"{', '.join(map(str, taken))} already exist(s) and are not empty: add --overwrite to rebuild them, "
                "or choose another --eval-models DIR."
            )
        asr, speaker = make_tiny_eval_models(eval_dir, seed=seed)
        click.echo(f"tiny evaluation models written: --asr-model {asr} --speaker-model {speaker}")
