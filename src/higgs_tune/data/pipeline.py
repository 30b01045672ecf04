"""From prepared code caches to training batches: the one builder `train` and `inspect` share.

caches -> TTSDataset (train / held-out) -> TokenBudgetBatchSampler (this rank's shard) -> Collator
"""

from __future__ import annotations

from dataclasses import dataclass

from higgs_tune.config import Config
from higgs_tune.data.cache import CodeCache
from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler
from higgs_tune.data.dataset import TTSDataset, split_ids
from higgs_tune.data.layout import SpecialTokens


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
