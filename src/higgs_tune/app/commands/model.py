"""`higgs-tune convert SRC DST` (original boson_multimodal checkpoint -> transformers layout) and
`higgs-tune make-tiny OUT_DIR [--family v3]` (the tiny offline stacks used by the demo and the tests) and
`higgs-tune verify MODEL` (a real checkpoint's load, forward and generation, as a pasteable verdict)."""

import json
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
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights and codebooks.")
@click.option(
    "--family",
    type=click.Choice(["v2", "v3"]),
    default="v2",
    show_default=True,
    help="v2: transformers-layout Higgs Audio v2 stack; v3: a Higgs Audio v3 checkpoint in the released layout.",
)
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty OUT_DIR.")
@click.option(
    "--eval-models",
    "eval_dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Also (or only) build the tiny ASR and speaker models for `evaluate` in DIR/asr and DIR/speaker.",
)
def make_tiny_command(out_dir, seed, family, overwrite, eval_dir):
    """Build a tiny random-weight Higgs Audio stack in OUT_DIR, offline, deterministic from SEED:
    v2 (text tokenizer, audio tokenizer, model with text head, processor) or v3 (config.json,
    model.safetensors with tied.*/body.* keys and the bundled codec, tokenizer with the v3 tokens);
    with --eval-models, the tiny ASR and speaker models `evaluate` can use offline.

    \b
    Examples:
      higgs-tune make-tiny models/tiny
      higgs-tune make-tiny models/tiny-v3 --family v3
      higgs-tune make-tiny models/tiny --eval-models models/eval     (then evaluate
          --asr-model models/eval/asr --speaker-model models/eval/speaker)
    """
    if out_dir is None and eval_dir is None:
        raise click.UsageError("give OUT_DIR (the tiny Higgs stack), --eval-models DIR, or both.")
    if out_dir is not None and family == "v3":
        from higgs_tune.tiny.v3 import make_tiny_v3  # lazy: transformers, too slow for `--help`

        try:
            out = make_tiny_v3(out_dir, seed=seed, overwrite=overwrite)
        except FileExistsError as e:
            raise OutputDirError(str(e)) from None
        click.echo(f"tiny Higgs Audio v3 checkpoint written to {out}")
    elif out_dir is not None:
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


@click.command("verify")
@click.argument("model")
@click.option("--adapter", default=None, help="A run's checkpoint-N/ or final/ folder to load onto MODEL.")
@click.option(
    "--family", type=click.Choice(["v2", "v3"]), default=None, help="Model family (default: from config.json)."
)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available).")
@click.option("--max-frames", type=click.IntRange(min=1), default=250, show_default=True, help="Generation limit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures.")
def verify_command(model, adapter, family, device, max_frames, json_path):
    """Check a real checkpoint (v2 or v3) before training on it: strict load, a teacher-forced
    forward on a bundled clip (loss and accuracy per codebook, end-of-audio accuracy), a short
    generation (did it stop, how long) and peak memory. Prints a block to paste into an issue.

    \b
    Examples:
      higgs-tune verify bosonai/higgs-audio-v2-generation-3B-base
      higgs-tune verify models/higgs-tts-3-4b --adapter runs/my-voice/final --json verify.json
    """
    from higgs_tune.app.verify import verify_model  # lazy: the whole stack, too slow for `higgs-tune --help`

    result = verify_model(model, adapter, family=family, device=device, max_frames=max_frames)
    click.echo(result.render())
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
