"""Batches: the collator (right padding) and a token-budget, length-bucketed batch sampler.

`Collator` turns a list of `layout.Sample` into the batch dict of CONTRACTS.md "Batch"::

    input_ids            (B, L) long   pad = tokenizer pad id
    attention_mask       (B, L) long   1 = real token
    labels               (B, L) long   -100 at padding
    audio_input_ids      (B, N, K) long  each row's columns in order; pad = stream EOS
    audio_input_ids_mask (B, N) bool   True = real column (count == placeholders in that row)
    audio_labels         (B, N, K) long  -100 at padding
    audio_roles          (B, N) long   0 pad, 1 reference, 2 target
    sample_ids           list[str]

The model scatters `audio_input_ids[audio_input_ids_mask]` (row-major) into the placeholder
positions of `input_ids` (row-major), so each row's real columns must equal its placeholder
count; the collator checks it.

`TokenBudgetBatchSampler` yields lists of dataset indices so that padded length x batch size
stays within a token budget. Order per epoch: shuffle all indices with (seed, epoch); cut them
into windows of `bucket_size * max_batch_size` samples; sort each window by length and pack it
greedily into batches (neighbours in length -> little padding); shuffle the order of all
batches. With several replicas the batch list is made divisible by `num_replicas` (by splitting
the largest batches, or by dropping the last ones with `drop_last`) and rank r takes batches
r, r + R, r + 2R, ...: every rank runs the same number of steps and, without `drop_last`,
every index is used exactly once per epoch across ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch

from higgs_tune.data.layout import IGNORE_INDEX, ROLE_PAD, Sample, SpecialTokens
from higgs_tune.errors import CheckpointError, DataError


class Collator:
    """Right-pads a list of samples into the model's batch (see module docstring)."""

    def __init__(self, tokens: SpecialTokens):
        self.pad_id = tokens.pad
        self.audio_pad_id = tokens.stream_eos
        self.placeholder_ids = (tokens.audio_out, tokens.audio_delay)
        self.num_codebooks = tokens.num_codebooks

    def __call__(self, samples: Sequence[Sample]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch_size = len(samples)
        seq_len = max(s["input_ids"].shape[0] for s in samples)
        n_cols = max(s["audio_input_ids"].shape[0] for s in samples)
        k_books = self.num_codebooks

        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        audio_input_ids = torch.full((batch_size, n_cols, k_books), self.audio_pad_id, dtype=torch.long)
        audio_mask = torch.zeros((batch_size, n_cols), dtype=torch.bool)
        audio_labels = torch.full((batch_size, n_cols, k_books), IGNORE_INDEX, dtype=torch.long)
        audio_roles = torch.full((batch_size, n_cols), ROLE_PAD, dtype=torch.long)

        for row, s in enumerate(samples):
            length, cols = s["input_ids"].shape[0], s["audio_input_ids"].shape[0]
            placeholders = int(torch.isin(s["input_ids"], torch.tensor(self.placeholder_ids)).sum())
            if placeholders != cols or s["audio_input_ids"].shape[1:] != (k_books,):
                raise DataError(
                    f"Sample {s['sample_id']!r}: {placeholders} audio placeholders but audio_input_ids of shape "
                    f"{tuple(s['audio_input_ids'].shape)} (expected ({placeholders}, {k_books})). Build samples with "
                    "higgs_tune.data.layout.build_sample."
                )
            input_ids[row, :length] = s["input_ids"]
            attention_mask[row, :length] = 1
            labels[row, :length] = s["labels"]
            audio_input_ids[row, :cols] = s["audio_input_ids"]
            audio_mask[row, :cols] = True
            audio_labels[row, :cols] = s["audio_labels"]
            audio_roles[row, :cols] = s["audio_roles"]

        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "audio_input_ids": audio_input_ids,
            "audio_input_ids_mask": audio_mask,
            "audio_labels": audio_labels,
            "audio_roles": audio_roles,
            "sample_ids": [s["sample_id"] for s in samples],
        }


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions: 1 - sum(real tokens) / sum(batch size x longest in batch)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


class TokenBudgetBatchSampler:
    """Batches of indices within a token budget, length-bucketed, resumable, shardable.

    lengths: token length per dataset index, or a function epoch -> lengths for datasets whose
        samples change with the epoch (voice-cloning references: `TTSDataset.lengths`).
    max_tokens: padded length x batch size never exceeds this.
    max_batch_size: at most this many samples per batch.
    shuffle: False keeps index order (windows still sorted by length when bucket_size > 0).
    bucket_size: windows of bucket_size * max_batch_size samples are sorted by length;
        0 disables sorting (batches then follow the shuffled order).
    drop_last: with several replicas, drop the last batches instead of splitting batches so
        that every rank gets the same number.

    Call `set_epoch(epoch)` before iterating each epoch. `state_dict()` records the epoch and
    the batches consumed in it; after `load_state_dict`, iterating that epoch yields exactly
    the batches that were not consumed yet.
    """

    def __init__(
        self,
        lengths: Sequence[int] | Callable[[int], Sequence[int]],
        max_tokens: int,
        max_batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int = 64,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if max_tokens <= 0 or max_batch_size <= 0 or bucket_size < 0:
            raise ValueError("max_tokens and max_batch_size must be > 0 and bucket_size >= 0")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self._lengths = lengths
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_size = bucket_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._consumed = 0  # batches of this epoch yielded to the training loop
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from load_state_dict
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, all ranks' batches)

    # -------------------------------------------------------------- epoch plan
    def lengths(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        return list(self._lengths(epoch) if callable(self._lengths) else self._lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self, epoch: int) -> list[list[int]]:
        """All batches of the epoch, in order, before sharding (deterministic in seed and epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        lengths = self.lengths(epoch)
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_tokens]
        if too_long:
            shown = ", ".join(f"index {i} ({n} tokens)" for i, n in too_long[:10])
            raise DataError(
                f"{len(too_long)} sample(s) exceed the batch token budget of {self.max_tokens}: {shown}. "
                "Raise data.max_tokens_per_batch or lower data.max_sequence_length."
            )
        rng = random.Random(f"{self.seed}/{epoch}")
        order = list(range(len(lengths)))
        if self.shuffle:
            rng.shuffle(order)
        window = self.bucket_size * self.max_batch_size if self.bucket_size else len(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), max(window, 1)):
            chunk = order[start : start + window]
            if self.bucket_size:
                chunk = sorted(chunk, key=lambda i: lengths[i])  # stable: ties keep shuffled order
            batches += self._pack(chunk, lengths)
        if self.shuffle:
            rng.shuffle(batches)
        batches = self._equalize(batches, lengths)
        self._cache = (epoch, batches)
        return batches

    def _pack(self, indices: list[int], lengths: Sequence[int]) -> list[list[int]]:
        """Cut `indices` (in order; sorted by length within a bucket) into contiguous batches:
        the fewest batches that respect the budget, and among those the least padding.

        Dynamic programme over cut points: best[j] = (batches, padded tokens) for indices[:j];
        a batch indices[i:j] is allowed when j - i <= max_batch_size and (j - i) x its longest
        <= max_tokens. Greedy fill-to-the-limit would instead pack a run of short samples with
        the first long ones, paying their padding (20% on the bimodal demo data, 6-9% here).
        """
        n = len(indices)
        if n == 0:
            return []
        lens = [lengths[i] for i in indices]
        prefix = [0]
        for v in lens:
            prefix.append(prefix[-1] + v)
        inf = (float("inf"), float("inf"))
        best: list[tuple[float, float]] = [(0, 0)] + [inf] * n
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            longest = 0
            for i in range(j - 1, max(-1, j - 1 - self.max_batch_size), -1):
                longest = max(longest, lens[i])
                size = j - i
                if size * longest > self.max_tokens:
                    break  # a longer batch only grows `size x longest`
                batches, padding = best[i]
                candidate = (batches + 1, padding + size * longest - (prefix[j] - prefix[i]))
                if candidate < best[j]:
                    best[j], cut[j] = candidate, i
        out, j = [], n
        while j > 0:
            out.append(indices[cut[j] : j])
            j = cut[j]
        return out[::-1]

    def _equalize(self, batches: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
        """Make len(batches) divisible by num_replicas so every rank runs the same steps."""
        replicas = self.num_replicas
        extra = len(batches) % replicas
        if extra == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - extra]
        # Split the largest batches (halves never exceed the budget) until divisible.
        batches = [list(b) for b in batches]
        for _ in range(replicas - extra):
            pos = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
            big = batches[pos]
            if len(big) < 2:
                raise DataError(
                    f"{sum(map(len, batches))} samples cannot fill {replicas} replicas with one batch each. "
                    "Use more data, fewer processes, or drop_last."
                )
            by_length = sorted(big, key=lambda i: lengths[i])
            half = len(by_length) // 2
            batches[pos : pos + 1] = [by_length[:half], by_length[half:]]
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        return self._plan(epoch)[self.rank :: self.num_replicas]

    # -------------------------------------------------------------- iteration
    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank runs in the current epoch (a full epoch, resumed or not)."""
        return len(self._rank_batches(self.epoch))

    def _skip(self) -> int:
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than batches_per_epoch right after a resume)."""
        return max(self.batches_per_epoch - self._skip(), 0)

    def __iter__(self) -> Iterator[list[int]]:
        skip = self._skip()
        self._resume = None
        batches = self._rank_batches(self.epoch)
        self._consumed = skip
        for batch in batches[skip:]:
            self._consumed += 1
            yield list(batch)

    # -------------------------------------------------------------- resume
    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens": self.max_tokens,
            "max_batch_size": self.max_batch_size,
            "bucket_size": self.bucket_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_samples": len(self.lengths()),
        }

    def state_dict(self, consumed: int | None = None) -> dict:
        """{"epoch", "batches_consumed", ...settings}. By default counts batches yielded so far in
        this epoch, which is exact with a DataLoader without workers; a DataLoader with workers
        prefetches ahead, so pass the loop's own count of batches used as `consumed`."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self._consumed if consumed is None else consumed,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise CheckpointError(
                "The data order cannot be resumed exactly because the batching settings changed ("
                + "; ".join(changed)
                + "). Resume with the original data and batch settings."
            )
        self.epoch = int(state["epoch"])
        self._consumed = int(state["batches_consumed"])
        self._resume = (self.epoch, self._consumed)
