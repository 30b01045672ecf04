"""Collator (exact padding) and the token-budget batch sampler."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

from higgs_tune.data.collate import Collator, TokenBudgetBatchSampler, padding_waste
from higgs_tune.data.layout import Conversation, SpecialTokens, build_sample
from higgs_tune.errors import CheckpointError, DataError

X = -100
# Toy ids for hand-made samples: pad 0, AUDIO_OUT 7, delay 8, stream EOS 1025.
TOY = SpecialTokens(
    begin_of_text=1,
    start_header=2,
    end_header=3,
    eot=4,
    audio_out_bos=5,
    audio_eos=6,
    audio_out=7,
    audio_delay=8,
    pad=0,
    stream_bos=1024,
    stream_eos=1025,
    num_codebooks=2,
)


def _toy(sample_id, input_ids, labels, audio, audio_labels, roles):
    return {
        "sample_id": sample_id,
        "task": "tts",
        "reference": None,
        "segments": [],
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "audio_input_ids": torch.tensor(audio).reshape(-1, 2),
        "audio_labels": torch.tensor(audio_labels).reshape(-1, 2),
        "audio_roles": torch.tensor(roles),
    }


def test_collator_right_pads_a_batch_of_two_exactly():
    # K = 2. Sample a: 7 tokens, one target clip of T = 1 frame (codes 11 / 21): 3 AUDIO_OUT + 1 delay.
    a = _toy(
        "a",
        [1, 5, 7, 7, 7, 8, 6],
        [X, 5, X, X, X, X, 6],
        [[1024, 1024], [11, 1024], [1025, 21], [1025, 1025]],
        [[X, X], [11, X], [1025, 21], [X, 1025]],
        [2, 2, 2, 2],
    )
    # Sample b: 4 tokens, 2 audio columns marked as reference (all -100).
    b = _toy("b", [1, 5, 7, 8], [X, X, X, X], [[1024, 1024], [30, 1024]], [[X, X], [X, X]], [1, 1])
    batch = Collator(TOY)([a, b])
    assert batch["sample_ids"] == ["a", "b"]
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 7, 7, 7, 8, 6], [1, 5, 7, 8, 0, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[X, 5, X, X, X, X, 6], [X, X, X, X, X, X, X]]))
    assert torch.equal(
        batch["audio_input_ids"],
        torch.tensor(
            [
                [[1024, 1024], [11, 1024], [1025, 21], [1025, 1025]],
                [[1024, 1024], [30, 1024], [1025, 1025], [1025, 1025]],  # padded with stream EOS
            ]
        ),
    )
    assert torch.equal(
        batch["audio_input_ids_mask"], torch.tensor([[True, True, True, True], [True, True, False, False]])
    )
    assert torch.equal(
        batch["audio_labels"],
        torch.tensor(
            [
                [[X, X], [11, X], [1025, 21], [X, 1025]],
                [[X, X], [X, X], [X, X], [X, X]],
            ]
        ),
    )
    assert torch.equal(batch["audio_roles"], torch.tensor([[2, 2, 2, 2], [1, 1, 0, 0]]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["audio_roles"].dtype == torch.long
    assert batch["audio_input_ids_mask"].dtype == torch.bool


def test_collator_rejects_placeholder_and_column_count_mismatch():
    bad = _toy("bad", [1, 5, 7, 7, 8, 6], [X] * 6, [[1024, 1024], [11, 1024]], [[X, X], [X, X]], [2, 2])
    with pytest.raises(DataError, match="'bad': 3 audio placeholders"):
        Collator(TOY)([bad])


def test_padded_batch_gives_each_row_the_same_logits_as_alone(tiny_dir):
    """Right padding is invisible to the model: logits at real positions equal the unbatched ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokens = SpecialTokens.from_tokenizer(tokenizer, HiggsAudioV2Config.from_pretrained(tiny_dir))
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()
    g = torch.Generator().manual_seed(0)
    long = build_sample(
        Conversation.voice_clone("Close the window now.", "The cat sat."),
        tokenizer,
        tokens,
        target_codes=torch.randint(0, 1024, (8, 5), generator=g),
        ref_codes=torch.randint(0, 1024, (8, 3), generator=g),
        sample_id="long",
    )
    short = build_sample(
        Conversation.tts("Hi."),
        tokenizer,
        tokens,
        target_codes=torch.randint(0, 1024, (8, 2), generator=g),
        sample_id="short",
    )
    collate = Collator(tokens)
    keys = ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")
    batch = collate([long, short])
    with torch.no_grad():
        both = model(**{k: batch[k] for k in keys}).logits
        for row, s in enumerate([long, short]):
            alone = collate([s])
            single = model(**{k: alone[k] for k in keys}).logits
            n = len(s["input_ids"])
            torch.testing.assert_close(both[row, :n], single[0], rtol=1e-4, atol=1e-4)
        loss = model(**{k: batch[k] for k in keys}, labels=batch["labels"], audio_labels=batch["audio_labels"]).loss
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- sampler
def _speech_lengths(n: int, seed: int = 0) -> list[int]:
    """Synthetic corpus: durations uniform in 2-20 s, ~100 text tokens + 25 audio frames per second."""
    rng = random.Random(seed)
    return [int(100 + 25 * rng.uniform(2, 20)) for _ in range(n)]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_respects_the_token_budget_and_uses_every_index_once():
    lengths = _speech_lengths(1000)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096, max_batch_size=16, shuffle=True, seed=3, bucket_size=8)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler) == sampler.batches_per_epoch
    for b in batches:
        assert 1 <= len(b) <= 16 and len(b) * max(lengths[i] for i in b) <= 4096
    assert sorted(i for b in batches for i in b) == list(range(1000))


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharded_ranks_get_equal_batch_counts_and_disjoint_indices(replicas, drop_last):
    lengths = _speech_lengths(301, seed=1)
    ranks = [
        _epoch(
            TokenBudgetBatchSampler(
                lengths, 4096, 16, seed=5, bucket_size=4, drop_last=drop_last, num_replicas=replicas, rank=r
            ),
            epoch=2,
        )
        for r in range(replicas)
    ]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    used = [i for r in ranks for b in r for i in b]
    assert len(used) == len(set(used))  # no index twice
    if drop_last:
        assert set(used) <= set(range(301))
    else:
        assert sorted(used) == list(range(301))  # every index exactly once across ranks
    for r in ranks:
        for b in r:
            assert len(b) * max(lengths[i] for i in b) <= 4096


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = _speech_lengths(400)

    def run(seed, epoch):
        return _epoch(TokenBudgetBatchSampler(lengths, 4096, 16, seed=seed, bucket_size=4), epoch)

    assert run(0, 1) == run(0, 1)
    assert run(0, 1) != run(0, 2)
    assert run(0, 1) != run(1, 1)


def test_resume_from_state_dict_yields_exactly_the_remaining_batches():
    lengths = _speech_lengths(500)
    full = _epoch(TokenBudgetBatchSampler(lengths, 4096, 16, seed=7, bucket_size=4), 3)

    first = TokenBudgetBatchSampler(lengths, 4096, 16, seed=7, bucket_size=4)
    first.set_epoch(3)
    it = iter(first)
    consumed = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (3, 5)

    resumed = TokenBudgetBatchSampler(lengths, 4096, 16, seed=7, bucket_size=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the loop calls set_epoch again for the resumed epoch: keeps the position
    assert len(resumed) == len(full) - 5
    rest = list(resumed)
    assert consumed + rest == full
    assert resumed.state_dict()["batches_consumed"] == len(full)
    # the next epoch starts from its beginning
    assert _epoch(resumed, 4) == _epoch(TokenBudgetBatchSampler(lengths, 4096, 16, seed=7, bucket_size=4), 4)


def test_resume_with_changed_settings_is_refused():
    lengths = _speech_lengths(100)
    state = TokenBudgetBatchSampler(lengths, 4096, 16, seed=7).state_dict()
    with pytest.raises(CheckpointError, match="seed: saved 7, now 8"):
        TokenBudgetBatchSampler(lengths, 4096, 16, seed=8).load_state_dict(state)


def test_bucketing_keeps_padding_waste_under_ten_percent():
    lengths = _speech_lengths(4000, seed=2)
    bucketed = TokenBudgetBatchSampler(lengths, max_tokens=8192, max_batch_size=16, seed=0, bucket_size=64)
    plain = TokenBudgetBatchSampler(lengths, max_tokens=8192, max_batch_size=16, seed=0, bucket_size=0)
    waste = padding_waste(_epoch(bucketed, 0), lengths)
    waste_plain = padding_waste(_epoch(plain, 0), lengths)
    print(f"\npadding waste, 2-20 s clips, budget 8192: bucketed {waste:.2%}, unsorted {waste_plain:.2%}")
    assert waste < 0.10
    assert waste < waste_plain


def test_padding_waste_by_hand():
    assert padding_waste([[0, 1], [2]], [10, 6, 5]) == pytest.approx(1 - 21 / 25)


def test_sampler_with_epoch_dependent_lengths_and_too_long_samples():
    def lengths(epoch):  # e.g. TTSDataset.lengths: references change with the epoch
        return [100 + 10 * ((i + epoch) % 5) for i in range(50)]

    sampler = TokenBudgetBatchSampler(lengths, 600, 8, seed=0, bucket_size=2)
    for epoch in (0, 1):
        for b in _epoch(sampler, epoch):
            assert len(b) * max(lengths(epoch)[i] for i in b) <= 600
    with pytest.raises(DataError, match=r"index 1 \(700 tokens\).*max_tokens_per_batch"):
        list(TokenBudgetBatchSampler([100, 700], 600, 8))
