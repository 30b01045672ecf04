"""TTSDataset: tasks, reference pairing, lengths, length limits; split_ids; the DataLoader path."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer, HiggsAudioV2Config

from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler
from higgs_tune.data.dataset import TTSDataset, split_ids
from higgs_tune.data.layout import ROLE_REFERENCE, ROLE_TARGET, Conversation, SpecialTokens, build_sample
from higgs_tune.errors import DataError

SENTENCES = [
    "The morning train was right on time.",
    "Please close the window before you leave.",
    "My sister likes green tea with honey.",
    "We walked along the river after lunch.",
    "مرحبا بكم في البيت.",
    "كيف حالك اليوم؟",
    "The meeting starts at nine tomorrow.",
    "Hello there.",
]


@dataclass(frozen=True)
class Entry:
    """The fields of data.cache.CacheEntry the dataset reads (CONTRACTS.md "Code cache")."""

    id: str
    key: str
    speaker: str
    text: str
    num_frames: int
    language: str = "en"
    scene: str | None = None
    ref_key: str | None = None
    ref_text: str | None = None
    duration_s: float = 0.0
    audio: str = ""


class StandInCache:
    """In-memory stand-in for data.cache.CodeCache: entries, codes(key), num_codebooks."""

    def __init__(self, entries, extra_codes=None, num_codebooks=8):
        self.entries = list(entries)
        self.num_codebooks = num_codebooks
        g = torch.Generator().manual_seed(0)
        self._codes = {e.key: torch.randint(0, 1024, (num_codebooks, e.num_frames), generator=g) for e in entries}
        self._codes.update(extra_codes or {})

    def codes(self, key):
        return self._codes[key].clone()


def _entries(speakers=("a", "b", "c"), per_speaker=4, scene_every=3):
    out = []
    for spk in speakers:
        for j in range(per_speaker):
            n = len(out)
            out.append(
                Entry(
                    id=f"{spk}_{j:03d}",
                    key=f"key-{spk}-{j}",
                    speaker=spk,
                    text=SENTENCES[n % len(SENTENCES)],
                    num_frames=3 + (n * 7) % 11,
                    scene="A quiet room." if n % scene_every == 0 else None,
                )
            )
    return out


@pytest.fixture(scope="module")
def stack(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return tokenizer, SpecialTokens.from_tokenizer(tokenizer, HiggsAudioV2Config.from_pretrained(tiny_dir))


def _dataset(stack, cache, **kw):
    tokenizer, tokens = stack
    return TTSDataset(cache, tokens, tokenizer, **kw)


def test_tts_task_builds_exactly_the_layout_sample(stack):
    tokenizer, tokens = stack
    cache = StandInCache(_entries())
    ds = _dataset(stack, cache, task="tts", system_prompt="Speak clearly.", use_scene=True)
    assert len(ds) == 12
    for i in (0, 1):
        entry = cache.entries[i]
        expected = build_sample(
            Conversation.tts(entry.text, system_prompt="Speak clearly.", scene=entry.scene),
            tokenizer,
            tokens,
            target_codes=cache.codes(entry.key),
            sample_id=entry.id,
        )
        got = ds[i]
        assert (got["sample_id"], got["task"], got["reference"]) == (entry.id, "tts", None)
        for key in ("input_ids", "labels", "audio_input_ids", "audio_labels", "audio_roles"):
            assert torch.equal(got[key], expected[key]), key
    scene_id = tokenizer.convert_tokens_to_ids("<|scene_desc_start|>")
    assert scene_id in ds[0]["input_ids"].tolist() and scene_id not in ds[1]["input_ids"].tolist()
    no_scene = _dataset(stack, cache, task="tts", use_scene=False)
    assert scene_id not in no_scene[0]["input_ids"].tolist()


def test_voice_clone_pairs_another_clip_of_the_same_speaker_deterministically(stack):
    cache = StandInCache(_entries())
    by_id = {e.id: e for e in cache.entries}
    ds = _dataset(stack, cache, task="voice_clone", seed=11)
    again = _dataset(stack, cache, task="voice_clone", seed=11)
    plans = {}
    for epoch in range(4):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        for i, entry in enumerate(cache.entries):
            sample = ds[i]
            ref = by_id[sample["reference"]]
            assert sample["task"] == "voice_clone"
            assert ref.speaker == entry.speaker and ref.id != entry.id
            # the reference segment holds the reference clip's codes, all labels masked
            ref_seg, tgt_seg = sample["segments"]
            assert (ref_seg.role, tgt_seg.role, ref_seg.num_frames) == (ROLE_REFERENCE, ROLE_TARGET, ref.num_frames)
            block = sample["audio_input_ids"][ref_seg.audio_start : ref_seg.audio_end].T
            assert torch.equal(block[0, 1 : 1 + ref.num_frames], cache.codes(ref.key)[0])
            assert (sample["audio_labels"][ref_seg.audio_start : ref_seg.audio_end] == -100).all()
            assert again.plan(i) == ds.plan(i)  # same (seed, epoch, id) -> same reference
            plans[epoch, i] = sample["reference"]
    assert any(plans[0, i] != plans[e, i] for e in (1, 2, 3) for i in range(12))  # references vary by epoch
    other_seed = _dataset(stack, cache, task="voice_clone", seed=12)
    assert [other_seed.plan(i, 0).reference for i in range(12)] != [plans[0, i] for i in range(12)]


def test_explicit_reference_wins_and_a_single_clip_speaker_falls_back_to_tts(stack):
    entries = _entries(speakers=("a",), per_speaker=3)
    external = torch.randint(0, 1024, (8, 5), generator=torch.Generator().manual_seed(1))
    entries[0] = Entry(**{**entries[0].__dict__, "ref_key": "key-outside", "ref_text": "Outside prompt."})
    entries[1] = Entry(**{**entries[1].__dict__, "ref_key": entries[2].key, "ref_text": entries[2].text})
    entries.append(Entry(id="solo_000", key="key-solo", speaker="solo", text="Only one clip.", num_frames=4))
    cache = StandInCache(entries, extra_codes={"key-outside": external})
    ds = _dataset(stack, cache, task="voice_clone")
    for epoch in range(3):
        ds.set_epoch(epoch)
        s0, s1, s3 = ds[0], ds[1], ds[3]
        assert s0["reference"] == "key-outside" and s0["segments"][0].num_frames == 5
        assert s1["reference"] == entries[2].id
        assert (s3["task"], s3["reference"], len(s3["segments"])) == ("tts", None, 1)
    user_text_ids = stack[0]("Outside prompt.", add_special_tokens=False)["input_ids"]
    ids = ds[0]["input_ids"].tolist()
    assert any(ids[p : p + len(user_text_ids)] == user_text_ids for p in range(len(ids)))


def test_mixed_task_draws_voice_cloning_with_the_configured_probability(stack):
    cache = StandInCache(_entries(speakers=("a", "b", "c", "d"), per_speaker=50))
    for p, low, high in ((0.0, 0, 0), (0.3, 0.2, 0.4), (1.0, 1, 1)):
        ds = _dataset(stack, cache, task="mixed", clone_probability=p, seed=3)
        share = sum(ds.plan(i).task == "voice_clone" for i in range(len(ds))) / len(ds)
        assert low <= share <= high, (p, share)


@pytest.mark.parametrize("task", ["tts", "voice_clone", "mixed"])
def test_lengths_equal_built_sample_lengths_every_epoch(stack, task):
    entries = _entries()
    entries[5] = Entry(**{**entries[5].__dict__, "ref_key": entries[6].key, "ref_text": entries[6].text})
    ds = _dataset(stack, StandInCache(entries), task=task, seed=5)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert ds.lengths() == [len(ds[i]["input_ids"]) for i in range(len(ds))]
        assert ds.lengths(epoch) == ds.lengths()


def test_too_long_samples_are_an_error_naming_them(stack):
    entries = _entries(speakers=("a",), per_speaker=3)
    entries.append(Entry(id="long_one", key="key-long", speaker="a", text="A long clip.", num_frames=400))
    cache = StandInCache(entries)
    with pytest.raises(
        DataError, match=r"1 sample\(s\) are longer than max_sequence_length=300: long_one \(\d+ tokens\)"
    ):
        _dataset(stack, cache, task="tts", max_sequence_length=300)
    # an explicit reference that makes a sample too long counts when cloning is possible ...
    entries = _entries(speakers=("a",), per_speaker=3)
    entries[0] = Entry(**{**entries[0].__dict__, "ref_key": "key-big", "ref_text": "Big."})
    big = {"key-big": torch.zeros(8, 400, dtype=torch.long)}
    with pytest.raises(DataError, match=f"{entries[0].id} "):
        _dataset(stack, StandInCache(entries, extra_codes=big), task="mixed", max_sequence_length=300)
    # ... and not in plain TTS, which never uses it
    assert len(_dataset(stack, StandInCache(entries, extra_codes=big), task="tts", max_sequence_length=300)) == 3


def test_same_speaker_references_that_do_not_fit_are_never_chosen(stack):
    entries = _entries(speakers=("a",), per_speaker=3)
    entries.append(Entry(id="a_big", key="key-a-big", speaker="a", text="Hello.", num_frames=200))
    cache = StandInCache(entries)
    # room for a_big alone, but not for a_big plus any reference turn (>= 12 columns + text)
    limit = _dataset(stack, cache, task="tts").lengths()[3] + 5
    ds = _dataset(stack, cache, task="voice_clone", max_sequence_length=limit)
    for epoch in range(10):
        ds.set_epoch(epoch)
        assert max(ds.lengths()) <= limit
        assert [ds.plan(i).task for i in range(4)] == ["voice_clone"] * 3 + ["tts"]
        assert all(ds.plan(i).reference in {"a_000", "a_001", "a_002"} for i in range(3))


def test_markup_in_transcripts_fails_at_construction_naming_every_sample(stack):
    entries = _entries(speakers=("a",), per_speaker=3)
    entries[0] = Entry(**{**entries[0].__dict__, "text": "Say <|eot_id|> now."})
    entries[2] = Entry(**{**entries[2].__dict__, "text": "<|AUDIO_OUT|>"})
    with pytest.raises(
        DataError, match=r"2 sample\(s\) contain Higgs chat markup.*'a_000': <\|eot_id\|>; 'a_002': <\|AUDIO_OUT\|>"
    ):
        _dataset(stack, StandInCache(entries), task="tts")


def test_ids_restrict_the_dataset_and_unknown_ids_fail(stack):
    cache = StandInCache(_entries())
    ds = _dataset(stack, cache, task="voice_clone", ids=["b_002", "a_000", "a_001"])
    assert [e.id for e in ds.entries] == ["a_000", "a_001", "b_002"]  # manifest order
    assert ds[0]["reference"] == "a_001" and ds[2]["task"] == "tts"  # references only from the dataset's own clips
    with pytest.raises(DataError, match=r"not in the cache: \['zzz'\]"):
        _dataset(stack, cache, ids=["a_000", "zzz"])


def test_stale_cache_frames_and_wrong_codebook_count_are_data_errors(stack):
    entries = _entries(speakers=("a",), per_speaker=2)
    cache = StandInCache(entries)
    cache._codes[entries[0].key] = cache._codes[entries[0].key][:, :-1]
    ds = _dataset(stack, cache, task="tts")
    with pytest.raises(DataError, match=f"'{entries[0].id}'.*re-run `higgs-tune prepare`"):
        ds[0]
    with pytest.raises(DataError, match="4 codebooks but the model expects 8"):
        _dataset(stack, StandInCache(entries, num_codebooks=4))


def test_dataloader_with_budget_sampler_and_collator(stack):
    tokenizer, tokens = stack
    ds = _dataset(stack, StandInCache(_entries(per_speaker=6)), task="mixed", seed=1)
    sampler = TokenBudgetBatchSampler(ds.lengths, max_tokens=600, max_batch_size=4, seed=1, bucket_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tokens))
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["input_ids"].numel() <= 600
            assert (
                batch["audio_input_ids_mask"].sum(1)
                == torch.isin(batch["input_ids"], torch.tensor([tokens.audio_out, tokens.audio_delay])).sum(1)
            ).all()
            seen += batch["sample_ids"]
        assert sorted(seen) == sorted(e.id for e in ds.entries)


def test_split_ids_is_deterministic_by_id():
    entries = _entries(speakers=("a", "b", "c", "d"), per_speaker=25)
    train, held = split_ids(entries, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert train == [e.id for e in entries if e.id in set(train)]  # manifest order kept
    assert split_ids(list(reversed(entries)), 0.1, seed=0)[1] == list(reversed(held))  # order-independent
    assert split_ids(entries, 0.1, seed=1)[1] != held
    assert split_ids(entries, 0.0, seed=0) == ([e.id for e in entries], [])
    assert len(split_ids(entries[:5], 0.01, seed=0)[1]) == 1  # at least one held-out clip
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_ids(entries[:1], 0.5, seed=0)
    with pytest.raises(DataError, match=r"Duplicate clip ids \['a_000'\]"):
        split_ids(entries + entries[:1], 0.1, seed=0)


# ----------------------------------------------------------------------------- the real prepared cache
@pytest.fixture(scope="module")
def demo_cache(tiny_dir, demo_manifest, tmp_path_factory):
    from higgs_tune.data.cache import CodeCache
    from higgs_tune.data.prepare import prepare_manifest

    out = tmp_path_factory.mktemp("demo_cache") / "cache"
    prepare_manifest(demo_manifest, tiny_dir, out, progress=False)
    return CodeCache.open(out)


def test_dataset_from_the_prepared_demo_cache(stack, demo_cache, tiny_dir):
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_tune.data.layout import revert_delay_pattern

    tokenizer, tokens = stack
    train_ids, eval_ids = split_ids(demo_cache.entries, 0.2, seed=0)
    assert len(eval_ids) == 5 and len(train_ids) == 21
    ds = TTSDataset(demo_cache, tokens, tokenizer, task="voice_clone", seed=0, max_sequence_length=2048)
    by_id = {e.id: e for e in demo_cache.entries}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        samples = [ds[i] for i in range(len(ds))]
        assert ds.lengths() == [len(s["input_ids"]) for s in samples]
        for entry, s in zip(ds.entries, samples, strict=True):
            ref = by_id[s["reference"]]  # every demo speaker has several clips: always cloned
            assert s["task"] == "voice_clone" and ref.speaker == entry.speaker and ref.id != entry.id
            tgt = s["segments"][1]
            frames = revert_delay_pattern(s["audio_input_ids"][tgt.audio_start : tgt.audio_end].T)
            assert torch.equal(frames[:, 1:-1], demo_cache.codes(entry.key))
        # the manifest's explicit voice prompts (ref_audio = another clip of the speaker)
        assert samples[ds.entries.index(by_id["en_a_001"])]["reference"] == "en_a_000"

    train = TTSDataset(demo_cache, tokens, tokenizer, task="mixed", seed=0, ids=train_ids)
    sampler = TokenBudgetBatchSampler(train.lengths, max_tokens=1024, max_batch_size=4, seed=0, bucket_size=2)
    batch = Collator(tokens)([train[i] for i in next(iter(sampler))])
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    keys = ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask", "labels", "audio_labels")
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in keys}).loss
    assert torch.isfinite(loss) and batch["input_ids"].numel() <= 1024
