"""`higgs-tune prepare` and `higgs-tune inspect`: the data commands.

    higgs-tune prepare data/manifest.jsonl --model MODEL --out cache/train
    higgs-tune inspect cache/train                                   summary, histogram, outliers, rejects
    higgs-tune inspect cache/train --plot durations.png              + the histogram as a PNG
    higgs-tune inspect cache/train --config run.yaml --batches 4     the first 4 training batches, counted
    higgs-tune inspect cache/train --config run.yaml --show en_a_001 one sample, token by token

With --config, `inspect` builds samples and batches from the config by the pipeline's
`build_train_data` (the one `train` uses) (the model's processor, the data settings and seed,
epoch 0); CACHE_DIR stands in for `data.train_cache`. Without --config, `--model` names the
model and the data settings are the defaults.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from higgs_tune.config import Config, ConfigError, load_config
from higgs_tune.data.audio import DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS
from higgs_tune.data.cache import CodeCache
from higgs_tune.data.prepare import DEFAULT_BATCH_SECONDS, DEFAULT_PAD_TOLERANCE_S, DEFAULT_SHARD_SIZE, prepare_manifest
from higgs_tune.data.sources import convert_hf_dataset, convert_source
from higgs_tune.errors import TrainingHealthError


@click.command("prepare")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--model", "model", metavar="MODEL", help="Model folder with audio_tokenizer/, or an audio tokenizer folder."
)
@click.option(
    "--out",
    "out_dir",
    metavar="CACHE_DIR",
    help="Folder for the code cache (created; re-runs update it incrementally).",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help=(
        "Prepare the valid rows and list the others in CACHE_DIR/rejects.jsonl (default: any bad row stops with "
        "the full list and writes nothing)."
    ),
)
@click.option(
    "--batch-seconds",
    type=float,
    default=DEFAULT_BATCH_SECONDS,
    show_default=True,
    help="Padded audio per codec call; 0 encodes clips one by one.",
)
@click.option(
    "--pad-tolerance",
    "pad_tolerance_s",
    type=float,
    default=DEFAULT_PAD_TOLERANCE_S,
    show_default=True,
    help=(
        "Seconds of zero padding allowed when batching clips of different lengths (the codec has no padding mask, "
        "so padding can change a few codes); 0 = codes identical to one-by-one encoding."
    ),
)
@click.option("--normalize-loudness", is_flag=True, help="Scale each clip to -20 dBFS RMS, limited to a -1 dBFS peak.")
@click.option(
    "--min-seconds", type=float, default=DEFAULT_MIN_SECONDS, show_default=True, help="Shorter clips are invalid."
)
@click.option(
    "--max-seconds", type=float, default=DEFAULT_MAX_SECONDS, show_default=True, help="Longer clips are invalid."
)
@click.option("--allow-outside-root", is_flag=True, help="Accept audio paths outside the manifest's folder.")
@click.option(
    "--overwrite",
    is_flag=True,
    help=(
        "Rebuild CACHE_DIR from scratch (needed when it holds codes of another codec); with --from-folder, "
        "replace an existing manifest that differs (an identical one is reused); with --transcribe, replace "
        "an existing <manifest>.transcribed.jsonl."
    ),
)
@click.option(
    "--shard-size",
    type=int,
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Clips per shard file; an interrupted run loses at most one shard of work.",
)
@click.option("--device", default=None, help="Device for the codec (default: cuda if available, else cpu).")
@click.option(
    "--from-folder",
    "from_folder",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Convert a folder of <name>.wav + <name>.txt pairs (or with a metadata.json) into a manifest first.",
)
@click.option(
    "--transcribe",
    is_flag=True,
    help="Fill rows without text with --asr-model (written to <manifest>.transcribed.jsonl, marked "
    "text_source asr:MODEL; `inspect` lists them).",
)
@click.option("--asr-model", default=None, metavar="MODEL", help="With --transcribe: ASR model folder or Hub id.")
@click.option(
    "--hf-dataset",
    metavar="PATH_OR_NAME",
    help="Convert a Hugging Face `datasets` dataset (a save_to_disk folder, or an id in the local Hub cache) "
    "into a manifest first; its audio is written beside the manifest.",
)
@click.option("--split", default="train", show_default=True, help="With --hf-dataset: the split.")
@click.option("--audio-column", default="audio", show_default=True, help="With --hf-dataset: the audio column.")
@click.option("--text-column", default="text", show_default=True, help="With --hf-dataset: the transcript column.")
@click.option(
    "--speaker-column",
    default=None,
    help="With --hf-dataset: the speaker column (default: one speaker named after the dataset).",
)
@click.option(
    "--manifest-out",
    type=click.Path(dir_okay=False),
    help="With --from-folder / --hf-dataset: where to write the manifest (default: DIR/../<DIR name>.jsonl; "
    "<dataset name>-<split>.jsonl in the current folder).",
)
@click.option(
    "--language",
    default=None,
    metavar="CODE",
    help="Language code (e.g. en) for rows that name none; without it they are recorded as 'und' (unknown).",
)
def prepare_command(
    manifest,
    model,
    out_dir,
    skip_invalid,
    batch_seconds,
    pad_tolerance_s,
    normalize_loudness,
    min_seconds,
    max_seconds,
    allow_outside_root,
    overwrite,
    shard_size,
    device,
    from_folder,
    transcribe,
    asr_model,
    hf_dataset,
    split,
    audio_column,
    text_column,
    speaker_column,
    manifest_out,
    language,
):
    """Validate MANIFEST (JSON Lines: audio, text, speaker[, language, id, scene, ref_audio, ref_text])
    and encode its clips with the model's audio tokenizer into CACHE_DIR.

    \b
      higgs-tune prepare data/manifest.jsonl --model MODEL --out cache/train
      higgs-tune prepare --from-folder data/wavs --language en            (writes data/wavs.jsonl)
      higgs-tune prepare --from-folder LJSpeech-1.1 --language en --model MODEL --out cache/train
      higgs-tune prepare --hf-dataset data/my_ds --split train --speaker-column speaker --model MODEL --out cache/train

    --from-folder reads an LJSpeech folder (metadata.csv + wavs/), a metadata.json, or <name>.wav +
    <name>.txt pairs.
    """
    if sum(x is not None for x in (manifest, from_folder, hf_dataset)) > 1:
        raise click.UsageError("give one of MANIFEST, --from-folder DIR or --hf-dataset PATH_OR_NAME.")
    if not from_folder and not manifest and not hf_dataset:
        raise click.UsageError("give a MANIFEST (or --from-folder DIR / --hf-dataset PATH_OR_NAME to convert first).")
    if transcribe != (asr_model is not None):
        raise click.UsageError("--transcribe needs --asr-model MODEL (and --asr-model needs --transcribe).")
    if manifest and manifest_out:
        raise click.UsageError("--manifest-out only applies with --from-folder or --hf-dataset.")
    if (model is None) != (out_dir is None) or (manifest and model is None):
        raise click.UsageError("encoding needs both --model MODEL and --out CACHE_DIR.")

    if from_folder or hf_dataset:
        if from_folder:
            converted = convert_source(
                from_folder,
                manifest_out=manifest_out,
                overwrite=overwrite,
                language=language,
                missing_text_ok=transcribe,  # audio without a .txt: the ASR fills its text below
            )
        else:
            converted = convert_hf_dataset(
                hf_dataset,
                manifest_out or f"{Path(hf_dataset.rstrip('/')).name}-{split}.jsonl",
                split=split,
                audio_column=audio_column,
                text_column=text_column,
                speaker_column=speaker_column,
                language=language,
                overwrite=overwrite,
            )
        click.echo(
            f"{converted.manifest} is up to date ({converted.rows} rows)"
            if converted.unchanged
            else f"wrote {converted.manifest} ({converted.rows} rows)"
        )
        if converted.ignored_keys:
            click.echo(f"  metadata.json keys with no manifest field, not copied: {', '.join(converted.ignored_keys)}")
        if converted.outside_root:
            click.echo("  some audio lies outside the manifest's folder: prepare it with --allow-outside-root")
        if model is None:
            return
        manifest = converted.manifest

    # lazy: the family selector loads transformers, too slow for `higgs-tune --help`
    from higgs_tune.families.select import load_codec_for

    if transcribe:
        from higgs_tune.infer.evaluate import AsrModel  # lazy: transformers
        from higgs_tune.infer.transcribe import check_transcribed_target, transcribe_missing, transcribed_path
        from higgs_tune.progress import TerminalProgress

        check_transcribed_target(transcribed_path(manifest), overwrite)  # before the ASR model loads
        filled = transcribe_missing(
            manifest, AsrModel.load(asr_model), language=language, progress=TerminalProgress(), overwrite=overwrite
        )
        if filled.transcribed:
            click.echo(f"transcribed {len(filled.transcribed)} row(s) with {asr_model} -> {filled.manifest}")
        manifest = filled.manifest
    try:
        result = prepare_manifest(
            manifest,
            model,
            out_dir,
            load_codec=load_codec_for,
            skip_invalid=skip_invalid,
            batch_seconds=batch_seconds,
            pad_tolerance_s=pad_tolerance_s,
            normalize_loudness=normalize_loudness,
            min_seconds=min_seconds,
            max_seconds=max_seconds,
            allow_outside_root=allow_outside_root,
            overwrite=overwrite,
            shard_size=shard_size,
            device=device,
            progress=True,
            log=lambda msg: click.echo(msg, err=True),
            language=language,
        )
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: finished shards in {out_dir} are kept; run the same command again to resume.", err=True
        )
        sys.exit(130)
    click.echo(result.summary())


# ----------------------------------------------------------------------------- inspect
def _load_config(config_path: str | None, model: str | None, cache_dir: Path):
    if config_path:
        try:
            cfg = load_config(config_path, [f"data.train_cache={cache_dir}"])
        except ConfigError as e:
            raise click.BadParameter(str(e), param_hint="--config") from None
        if model:
            cfg.model.name_or_path = model
        return cfg
    if not model:
        raise click.UsageError(
            "--batches and --show need the model's tokenizer: pass --config CONFIG.yaml (or --model MODEL)."
        )
    cfg = Config()
    cfg.model.name_or_path = model
    cfg.data.train_cache = str(cache_dir)
    return cfg


def _processor_and_tokens(cfg):
    # lazy: transformers and the model loader would slow every `higgs-tune` start
    import transformers

    from higgs_tune.families.select import family_for

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would interleave with the report
    family = family_for(cfg.model.name_or_path, cfg.model.family)
    processor = family.load_processor(cfg.model.name_or_path, cfg.model.audio_tokenizer)
    return family, processor, family.special_tokens(processor)


@click.command("inspect")
@click.argument("cache_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the duration histogram as a PNG to this path.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Training config: build batches and samples exactly as `train` would.",
)
@click.option("--model", help="Model folder or id for --batches/--show without --config (or to override the config's).")
@click.option(
    "--batches",
    "num_batches",
    type=click.IntRange(min=1),
    help="Build this many training batches and count their tokens.",
)
@click.option(
    "--show", "show_id", metavar="ID", help="Render one training sample token by token beside its generation prompt."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the statistics as JSON."
)
@click.option(
    "--memory",
    "memory_config",
    type=click.Path(dir_okay=False),
    metavar="CONFIG",
    help="Predict the GPU memory of training as CONFIG says (weights, gradients, optimizer states, "
    "activations with and without gradient checkpointing, loss heads); no CACHE_DIR needed.",
)
def inspect_command(cache_dir, plot_path, config_path, model, num_batches, show_id, json_path, memory_config):
    """Clips, hours, speakers, languages, durations, text/audio outliers and rejected rows of
    CACHE_DIR; with --batches, the token accounting of real training batches; with --show, one
    sample with its labels, checked against the prompt that generation builds.

    \b
    Examples:
      higgs-tune inspect cache/train --plot durations.png
      higgs-tune inspect cache/train --config configs/lora-1gpu.yaml --batches 4
      higgs-tune inspect --memory configs/lora-24gb.yaml
    """
    if memory_config is not None:
        from higgs_tune.model.memory import memory_report  # lazy: torch, too slow for `higgs-tune --help`

        try:
            cfg = load_config(memory_config)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        click.echo(memory_report(cfg))
        return
    if cache_dir is None:
        raise click.UsageError("give CACHE_DIR (a folder written by `higgs-tune prepare`), or --memory CONFIG.")
    # lazy: data.inspect, data.pipeline and train.health load transformers, too slow for `higgs-tune --help`
    from higgs_tune.data.inspect import (
        check_cache_fits_model,
        render_summary,
        summarize_cache,
    )
    from higgs_tune.data.pipeline import build_train_data, first_batches
    from higgs_tune.data.plot import write_histogram_png
    from higgs_tune.train.recipe import family_data

    cache = CodeCache.open(cache_dir)
    report: dict = {}
    summary = summarize_cache(cache)
    report["summary"] = summary
    if num_batches is None and show_id is None:
        click.echo(render_summary(summary))
    if plot_path is not None:
        write_histogram_png(plot_path, summary["histogram"])
        click.echo(f"duration histogram written to {plot_path}")

    problem = None
    if num_batches is not None or show_id is not None:
        # the recipe's own builder: the samples and batches shown are the ones `train` would use

        cfg = _load_config(config_path, model, cache.cache_dir)
        family, processor, tokens = _processor_and_tokens(cfg)
        check_cache_fits_model(cache, tokens, cfg.model.name_or_path)
        data = build_train_data(cfg, processor, family_data=family_data(family, cfg, processor))
        if show_id is not None:
            data.train_set.set_epoch(0)
            click.echo(family.render_sample(data.train_set, show_id, processor.tokenizer, tokens))
        if num_batches is not None:
            if show_id is not None:
                click.echo("")
            batches = first_batches(data.train_set, data.sampler, data.collator, num_batches)
            stats, text = family.first_batch_report(batches, tokens)
            report["batches"] = stats
            click.echo(text)
            try:
                family.check_first_batches(stats)
            except TrainingHealthError as e:
                problem = e  # raised after the JSON is written, so the numbers are kept
            else:
                click.echo(
                    "\ntrainable: every batch has trained target audio and one EOS label per codebook and target "
                    "segment"
                )

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        click.echo(f"statistics written to {json_path}")
    if problem is not None:
        raise problem
