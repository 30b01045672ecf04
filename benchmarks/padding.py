"""Padding waste with and without length bucketing (`TokenBudgetBatchSampler`).

Two length distributions, each batched exactly as training batches them:
- bundled: the demo data prepared with the tiny stack, sample lengths from `TTSDataset.lengths`
  (task mixed: about half the samples carry a reference clip), with the batching settings of
  configs/demo-tiny-cpu.yaml (2048 tokens per batch, at most 8 samples);
- synthetic: clips uniform in 2-20 s (25 frames/s) with ~14 characters of text per second, TTS
  samples, lengths from `layout.sample_lengths` (the same count the dataset uses), with the
  default `data.*` settings (4096 tokens per batch, at most 16 samples).
"Without bucketing" is `bucket_size=0` (batches follow the shuffled order); "with" is the
default `bucket_size=64`. Waste = padded positions / all positions; median over epochs.
Target: < 10% with bucketing.
"""

from __future__ import annotations

import random
import statistics

from benchmarks import row, synthetic_text, tiny_text_stack
from higgs_tune.config import DataConfig

TARGET = 0.10


def synthetic_lengths(n: int, seed: int = 0, low_s: float = 2.0, high_s: float = 20.0) -> list[int]:
    from higgs_tune.data.layout import Conversation, sample_lengths

    tokenizer, tokens = tiny_text_stack()
    rng = random.Random(seed)
    seconds = [rng.uniform(low_s, high_s) for _ in range(n)]
    convs = [Conversation.tts(synthetic_text(s, rng)) for s in seconds]
    return sample_lengths(convs, tokenizer, tokens, [round(25 * s) for s in seconds])


def waste(lengths_for_epoch, bucket_size: int, epochs: int, data: DataConfig) -> float:
    """Median padding waste over `epochs` epochs of the training sampler."""
    from higgs_tune.data.collate import TokenBudgetBatchSampler, padding_waste

    sampler = TokenBudgetBatchSampler(
        lengths_for_epoch,
        max_tokens=data.max_tokens_per_batch,
        max_batch_size=data.max_batch_size,
        shuffle=True,
        seed=0,
        bucket_size=bucket_size,
    )
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(padding_waste(list(sampler), sampler.lengths(epoch)))
    return statistics.median(out)


def demo_data_config() -> DataConfig:
    """The `data:` batching settings of configs/demo-tiny-cpu.yaml (the config that trains on the demo data)."""
    import yaml

    from benchmarks import REPO

    section = yaml.safe_load((REPO / "configs" / "demo-tiny-cpu.yaml").read_text(encoding="utf-8"))["data"]
    keys = ("task", "clone_probability", "max_tokens_per_batch", "max_batch_size", "max_sequence_length", "bucket_size")
    return DataConfig(**{k: section[k] for k in keys if k in section})


def compare(name: str, lengths_for_epoch, epochs: int, note: str, data: DataConfig) -> dict:
    without = waste(lengths_for_epoch, 0, epochs, data)
    with_ = waste(lengths_for_epoch, data.bucket_size, epochs, data)
    return row(
        "padding",
        f"padding waste, {name}",
        "no bucketing",
        f"bucket_size {data.bucket_size}",
        100 * without,
        100 * with_,
        target="< 10% with bucketing",
        met=with_ < TARGET,
        note=(
            f"% of padded positions, median of {epochs} epochs; {data.max_tokens_per_batch} tokens/batch, <= "
            f"{data.max_batch_size} samples; {note}"
        ),
    )


def run(quick: bool = False) -> list[dict]:
    from benchmarks import demo_dataset

    epochs = 3 if quick else 7
    rows = []
    demo = demo_data_config()
    dataset = demo_dataset(demo)
    rows.append(
        compare(
            "bundled demo",
            dataset.lengths,
            epochs,
            f"{len(dataset)} clips, task {demo.task}, lengths {min(dataset.lengths(0))}-{max(dataset.lengths(0))} "
            "tokens, configs/demo-tiny-cpu.yaml",
            demo,
        )
    )
    defaults = DataConfig()
    rows.append(
        compare(
            "bundled demo, default data.*",
            demo_dataset(defaults).lengths,
            epochs,
            f"{len(dataset)} clips, task {defaults.task}, lengths bimodal (with/without a reference)",
            defaults,
        )
    )
    n = 2000 if quick else 10000
    lengths = synthetic_lengths(n)
    rows.append(
        compare(
            "synthetic 2-20 s",
            lengths,
            epochs,
            f"{n} clips, uniform 2-20 s, TTS, lengths {min(lengths)}-{max(lengths)} tokens, default data.*",
            DataConfig(),
        )
    )
    return rows
