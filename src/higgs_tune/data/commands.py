"""`higgs-tune prepare`: validate a manifest and cache its audio codes (or convert a folder first)."""

from __future__ import annotations

import sys

import click

from higgs_tune.data.audio import DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS
from higgs_tune.data.prepare import DEFAULT_BATCH_SECONDS, DEFAULT_PAD_TOLERANCE_S, DEFAULT_SHARD_SIZE


@click.command("prepare")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "model", metavar="MODEL", help="Model folder with audio_tokenizer/, or an audio tokenizer folder.")
@click.option("--out", "out_dir", metavar="CACHE_DIR", help="Folder for the code cache (created; re-runs update it incrementally).")
@click.option("--skip-invalid", is_flag=True, help="Prepare the valid rows and list the others in CACHE_DIR/rejects.jsonl (default: any bad row stops with the full list and writes nothing).")
@click.option("--batch-seconds", type=float, default=DEFAULT_BATCH_SECONDS, show_default=True, help="Padded audio per codec call; 0 encodes clips one by one.")
@click.option("--pad-tolerance", "pad_tolerance_s", type=float, default=DEFAULT_PAD_TOLERANCE_S, show_default=True, help="Seconds of zero padding allowed when batching clips of different lengths (the codec has no padding mask, so padding can change a few codes); 0 = codes identical to one-by-one encoding.")
@click.option("--normalize-loudness", is_flag=True, help="Scale each clip to -20 dBFS RMS, limited to a -1 dBFS peak.")
@click.option("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS, show_default=True, help="Shorter clips are invalid.")
@click.option("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS, show_default=True, help="Longer clips are invalid.")
@click.option("--allow-outside-root", is_flag=True, help="Accept audio paths outside the manifest's folder.")
@click.option("--overwrite", is_flag=True, help="Rebuild CACHE_DIR from scratch (needed when it holds codes of another codec); with --from-folder, replace an existing manifest that differs (an identical one is reused).")
@click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True, help="Clips per shard file; an interrupted run loses at most one shard of work.")
@click.option("--device", default=None, help="Device for the codec (default: cuda if available, else cpu).")
@click.option("--from-folder", "from_folder", type=click.Path(file_okay=False), metavar="DIR", help="Convert a folder of <name>.wav + <name>.txt pairs (or with a metadata.json) into a manifest first.")
@click.option("--manifest-out", type=click.Path(dir_okay=False), help="With --from-folder: where to write the manifest (default: DIR/../<DIR name>.jsonl).")
@click.option("--language", default=None, help="With --from-folder: language code for rows whose metadata has none.")
def prepare_command(manifest, model, out_dir, skip_invalid, batch_seconds, pad_tolerance_s, normalize_loudness, min_seconds,
                    max_seconds, allow_outside_root, overwrite, shard_size, device, from_folder, manifest_out, language):
    """Validate MANIFEST (JSON Lines: audio, text, speaker, language[, id, scene, ref_audio, ref_text])
    and encode its clips with the model's audio tokenizer into CACHE_DIR.

    \b
      higgs-tune prepare data/manifest.jsonl --model MODEL --out cache/train
      higgs-tune prepare --from-folder data/wavs --language en            (writes data/wavs.jsonl)
      higgs-tune prepare --from-folder data/wavs --language en --model MODEL --out cache/train
    """
    from higgs_tune.data.manifest import convert_folder
    from higgs_tune.data.prepare import prepare_manifest

    if from_folder and manifest:
        raise click.UsageError("give either MANIFEST or --from-folder DIR, not both.")
    if not from_folder and not manifest:
        raise click.UsageError("give a MANIFEST (or --from-folder DIR to convert a folder first).")
    if not from_folder and (manifest_out or language):
        raise click.UsageError("--manifest-out and --language only apply with --from-folder.")
    if (model is None) != (out_dir is None) or (manifest and model is None):
        raise click.UsageError("encoding needs both --model MODEL and --out CACHE_DIR.")

    if from_folder:
        converted = convert_folder(from_folder, manifest_out=manifest_out, overwrite=overwrite, language=language)
        click.echo(f"{converted.manifest} is up to date ({converted.rows} rows)" if converted.unchanged else f"wrote {converted.manifest} ({converted.rows} rows)")
        if converted.ignored_keys:
            click.echo(f"  metadata.json keys with no manifest field, not copied: {', '.join(converted.ignored_keys)}")
        if converted.outside_root:
            click.echo("  some audio lies outside the manifest's folder: prepare it with --allow-outside-root")
        if model is None:
            return
        manifest = converted.manifest

    try:
        result = prepare_manifest(
            manifest, model, out_dir, skip_invalid=skip_invalid, batch_seconds=batch_seconds, pad_tolerance_s=pad_tolerance_s,
            normalize_loudness=normalize_loudness, min_seconds=min_seconds, max_seconds=max_seconds,
            allow_outside_root=allow_outside_root, overwrite=overwrite, shard_size=shard_size,
            device=device, progress=True, log=lambda msg: click.echo(msg, err=True),
        )
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished shards in {out_dir} are kept; run the same command again to resume.", err=True)
        sys.exit(130)
    click.echo(result.summary())
