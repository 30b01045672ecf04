"""Data pipeline: batched `prepare` vs per-clip encoding; batches from the cache vs the processor.

On the bundled demo data (26 training clips + their references) with the tiny stack:

1. prepare, clips/s of the encoding phase (`PrepareResult.clips_per_second`: read + resample +
   codec), default batching (`--batch-seconds 60`, clips of equal frame count share a codec
   call) vs `--batch-seconds 0` (one codec call per clip). Each repeat writes a fresh cache.
   The demo clips mostly differ in frame count, so little can be batched there; a second row
   uses synthetic clips of one length, where every clip can share a call.
2. a training epoch's batches, batches/s: `TTSDataset` (codes from the cache) + `Collator`, vs
   the same samples encoded at every step through `HiggsAudioV2Processor.apply_chat_template`
   (what a trainer without a cache does). The waveforms are decoded and resampled once up
   front, so the processor path is timed for its codec + tokenizer work only (kinder to it than
   a real cache-less trainer, which also reads the audio files every step). Target: >= 20x.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import DEMO_MANIFEST, demo_dataset, interleaved_medians, row, tiny_stack_dir, workdir

TARGET_COLLATE = 20.0


def equal_length_manifest(n: int, seconds: float = 3.0) -> Path:
    """`n` synthetic clips of exactly `seconds` at 24 kHz (harmonic tones + noise): the case where
    every clip can share a codec call, unlike the demo clips whose frame counts mostly differ."""
    import json

    import numpy as np
    import soundfile as sf

    folder = workdir() / f"equal-{n}"
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(24000 * seconds)) / 24000
    rows = []
    for i in range(n):
        f0 = 100 + 10 * i
        wave = sum(0.2 / h * np.sin(2 * np.pi * f0 * h * t) for h in (1, 2, 3)) + 0.01 * rng.standard_normal(t.size)
        sf.write(folder / "audio" / f"c{i:03d}.wav", wave.astype(np.float32), 24000, subtype="PCM_16")
        rows.append(
            {
                "id": f"c{i:03d}",
                "audio": f"audio/c{i:03d}.wav",
                "text": "A synthetic clip of three seconds.",
                "speaker": "s",
                "language": "en",
            }
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def _prepare_rates(manifest, repeats: int) -> tuple[float, float, int]:
    """Median clips/s of the encoding phase, batched (default) and per clip, fresh cache each run."""
    import statistics

    from higgs_tune.data.prepare import prepare_manifest

    rates = {"batched": [], "per_clip": []}
    clips = 0
    for rep in range(repeats):
        for name, batch_seconds in (("batched", 60.0), ("per_clip", 0.0)):
            out = workdir() / f"prepare-{name}-{rep}"
            result = prepare_manifest(manifest, tiny_stack_dir(), out, batch_seconds=batch_seconds, progress=False)
            rates[name].append(result.clips_per_second)
            clips = result.encoded
            shutil.rmtree(out)
    return statistics.median(rates["per_clip"]), statistics.median(rates["batched"]), clips


def prepare_rows(quick: bool) -> list[dict]:
    repeats = 2 if quick else 3
    per_clip, batched, clips = _prepare_rates(DEMO_MANIFEST, repeats)
    rows = [
        row(
            "data",
            "prepare clips/s, demo data",
            "per-clip encode (--batch-seconds 0)",
            "batched prepare (default)",
            per_clip,
            batched,
            note=(
                f"{clips} distinct clips of 1.5-2.9 s (few share a frame count), tiny codec, encode phase, median "
                f"of {repeats} fresh runs"
            ),
        )
    ]
    n = 32 if quick else 64
    per_clip, batched, clips = _prepare_rates(equal_length_manifest(n), repeats)
    rows.append(
        row(
            "data",
            "prepare clips/s, equal-length clips",
            "per-clip encode (--batch-seconds 0)",
            "batched prepare (default)",
            per_clip,
            batched,
            note=(
                f"{clips} synthetic clips of 3.0 s (all batchable), tiny codec, encode phase, median of {repeats} "
                "fresh runs"
            ),
        )
    )
    return rows


def collate_rows(quick: bool) -> list[dict]:
    import numpy as np

    from higgs_tune.config import DataConfig
    from higgs_tune.data.audio import read_audio, to_codec_input
    from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler
    from higgs_tune.data.layout import Conversation
    from higgs_tune.model.load import load_processor

    data = DataConfig()
    dataset = demo_dataset(data)
    tokens = dataset.tokens
    sampler = TokenBudgetBatchSampler(
        dataset.lengths, data.max_tokens_per_batch, data.max_batch_size, seed=0, bucket_size=data.bucket_size
    )
    batches = list(sampler)
    collate = Collator(tokens)
    processor = load_processor(tiny_stack_dir())
    rate = processor.audio_tokenizer.config.sample_rate

    root = DEMO_MANIFEST.parent
    wave_by_key: dict[str, np.ndarray] = {}
    for e in dataset.cache.entries:
        samples, sr = read_audio(root / e.audio)
        wave_by_key[e.key] = to_codec_input(samples, sr, rate)
    conversations = []
    for b in batches:
        convs = []
        for i in b:
            plan, entry = dataset.plan(i), dataset.entries[i]
            conv = Conversation(text=entry.text, system_prompt=data.system_prompt, ref_text=plan.ref_text)
            convs.append(
                conv.messages(
                    ref_audio=wave_by_key[plan.ref_key] if plan.ref_key else None, target_audio=wave_by_key[entry.key]
                )
            )
        conversations.append(convs)

    def from_cache():
        for b in batches:
            collate([dataset[i] for i in b])

    def through_processor():
        for convs in conversations:
            processor.apply_chat_template(
                convs,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"sampling_rate": rate, "output_labels": True},
            )

    times = interleaved_medians(
        {"cache": from_cache, "processor": through_processor}, repeats=3 if quick else 5, warmup=1
    )
    n = len(batches)
    return [
        row(
            "data",
            "training batches/s",
            "processor.apply_chat_template per step",
            "cache + Collator",
            n / times["processor"],
            n / times["cache"],
            target=f">= {TARGET_COLLATE:g}x",
            met=times["processor"] / times["cache"] >= TARGET_COLLATE,
            note=(
                f"one epoch of the demo data = {n} batches ({len(dataset)} samples, task mixed), waveforms "
                "preloaded for the processor"
            ),
        )
    ]


def run(quick: bool = False) -> list[dict]:
    return prepare_rows(quick) + collate_rows(quick)
