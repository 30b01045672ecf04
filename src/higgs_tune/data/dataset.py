"""`TTSDataset`: training samples from a prepared code cache, and the held-out split.

Each index is one clip of the cache (`cache.entries`, manifest order, optionally restricted
to `ids`). Its sample is built by `layout.build_sample` as one of two tasks:

- `tts`: system [+ scene] -> user: text -> assistant: target audio.
- `voice_clone`: system [+ scene] -> user: reference text -> assistant: reference audio ->
  user: text -> assistant: target audio. The reference is the entry's explicit
  `ref_key`/`ref_text` when it has one, else another clip of the same speaker *in this
  dataset*, chosen deterministically from (seed, epoch, sample id). A speaker with a single
  clip (or whose other clips would make the sample longer than `max_sequence_length`)
  falls back to TTS.

`task="mixed"` draws voice cloning with `clone_probability`, again from (seed, epoch, id).
Call `set_epoch(epoch)` together with the sampler's: the task draw and the reference can
change between epochs; `lengths(epoch)` gives the token lengths of that epoch's samples
without loading any codes, equal to `len(sample["input_ids"])`. DataLoader workers copy the
dataset when an epoch's iteration starts, so set the epoch before `iter(loader)` and do not
use `persistent_workers=True` (its workers would keep the first epoch's references).

Samples longer than `max_sequence_length` are an error at construction, naming them.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from higgs_tune.data.layout import (
    DEFAULT_SYSTEM_PROMPT,
    Conversation,
    Sample,
    SpecialTokens,
    build_sample,
    reference_lengths,
    sample_lengths,
)
from higgs_tune.errors import DataError

TASKS = ("tts", "voice_clone", "mixed")


def _rng(*parts) -> random.Random:
    """A generator seeded from a stable hash (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def split_ids(entries: Sequence, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by id: (train_ids, eval_ids), both in manifest order.

    Each id gets a stable hash of (seed, id); the round(n x eval_fraction) smallest (at least
    one when eval_fraction > 0) are held out. The split depends only on the ids and the seed,
    not on the order of the manifest.
    """
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise DataError(f"Duplicate clip ids {dupes[:10]}: ids must be unique to split by id. Fix the manifest.")
    if eval_fraction == 0:
        return ids, []
    n_eval = max(1, round(len(ids) * eval_fraction))
    if n_eval >= len(ids):
        raise DataError(
            f"eval_fraction {eval_fraction} of {len(ids)} clips leaves nothing to train on. "
            "Lower data.eval_fraction or add clips."
        )
    rank = sorted(ids, key=lambda i: hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest())
    held = set(rank[:n_eval])
    return [i for i in ids if i not in held], [i for i in ids if i in held]


@dataclass(frozen=True)
class SamplePlan:
    """What index i becomes in a given epoch: TTS (ref_key None) or voice cloning with this reference."""

    index: int
    sample_id: str
    task: str
    ref_key: str | None = None
    ref_text: str | None = None
    reference: str | None = None  # the reference clip's id (its key when explicit and not in the dataset)
    length: int = 0


class TTSDataset(torch.utils.data.Dataset):
    """Samples (`layout.Sample`) for the collator; see the module docstring.

    cache: a `CodeCache` (or anything with `entries`, `codes(key)`, `num_codebooks`).
    tokens / tokenizer: the model's `SpecialTokens` and text tokenizer.
    task: "tts", "voice_clone" or "mixed"; clone_probability: the share of voice cloning in mixed.
    system_prompt / use_scene: the system turn; an entry's `scene` is added when use_scene.
    seed: drives task draws and reference choice (with the epoch and the sample id).
    max_sequence_length: the longest allowed sample in tokens.
    ids: restrict to these entry ids (e.g. from `split_ids`); None = all entries.
    """

    def __init__(
        self,
        cache,
        tokens: SpecialTokens,
        tokenizer,
        *,
        task: str = "mixed",
        clone_probability: float = 0.5,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        use_scene: bool = True,
        seed: int = 0,
        max_sequence_length: int = 2048,
        ids: Sequence[str] | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not 0 <= clone_probability <= 1:
            raise ValueError(f"clone_probability must be in [0, 1], got {clone_probability}")
        if cache.num_codebooks != tokens.num_codebooks:
            raise DataError(
                f"The code cache has {cache.num_codebooks} codebooks but the model expects {tokens.num_codebooks}. "
                "Re-run `higgs-tune prepare` with this model's audio tokenizer."
            )
        self.cache = cache
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.task = task
        self.clone_probability = clone_probability
        self.system_prompt = system_prompt
        self.use_scene = use_scene
        self.seed = seed
        self.max_sequence_length = max_sequence_length
        self.epoch = 0

        by_id = {e.id: e for e in cache.entries}
        if ids is None:
            self.entries = list(cache.entries)
        else:
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise DataError(
                    f"{len(unknown)} id(s) are not in the cache: {unknown[:10]}. Use ids from this cache's entries."
                )
            wanted = set(ids)
            self.entries = [e for e in cache.entries if e.id in wanted]
        if not self.entries:
            raise DataError("The dataset has no clips. Check the cache folder and the held-out split.")
        missing_ref_text = [e.id for e in self.entries if e.ref_key is not None and e.ref_text is None]
        if missing_ref_text:
            raise DataError(
                f"Clips {missing_ref_text[:10]} have a reference audio but no reference text. "
                "Add ref_text to these manifest rows and re-run `higgs-tune prepare`."
            )
        self._measure()

    # ------------------------------------------------------------------ lengths
    def _conversation(self, entry, ref_text: str | None) -> Conversation:
        scene = entry.scene if self.use_scene else None
        return Conversation(text=entry.text, system_prompt=self.system_prompt, scene=scene, ref_text=ref_text)

    def _measure(self) -> None:
        """Token lengths of every TTS sample and every possible reference; reject too-long samples.

        A voice-cloning sample is its TTS sample plus the reference turns (special tokens split
        the tokenizer input, so the parts are tokenized independently): clone length =
        tts_length[i] + ref_length[j]. Same-speaker references are kept per speaker sorted by
        ref_length, so "the references that fit" is a prefix found by bisection.
        """
        entries, limit = self.entries, self.max_sequence_length
        self._tts_length = sample_lengths(
            [self._conversation(e, None) for e in entries],
            self.tokenizer,
            self.tokens,
            [e.num_frames for e in entries],
            sample_ids=[e.id for e in entries],
        )
        frames_by_key = {e.key: e.num_frames for e in self.cache.entries}
        self._ref_frames: dict[str, int] = {}
        for e in entries:
            if e.ref_key is not None and e.ref_key not in self._ref_frames:
                frames = frames_by_key.get(e.ref_key)
                self._ref_frames[e.ref_key] = (
                    frames if frames is not None else int(self.cache.codes(e.ref_key).shape[1])
                )
        # Candidate references are the dataset's own clips: no held-out audio enters training.
        self._ref_length = reference_lengths(
            [e.text for e in entries],
            [e.num_frames for e in entries],
            self.tokenizer,
            self.tokens,
            sample_ids=[e.id for e in entries],
        )
        explicit = [i for i, e in enumerate(entries) if e.ref_key is not None]
        explicit_extra = reference_lengths(
            [entries[i].ref_text for i in explicit],
            [self._ref_frames[entries[i].ref_key] for i in explicit],
            self.tokenizer,
            self.tokens,
            sample_ids=[entries[i].id for i in explicit],
        )
        self._explicit_length = {
            i: self._tts_length[i] + extra for i, extra in zip(explicit, explicit_extra, strict=True)
        }

        too_long = [(e.id, n) for e, n in zip(entries, self._tts_length, strict=True) if n > limit]
        if self.task != "tts":
            too_long += [
                (entries[i].id, n)
                for i, n in self._explicit_length.items()
                if n > limit and self._tts_length[i] <= limit
            ]
        if too_long:
            shown = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:20])
            raise DataError(
                f"{len(too_long)} sample(s) are longer than max_sequence_length={limit}: {shown}"
                f"{' ...' if len(too_long) > 20 else ''}. Raise data.max_sequence_length (and "
                "data.max_tokens_per_batch), or remove or shorten these clips (or their reference) in the manifest."
            )

        speakers: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            speakers[e.speaker].append(i)
        self._speaker_refs = {s: sorted(idx, key=lambda j: (self._ref_length[j], j)) for s, idx in speakers.items()}
        self._speaker_ref_lengths = {s: [self._ref_length[j] for j in idx] for s, idx in self._speaker_refs.items()}
        self._ref_position = {j: pos for idx in self._speaker_refs.values() for pos, j in enumerate(idx)}
        self._id_by_key = {e.key: e.id for e in self.cache.entries}

    # ------------------------------------------------------------------ plans
    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, index: int, epoch: int | None = None) -> SamplePlan:
        """The task and reference of sample `index` in `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        entry = self.entries[index]
        rng = _rng(self.seed, epoch, entry.id)
        tts = SamplePlan(index, entry.id, "tts", length=self._tts_length[index])
        if self.task == "tts":
            return tts
        clone = rng.random() < self.clone_probability if self.task == "mixed" else True
        if not clone:
            return tts
        if entry.ref_key is not None:
            return SamplePlan(
                index,
                entry.id,
                "voice_clone",
                entry.ref_key,
                entry.ref_text,
                reference=self._id_by_key.get(entry.ref_key, entry.ref_key),
                length=self._explicit_length[index],
            )
        # Same-speaker clips sorted by reference length: those that fit are a prefix; draw one
        # position in it, stepping over the sample's own clip. O(log n) per sample.
        refs = self._speaker_refs[entry.speaker]
        fit = bisect.bisect_right(
            self._speaker_ref_lengths[entry.speaker], self.max_sequence_length - self._tts_length[index]
        )
        own = self._ref_position[index]
        choices = fit - 1 if own < fit else fit
        if choices <= 0:
            return tts  # a single-clip speaker (or only too-long references): plain TTS
        pos = rng.randrange(choices)
        j = refs[pos + 1 if own < fit and pos >= own else pos]
        ref = self.entries[j]
        return SamplePlan(
            index,
            entry.id,
            "voice_clone",
            ref.key,
            ref.text,
            reference=ref.id,
            length=self._tts_length[index] + self._ref_length[j],
        )

    def lengths(self, epoch: int | None = None) -> list[int]:
        """Token length of every sample in `epoch` (default: current), without loading codes."""
        return [self.plan(i, epoch).length for i in range(len(self))]

    # ------------------------------------------------------------------ samples
    def __getitem__(self, index: int) -> Sample:
        plan = self.plan(index)
        entry = self.entries[index]
        target_codes = self.cache.codes(entry.key)  # (K, T)
        ref_codes = self.cache.codes(plan.ref_key) if plan.ref_key is not None else None
        # lengths() counted frames from the cache index; codes that disagree would break the
        # sampler's token budget, so a stale or damaged cache stops here.
        if target_codes.shape[1] != entry.num_frames:
            raise DataError(
                f"Sample {entry.id!r}: the cache lists {entry.num_frames} frames but its codes have "
                f"{target_codes.shape[1]}. The cache is damaged; re-run `higgs-tune prepare`."
            )
        sample = build_sample(
            self._conversation(entry, plan.ref_text),
            self.tokenizer,
            self.tokens,
            target_codes=target_codes,
            ref_codes=ref_codes,
            sample_id=entry.id,
            reference=plan.reference,
        )
        if sample["input_ids"].shape[0] != plan.length:
            raise DataError(
                f"Sample {entry.id!r}: built {sample['input_ids'].shape[0]} tokens but planned {plan.length} "
                f"(reference {plan.reference!r}). The cache is inconsistent; re-run `higgs-tune prepare`."
            )
        return sample
