"""`higgs-tune inspect CACHE_DIR`: what a prepared cache holds and what training will see.

    higgs-tune inspect cache/train                                   summary, histogram, outliers, rejects
    higgs-tune inspect cache/train --plot durations.png              + the histogram as a PNG
    higgs-tune inspect cache/train --config run.yaml --batches 4     the first 4 training batches, counted
    higgs-tune inspect cache/train --config run.yaml --show en_a_001 one sample, token by token

With --config, samples and batches are built from the config by the pipeline's
`build_train_data` (the one `train` uses) (the model's processor, the data settings and seed, epoch 0); CACHE_DIR
stands in for `data.train_cache`. Without --config, `--model` names the model and the data
settings are the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _load_config(config_path: str | None, model: str | None, cache_dir: Path):
    from higgs_tune.config import Config, ConfigError, load_config

    if config_path:
        try:
            cfg = load_config(config_path, [f"data.train_cache={cache_dir}"])
        except ConfigError as e:
            raise click.BadParameter(str(e), param_hint="--config") from None
        if model:
            cfg.model.name_or_path = model
        return cfg
    if not model:
        raise click.UsageError("--batches and --show need the model's tokenizer: pass --config CONFIG.yaml (or --model MODEL).")
    cfg = Config()
    cfg.model.name_or_path = model
    cfg.data.train_cache = str(cache_dir)
    return cfg


def _processor_and_tokens(cfg):
    import transformers

    from higgs_tune.data.layout import SpecialTokens
    from higgs_tune.model.load import load_processor

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would interleave with the report
    processor = load_processor(cfg.model.name_or_path, cfg.model.audio_tokenizer)
    return processor, SpecialTokens.from_tokenizer(processor.tokenizer, processor)


@click.command("inspect")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the duration histogram as a PNG to this path.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Training config: build batches and samples exactly as `train` would.")
@click.option("--model", help="Model folder or id for --batches/--show without --config (or to override the config's).")
@click.option("--batches", "num_batches", type=click.IntRange(min=1), help="Build this many training batches and count their tokens.")
@click.option("--show", "show_id", metavar="ID", help="Render one training sample token by token beside its generation prompt.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the statistics as JSON.")
def inspect_command(cache_dir, plot_path, config_path, model, num_batches, show_id, json_path):
    """Clips, hours, speakers, languages, durations, text/audio outliers and rejected rows of
    CACHE_DIR; with --batches, the token accounting of real training batches; with --show, one
    sample with its labels, checked against the prompt that generation builds."""
    from higgs_tune.data.cache import CodeCache
    from higgs_tune.data.inspect import (
        batch_statistics,
        check_cache_fits_model,
        render_batch_statistics,
        render_sample,
        render_summary,
        sample_and_prompt,
        summarize_cache,
    )
    from higgs_tune.data.pipeline import first_batches
    from higgs_tune.data.plot import write_histogram_png
    from higgs_tune.train.health import check_trainable

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
        from higgs_tune.data.pipeline import build_train_data

        cfg = _load_config(config_path, model, cache.cache_dir)
        processor, tokens = _processor_and_tokens(cfg)
        check_cache_fits_model(cache, tokens, cfg.model.name_or_path)
        data = build_train_data(cfg, processor)
        if show_id is not None:
            data.train_set.set_epoch(0)
            sample, prompt = sample_and_prompt(data.train_set, show_id)
            click.echo(render_sample(sample, prompt, processor.tokenizer, tokens))
        if num_batches is not None:
            if show_id is not None:
                click.echo("")
            batches = first_batches(data.train_set, data.sampler, data.collator, num_batches)
            stats = batch_statistics(batches, tokens.stream_bos, tokens.stream_eos)
            report["batches"] = stats
            click.echo(render_batch_statistics(stats))
            from higgs_tune.errors import TrainingHealthError

            try:
                check_trainable(stats)
            except TrainingHealthError as e:
                problem = e  # raised after the JSON is written, so the numbers are kept
            else:
                click.echo("\ntrainable: every batch has trained target audio and one EOS label per codebook and target segment")

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        click.echo(f"statistics written to {json_path}")
    if problem is not None:
        raise problem
