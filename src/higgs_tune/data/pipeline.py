"""From prepared code caches to training batches: the one builder `train` and `inspect` share.

caches -> TTSDataset (train / held-out) -> TokenBudgetBatchSampler (this rank's shard) -> Collator
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from higgs_tune.config import Config
from higgs_tune.data.cache import CodeCache, check_cache_codec
from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler
from higgs_tune.data.dataset import TTSDataset, V2SampleLayout, split_ids
from higgs_tune.data.layout import SpecialTokens
from higgs_tune.data.prepare import codec_fingerprints
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


def check_data_codec(data: TrainData, processor, model_name: str = "this model") -> None:
    """Training: the train (and held-out) caches were encoded by the model's own codec."""
    codec = getattr(processor, "audio_tokenizer", None)
    if codec is None or not hasattr(codec, "state_dict"):
        return
    mine = codec_fingerprints(codec)  # today's and the legacy one (caches prepared before 2026-12-03)
    for dataset in (data.train_set, data.eval_set):
        if dataset is not None:
            check_cache_codec(dataset.cache, mine, model_name)


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


@dataclass(frozen=True)
class FamilyData:
    """The model family's data pieces, passed in by the caller (data/ does not import families/):
    its special tokens, sample layout (`dataset.SampleLayout`) and collator. (The cache's codec is
    checked against the model's by `check_data_codec`, for every family.)"""

    tokens: object
    layout: object
    collator: object


def v2_family_data(cfg: Config, processor) -> FamilyData:
    """Higgs Audio v2's pieces (the default when no family is given)."""
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer, processor)
    return FamilyData(tokens, V2SampleLayout(cfg.data.system_prompt, cfg.data.use_scene), Collator(tokens))


def build_train_data(
    cfg: Config, processor, *, num_replicas: int = 1, rank: int = 0, family_data: FamilyData | None = None
) -> TrainData:
    """Caches -> datasets (train / held-out) -> sampler -> collator, exactly as training uses them."""
    d, seed = cfg.data, cfg.train.seed
    fam = family_data if family_data is not None else v2_family_data(cfg, processor)
    tokens = fam.tokens
    train_cache = CodeCache.open(d.train_cache)
    common = dict(
        task=d.task,
        clone_probability=d.clone_probability,
        system_prompt=d.system_prompt,
        use_scene=d.use_scene,
        seed=seed,
        max_sequence_length=d.max_sequence_length,
        layout=fam.layout,
    )
    train_ids, eval_ids = None, None
    if d.eval_fraction:
        train_ids, eval_ids = split_ids(train_cache.entries, d.eval_fraction, seed)
    train_set = TTSDataset(train_cache, tokens, processor.tokenizer, ids=train_ids, **common)
    check_cloning_references(train_set, d.task)
    eval_set = None
    if d.eval_cache:
        eval_cache = CodeCache.open(d.eval_cache)
        eval_set = TTSDataset(eval_cache, tokens, processor.tokenizer, **common)
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
    return TrainData(train_set, eval_set, sampler, fam.collator, tokens)


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
