"""`higgs-tune generate | evaluate | export | report`: after training.

The modules that load transformers or peft (loading, evaluate, export, report) are imported
inside the commands, so `higgs-tune --help` (which loads every command module) stays fast.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from higgs_tune.app.requests import (
    FileRequest,
    check_output_files,
    default_output_name,
    pick_speaker_reference,
    read_batch_file,
    visible_text,
)
from higgs_tune.errors import DataError
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, encode_reference, generate_speech, write_wav
from higgs_tune.model.hub import check_hub_source
from higgs_tune.progress import TerminalProgress
from higgs_tune.runfs import TENSORBOARD_DIR


def _sampling_options(f):
    """The sampling flags shared by generate and evaluate (see SamplingOptions)."""

    @click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature; 0 = greedy.")
    @click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling; 1 = off.")
    @click.option("--top-k", type=int, default=50, show_default=True, help="Top-k sampling; 0 = off.")
    @click.option(
        "--ras-win-len",
        type=int,
        default=7,
        show_default=True,
        help="Repetition-aware sampling window in audio columns (set on generation_config); 0 = off.",
    )
    @click.option(
        "--ras-win-max-num-repeat",
        type=int,
        default=2,
        show_default=True,
        help="Re-draw a code seen this many times in the RAS window.",
    )
    @click.option(
        "--max-new-tokens",
        type=int,
        default=1024,
        show_default=True,
        help="Most audio columns to generate (25 per second; a clip of T frames needs T + 9 with 8 codebooks).",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Request i is generated with seed + i.")
    @functools.wraps(f)
    def wrapper(*args, temperature, top_p, top_k, ras_win_len, ras_win_max_num_repeat, max_new_tokens, seed, **kwargs):
        options = SamplingOptions(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            ras_win_len=ras_win_len,
            ras_win_max_num_repeat=ras_win_max_num_repeat,
            max_new_tokens=max_new_tokens,
            seed=seed,
        ).validate()
        return f(*args, options=options, **kwargs)

    return wrapper


def _model_options(f):
    """The flags that choose the model: base, adapter, codec, device, dtype."""
    options = [
        click.option(
            "--model",
            "model",
            default=None,
            help=(
                "Base model folder or Hub id, or a merged export. Default: the base recorded in the adapter "
                "checkpoint's config.yaml."
            ),
        ),
        click.option(
            "--adapter",
            default=None,
            type=click.Path(file_okay=False),
            help="A run's checkpoint-N/ or final/ folder (LoRA adapter or full fine-tune weights).",
        ),
        click.option(
            "--audio-tokenizer", default=None, help="Audio tokenizer folder or id (default: MODEL/audio_tokenizer)."
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            help="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load_stack(model, adapter, audio_tokenizer, device, dtype):
    from higgs_tune.infer.loading import load_inference_stack  # lazy: transformers, too slow for `higgs-tune --help`

    stack = load_inference_stack(model, adapter, device=device, dtype=dtype, audio_tokenizer=audio_tokenizer)
    for note in stack.notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    return stack


# ----------------------------------------------------------------------------- generate
@click.command("generate")
@click.argument("texts", nargs=-1)
@_model_options
@click.option(
    "--ref-audio", type=click.Path(dir_okay=False), default=None, help="Reference clip of the voice to clone."
)
@click.option("--ref-text", default=None, help="Transcript of --ref-audio.")
@click.option(
    "--speaker", default=None, help="Clone this speaker: a clip of theirs from --manifest (the id that sorts first)."
)
@click.option(
    "--manifest", type=click.Path(dir_okay=False), default=None, help="Manifest to pick the --speaker clip from."
)
@click.option(
    "--batch",
    "batch_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON Lines file, one {text, ref_audio, ref_text, out[, id, scene]} per line; paths relative to the file.",
)
@click.option("--scene", default=None, help="Scene description put into the system turn.")
@click.option("--overwrite", is_flag=True, help="Replace existing output WAVs (never a file that is not audio).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="Output WAV (one TEXT only).")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default="generated",
    show_default=True,
    help="Folder for the WAVs of the TEXTS (out-01-<text>.wav, ...).",
)
@_sampling_options
def generate_command(
    texts,
    model,
    adapter,
    audio_tokenizer,
    device,
    dtype,
    ref_audio,
    ref_text,
    speaker,
    manifest,
    batch_file,
    scene,
    overwrite,
    out_file,
    out_dir,
    options,
):
    """Speak TEXTS (or a --batch file) with the base model + adapter, cloning a reference voice.

    \b
    Examples:
      higgs-tune generate "Hello there." --adapter runs/demo/final --ref-audio ref.wav --ref-text "..."
      higgs-tune generate "Hello." --adapter runs/demo/final --speaker en_a --manifest data/manifest.jsonl
      higgs-tune generate --model exports/mine --batch requests.jsonl

    Writes 16-bit WAVs at the codec's rate and says, per output, whether the model ended the
    audio itself or hit --max-new-tokens.
    """
    if batch_file and (texts or ref_audio or speaker):
        raise click.UsageError(
            "--batch takes texts and references from the file: do not also give TEXTS, --ref-audio or --speaker."
        )
    if not batch_file and not texts:
        raise click.UsageError("give one or more TEXTS, or --batch FILE.jsonl.")
    if ref_audio and speaker:
        raise click.UsageError("--ref-audio and --speaker both choose the reference: give one.")
    if bool(ref_audio) != bool(ref_text):
        raise click.UsageError("--ref-audio and --ref-text go together (the reference clip and its transcript).")
    if speaker and not manifest:
        raise click.UsageError("--speaker needs --manifest (the manifest that lists the speaker's clips).")
    if out_file and len(texts) != 1:
        raise click.UsageError("--out names one file: give exactly one TEXT (or use --out-dir).")
    empty = [i + 1 for i, t in enumerate(texts) if not visible_text(t)]
    if empty:
        raise DataError(
            f"TEXT {', '.join(map(str, empty))} is empty (only whitespace or invisible characters): nothing to speak. "
            "Fix: give the sentence to say."
        )

    if batch_file:
        requests = read_batch_file(batch_file)
    else:
        ref_path = Path(ref_audio) if ref_audio else None
        if speaker:
            ref_path, ref_text, ref_id = pick_speaker_reference(manifest, speaker)
            click.echo(f"reference for speaker {speaker}: {ref_id} ({ref_path})")
        if ref_path is not None and not ref_path.is_file():
            raise DataError(
                f"reference audio {ref_path} not found. Fix: give an existing audio file (WAV/FLAC) with --ref-audio."
            )
        outs = (
            [Path(out_file)]
            if out_file
            else [Path(out_dir) / default_output_name(i + 1, t) for i, t in enumerate(texts)]
        )
        requests = [
            FileRequest(text=t, out=o, ref_audio=ref_path, ref_text=ref_text, id=o.stem, scene=scene)
            for t, o in zip(texts, outs, strict=True)
        ]

    check_output_files([r.out for r in requests], overwrite)  # before the model loads
    _run_generation(requests, model, adapter, audio_tokenizer, device, dtype, options)


def _run_generation(requests, model, adapter, audio_tokenizer, device, dtype, options) -> None:
    stack = _load_stack(model, adapter, audio_tokenizer, device, dtype)
    codes = {}
    gen_requests = []
    for r in requests:
        if r.ref_audio is not None and r.ref_audio not in codes:
            codes[r.ref_audio] = encode_reference(stack.processor, r.ref_audio)
        gen_requests.append(
            GenerationRequest(
                text=r.text,
                ref_text=r.ref_text,
                ref_codes=codes.get(r.ref_audio) if r.ref_audio else None,
                scene=r.scene,
                id=r.id,
            )
        )
    results = generate_speech(
        stack.model,
        stack.processor,
        stack.tokens,
        gen_requests,
        options,
        family=stack.family,
        progress=TerminalProgress(),
    )
    not_stopped = 0
    for r, res in zip(requests, results, strict=True):
        write_wav(r.out, res.wav, res.sample_rate)
        line = f"{r.out}: {res.duration_s:.2f} s, {res.num_frames} frames"
        if res.stopped:
            click.echo(line + ", ended by the model")
        else:
            not_stopped += 1
            click.secho(
                line + f", DID NOT STOP: hit the limit of {res.max_new_tokens} audio columns without an end of audio "
                "(raise --max-new-tokens for long texts; a model that never stops has not learned the stream EOS)",
                fg="yellow",
            )
    if not_stopped:
        click.secho(f"{not_stopped} of {len(results)} output(s) hit the length limit.", fg="yellow")


# ----------------------------------------------------------------------------- evaluate
@click.command("evaluate")
@click.argument("manifest", type=click.Path(dir_okay=False))
@_model_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Results folder. Default: RUN_DIR/eval when --adapter is a run's checkpoint, else required.",
)
@click.option(
    "--ref-manifest",
    type=click.Path(dir_okay=False),
    default=None,
    help="Take voice prompts from this manifest (e.g. the training one) instead of MANIFEST itself.",
)
@click.option(
    "--asr-model", default=None, help="Whisper-style ASR model id or folder [default: openai/whisper-large-v3]."
)
@click.option(
    "--speaker-model", default=None, help="WavLMForXVector model id or folder [default: microsoft/wavlm-base-plus-sv]."
)
@click.option("--asr-batch-size", type=int, default=8, show_default=True)
@click.option("--asr-max-new-tokens", type=int, default=128, show_default=True, help="Most tokens per transcript.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N clips (N >= 1).")
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Evaluate the valid rows of a manifest with bad rows (listed in results.json) instead of refusing it.",
)
@_sampling_options
def evaluate_command(
    manifest,
    model,
    adapter,
    audio_tokenizer,
    device,
    dtype,
    out_dir,
    ref_manifest,
    asr_model,
    speaker_model,
    asr_batch_size,
    asr_max_new_tokens,
    limit,
    skip_invalid,
    options,
):
    """Generate every clip of a held-out MANIFEST and score it: WER/CER (ASR), speaker similarity
    (WavLM x-vector cosine with the voice prompt), duration ratio and stop rate.
    Writes OUT/results.json, OUT/results.csv and OUT/wavs/.

    \b
    Examples:
      higgs-tune evaluate data/heldout.jsonl --adapter runs/my-voice/final \\
          --asr-model openai/whisper-large-v3 --speaker-model microsoft/wavlm-base-plus-sv
      higgs-tune evaluate data/heldout.jsonl --adapter demo-run/run/final \\
          --asr-model demo-run/eval-models/asr --speaker-model demo-run/eval-models/speaker
    """
    # lazy: transformers, too slow for `higgs-tune --help`
    from higgs_tune.infer.evaluate import (
        DEFAULT_ASR_MODEL,
        DEFAULT_SPEAKER_MODEL,
        AsrModel,
        SpeakerModel,
        check_eval_out,
        default_eval_dir,
        evaluate_manifest,
    )

    if out_dir is None:
        out_dir = default_eval_dir(adapter)
        if out_dir is None:
            raise click.UsageError(
                "--out is required unless --adapter is a checkpoint folder of a run (then RUN_DIR/eval is used)."
            )
    check_eval_out(out_dir)  # before the slow loads
    # before the slow loads: a Hub id that cannot be fetched (offline) fails now, not after minutes
    for name, what, option in (
        (asr_model or DEFAULT_ASR_MODEL, "ASR model", "--asr-model"),
        (speaker_model or DEFAULT_SPEAKER_MODEL, "speaker model", "--speaker-model"),
    ):
        check_hub_source(name, what=what, option=option)
    stack = _load_stack(model, adapter, audio_tokenizer, device, dtype)
    device_obj = next(stack.model.parameters()).device
    asr = AsrModel.load(asr_model or DEFAULT_ASR_MODEL, device_obj)
    spk = SpeakerModel.load(speaker_model or DEFAULT_SPEAKER_MODEL, device_obj)
    doc = evaluate_manifest(
        stack,
        manifest,
        out_dir,
        asr=asr,
        speaker=spk,
        options=options,
        ref_manifest=ref_manifest,
        asr_batch_size=asr_batch_size,
        asr_max_new_tokens=asr_max_new_tokens,
        limit=limit,
        skip_invalid=skip_invalid,
        progress=TerminalProgress(),
    )
    s = doc["summary"]
    for row in doc["settings"].get("skipped_rows", []):
        click.secho(f"skipped {Path(manifest).name}:{row['row']} (id {row['id']!r}): {row['reason']}", fg="yellow")
    _evaluation_to_tensorboard(adapter, s)

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    click.echo(f"evaluated {s['num_clips']} clips -> {Path(out_dir) / 'results.json'}, results.csv")
    click.echo(
        f"  WER {fmt(s['wer'])}  CER {fmt(s['cer'])}  SIM {fmt(s['speaker_similarity'])}  "
        f"duration ratio {fmt(s['duration_ratio'])}  stop rate {fmt(s['stop_rate'])}"
    )
    for lang, m in doc["per_language"].items():
        click.echo(
            f"  [{lang}] {m['num_clips']} clips: WER {fmt(m['wer'])}  CER {fmt(m['cer'])}  SIM "
            f"{fmt(m['speaker_similarity'])}"
        )


def _evaluation_to_tensorboard(adapter, summary: dict) -> None:
    """When the adapter is a checkpoint of a run that logs to TensorBoard, add the scores there."""
    if adapter is None:
        return
    ckpt = Path(adapter)
    run_dir = ckpt.parent
    if not (run_dir / TENSORBOARD_DIR).is_dir() or not (ckpt / "manifest.json").is_file():
        return
    from higgs_tune.train.logging import log_evaluation  # lazy: torch

    log_evaluation(run_dir, summary, int(json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))["step"]))


# ----------------------------------------------------------------------------- export
@click.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--adapter",
    required=True,
    type=click.Path(file_okay=False),
    help="A run's checkpoint-N/ or final/ folder (or a PEFT adapter folder).",
)
@click.option(
    "--model", "model", default=None, help="Base model folder or Hub id (default: from the checkpoint's config.yaml)."
)
@click.option(
    "--audio-tokenizer",
    default=None,
    help=(
        "Audio tokenizer folder or id (default: MODEL/audio_tokenizer, else the one MODEL's processor names). "
        "Its Hub id, when it has one, is what the export records: the folder then loads after a move."
    ),
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Dtype of the saved weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in OUT_DIR.")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help=(
        "Largest weight file; bigger models are split into shards with an index (as on the Hub). "
        "v2 only: a v3 export keeps the released one-file layout."
    ),
)
@click.option(
    "--push-to-hub",
    "push_repo",
    metavar="REPO",
    default=None,
    help=(
        "Then upload OUT_DIR to this Hub repo; an audio tokenizer without a Hub id goes to "
        "REPO-audio-tokenizer. Uses your HF token."
    ),
)
@click.option("--private", is_flag=True, help="With --push-to-hub: create private repos.")
def export_command(out_dir, adapter, model, audio_tokenizer, dtype, overwrite, max_shard_size, push_repo, private):
    """Merge the adapter into the base model and save OUT_DIR: a folder that plain transformers
    loads (model, tokenizer, processor, audio_tokenizer/).

    \b
    Examples:
      higgs-tune export exports/my-voice --adapter runs/my-voice/final
      higgs-tune export exports/my-voice --adapter runs/my-voice/final --push-to-hub me/my-voice
    """
    from higgs_tune.infer.export import export_merged  # lazy: peft and transformers

    result = export_merged(
        model,
        adapter,
        out_dir,
        dtype=dtype,
        audio_tokenizer=audio_tokenizer,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
    )
    what = "LoRA merged" if result.merged_lora else "full fine-tune weights"
    click.echo(f"exported {result.out_dir} ({what}; {result.num_parameters:,} parameters, {dtype})")
    if result.use_text_head:
        click.echo("  includes text_lm_head: pass use_text_head=True to from_pretrained to keep it")
    for note in result.notes:
        click.secho(f"note: {note}", fg="yellow")
    if push_repo:
        from higgs_tune.infer.push import push_export

        url, codec = push_export(result.out_dir, push_repo, private=private)
        click.echo(f"uploaded to {url} (audio tokenizer: {codec})")


# ----------------------------------------------------------------------------- report
@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="Default: RUN_DIR/report.html.")
@click.option("--max-audio-mb", type=float, default=100.0, show_default=True, help="Most audio embedded into the page.")
def report_command(run_dir, out_file, max_audio_mb):
    """Write RUN_DIR/report.html: loss curves, health warnings, parameters, sample players and the
    evaluation, in one self-contained page.

    \b
    Examples:
      higgs-tune report runs/my-voice                      (writes runs/my-voice/report.html)
      higgs-tune report runs/my-voice --out share/my-voice.html --max-audio-mb 20
    """
    from higgs_tune.app.report import build_report  # lazy: reads train's constants, which load transformers

    path = build_report(run_dir, out_file, max_audio_mb=max_audio_mb)
    click.echo(f"report written to {path}")
