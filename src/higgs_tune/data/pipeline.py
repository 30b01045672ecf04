"""From prepared code caches to training batches: the one builder `train` and `inspect` share.

caches -> TTSDataset (train / held-out) -> TokenBudgetBatchSampler (this rank's shard) -> Collator
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from higgs_tune.config import Config
from higgs_tune.data.cache import CodeCache
from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler
from higgs_tune.data.dataset import TTSDataset, split_ids
from higgs_tune.data.layout import SpecialTokens
from higgs_tune.data.prepare import codec_fingerprint
from higgs_tune.errors import DataError

log = logging.getLogger("higgs_tune.data")


@dataclass
class TrainData:
    """Everything the loop needs to draw batches; the same builder serves `higgs-tune inspect`."""

    train_set: object  # TTSDataset
    eval_set: object | None
    sampler: object  # TokenBudgetBatchSampler (this rank's shard)
    collator: object  # Collator
    tokens: object  # SpecialTokens

    def batches(self, epoch: int):
        """Yield the collated batches of this rank for `epoch`, from where the sampler stands."""
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        for indices in self.sampler:
            yield self.collator([self.train_set[i] for i in indices])

    def eval_batches(self):
        if self.eval_set is None:
            return
        sampler = TokenBudgetBatchSampler(
            self.eval_set.lengths,
            self.sampler.max_tokens,
            self.sampler.max_batch_size,
            shuffle=False,
            seed=0,
            num_replicas=self.sampler.num_replicas,
            rank=self.sampler.rank,
        )
        sampler.set_epoch(0)
        for indices in sampler:
            yield self.collator([self.eval_set[i] for i in indices])


def check_cache_codec(cache: CodeCache, processor) -> None:
    """Refuse a cache encoded by another audio tokenizer than the model's: its codes would mean
    other sounds to the model (the loss falls, nothing useful is learned)."""
    codec = getattr(processor, "audio_tokenizer", None)
    if codec is None or not hasattr(codec, "state_dict"):
        return
    mine = codec_fingerprint(codec)
    if mine != cache.codec_fingerprint:
        source = cache.header.get("codec_source")
        raise DataError(
            f"{cache.cache_dir} was encoded by another audio tokenizer (fingerprint {cache.codec_fingerprint[:12]}, "
            f"from {source!r}) than the one this model loads (fingerprint {mine[:12]}): its codes mean other sounds "
            "to this model. Fix: prepare the cache again with the model you train "
            f"(higgs-tune prepare MANIFEST --model MODEL --out {cache.cache_dir} --overwrite), or set "
            "model.name_or_path / model.audio_tokenizer to the codec that made it."
        )


def check_data_codec(data: TrainData, processor) -> None:
    """Training: the train (and held-out) caches were encoded by the model's own codec."""
    for dataset in (data.train_set, data.eval_set):
        if dataset is not None:
            check_cache_codec(dataset.cache, processor)


def speakers_without_reference(dataset: TTSDataset) -> list[str]:
    """Speakers none of whose clips can be voice-cloned: a single clip and no explicit ref_audio."""
    clips: dict[str, list] = {}
    for e in dataset.entries:
        clips.setdefault(e.speaker, []).append(e)
    return sorted(s for s, es in clips.items() if len(es) < 2 and all(e.ref_key is None for e in es))


def check_cloning_references(dataset: TTSDataset, task: str) -> None:
    """data.task voice_clone / mixed needs a second clip (or a ref_audio) per speaker: a speaker
    with one clip is trained as plain TTS. Warn naming them; refuse when task is voice_clone and
    no clip at all can be cloned (the run would train no cloning)."""
    if task == "tts":
        return
    alone = speakers_without_reference(dataset)
    if not alone:
        return
    shown = ", ".join(alone[:10]) + (f" and {len(alone) - 10} more" if len(alone) > 10 else "")
    speakers = len({e.speaker for e in dataset.entries})
    if task == "voice_clone" and len(alone) == speakers:
        raise DataError(
            f"data.task is voice_clone but no speaker of {dataset.cache.cache_dir} has a second clip or a ref_audio "
            f"({shown}): every sample would be plain TTS and no cloning would be trained. Fix: add a second clip per "
            "speaker (or ref_audio/ref_text to the rows) and prepare again, or set data.task: tts."
        )
    log.warning(
        "data: %d of %d speaker(s) have a single clip and no ref_audio, so their samples are plain TTS, never "
        "voice cloning (data.task %s): %s. Add a second clip (or ref_audio) per speaker to clone those voices.",
        len(alone),
        speakers,
        task,
        shown,
    )


def build_train_data(cfg: Config, processor, *, num_replicas: int = 1, rank: int = 0) -> TrainData:
    """Caches -> datasets (train / held-out) -> sampler -> collator, exactly as training uses them."""
    d, seed = cfg.data, cfg.train.seed
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer, processor)
    train_cache = CodeCache.open(d.train_cache)
    common = dict(
        task=d.task,
        clone_probability=d.clone_probability,
        system_prompt=d.system_prompt,
        use_scene=d.use_scene,
        seed=seed,
        max_sequence_length=d.max_sequence_length,
    )
    train_ids, eval_ids = None, None
    if d.eval_fraction:
        train_ids, eval_ids = split_ids(train_cache.entries, d.eval_fraction, seed)
    train_set = TTSDataset(train_cache, tokens, processor.tokenizer, ids=train_ids, **common)
    check_cloning_references(train_set, d.task)
    eval_set = None
    if d.eval_cache:
        eval_set = TTSDataset(CodeCache.open(d.eval_cache), tokens, processor.tokenizer, **common)
    elif eval_ids:
        eval_set = TTSDataset(train_cache, tokens, processor.tokenizer, ids=eval_ids, **common)
    sampler = TokenBudgetBatchSampler(
        train_set.lengths,
        d.max_tokens_per_batch,
        d.max_batch_size,
        shuffle=True,
        seed=seed,
        bucket_size=d.bucket_size,
        num_replicas=num_replicas,
        rank=rank,
    )
    return TrainData(train_set, eval_set, sampler, Collator(tokens), tokens)


def first_batches(dataset, sampler, collator, n: int, epoch: int = 0) -> list[dict]:
    """The first `n` collated batches of `epoch` (fewer if the epoch is shorter), for a look
    before training (`train` checks them before the model loads, `higgs-tune inspect --batches`
    counts them). The sampler is left at the start of `epoch`: nothing counts as consumed.
    """
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    out = []
    for indices in sampler:
        if len(out) == n:
            break
        out.append(collator([dataset[i] for i in indices]))
    sampler.set_epoch(epoch)  # iterating counted as consumption; start the epoch afresh
    return out
