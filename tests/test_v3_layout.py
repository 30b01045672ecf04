"""The v3 sample layout on hand-made samples: exact prompt ids, slot positions, delayed codes, labels."""

from __future__ import annotations

import pytest
import torch
from v3_support import random_codes, tiny_tokenizer, tiny_tokens

from higgs_tune.errors import DataError
from higgs_tune.families.v3.layout import (
    AUDIO_SLOT,
    BOC,
    EOC,
    ROLE_REFERENCE,
    ROLE_TARGET,
    build_v3_sample,
    collate_v3,
    delay_codes,
    target_labels,
    undelay_rows,
)

B, E, X = BOC, EOC, -100


def hand_codes(num_frames: int) -> torch.Tensor:
    """codes[c, j] = 10 * c + j: every value says where it came from."""
    return torch.tensor([[10 * c + j for j in range(num_frames)] for c in range(8)])


# (T + 7, 8) delayed rows of hand_codes(2), written out by hand
DELAYED_T2 = torch.tensor(
    [
        [0, B, B, B, B, B, B, B],
        [1, 10, B, B, B, B, B, B],
        [E, 11, 20, B, B, B, B, B],
        [E, E, 21, 30, B, B, B, B],
        [E, E, E, 31, 40, B, B, B],
        [E, E, E, E, 41, 50, B, B],
        [E, E, E, E, E, 51, 60, B],
        [E, E, E, E, E, E, 61, 70],
        [E, E, E, E, E, E, E, 71],
    ]
)
LABELS_T2_ALL = torch.tensor(
    [
        [0, X, X, X, X, X, X, X],
        [1, 10, X, X, X, X, X, X],
        [E, 11, 20, X, X, X, X, X],
        [E, E, 21, 30, X, X, X, X],
        [E, E, E, 31, 40, X, X, X],
        [E, E, E, E, 41, 50, X, X],
        [E, E, E, E, E, 51, 60, X],
        [E, E, E, E, E, E, 61, 70],
        [E, E, E, E, E, E, E, 71],
    ]
)
LABELS_T2_FIRST = torch.tensor(
    [
        [0, X, X, X, X, X, X, X],
        [1, 10, X, X, X, X, X, X],
        [E, 11, 20, X, X, X, X, X],
        [X, E, 21, 30, X, X, X, X],
        [X, X, E, 31, 40, X, X, X],
        [X, X, X, E, 41, 50, X, X],
        [X, X, X, X, E, 51, 60, X],
        [X, X, X, X, X, E, 61, 70],
        [X, X, X, X, X, X, E, 71],
    ]
)


def test_delay_pattern_and_labels_exact():
    codes = hand_codes(2)
    assert torch.equal(delay_codes(codes), DELAYED_T2)
    assert torch.equal(target_labels(codes, "all"), LABELS_T2_ALL)
    assert torch.equal(target_labels(codes, "first"), LABELS_T2_FIRST)
    assert torch.equal(undelay_rows(DELAYED_T2), codes)
    # BOC is never a label; codebook 7 has no EOC row at all (its first EOC would be row T + 7)
    assert not (target_labels(codes, "all") == B).any()
    assert not (target_labels(codes, "first")[:, 7] == E).any()
    for t in (1, 3, 8, 13):
        c = random_codes(t, seed=t)
        assert delay_codes(c).shape == (t + 7, 8)
        assert torch.equal(undelay_rows(delay_codes(c)), c)


def test_tts_sample_exact():
    tok, t = tiny_tokenizer(), tiny_tokens()
    text = "Hello there."
    text_ids = tok.encode(text, add_special_tokens=False)
    s = build_v3_sample(tok, t, text, target_codes=hand_codes(2), sample_id="a")
    prompt = [t.tts, t.text, *text_ids, t.audio]
    assert s["input_ids"].tolist() == prompt + [AUDIO_SLOT] * 9
    assert s["prompt_length"] == len(prompt) and s["target_frames"] == 2 and s["ref_frames"] == 0
    slots = (s["input_ids"] == AUDIO_SLOT).nonzero().flatten().tolist()
    assert slots == list(range(len(prompt), len(prompt) + 9))
    assert torch.equal(s["audio_codes"][slots], DELAYED_T2)
    assert torch.equal(s["audio_labels"][slots], LABELS_T2_ALL)
    assert (s["audio_labels"][: len(prompt)] == X).all()  # the prompt is never labelled
    assert (s["audio_roles"][slots] == ROLE_TARGET).all() and (s["audio_roles"][: len(prompt)] == 0).all()
    first = build_v3_sample(tok, t, text, target_codes=hand_codes(2), eoc_labels="first")
    assert torch.equal(first["audio_labels"][slots], LABELS_T2_FIRST)


def test_voice_clone_sample_exact_and_prompt_is_its_prefix():
    tok, t = tiny_tokenizer(), tiny_tokens()
    ref, target = random_codes(3, seed=1), hand_codes(2)
    s = build_v3_sample(tok, t, "New words.", target_codes=target, ref_codes=ref, ref_text="Old words.")
    ref_ids = tok.encode("Old words.", add_special_tokens=False)
    text_ids = tok.encode("New words.", add_special_tokens=False)
    prompt = [t.tts, t.ref_text, *ref_ids, t.ref_audio, *[AUDIO_SLOT] * 10, t.text, *text_ids, t.audio]
    assert s["input_ids"].tolist() == prompt + [AUDIO_SLOT] * 9
    ref_start = 3 + len(ref_ids)
    ref_slots = list(range(ref_start, ref_start + 10))
    assert (s["audio_roles"] == ROLE_REFERENCE).nonzero().flatten().tolist() == ref_slots
    assert torch.equal(s["audio_codes"][ref_slots], delay_codes(ref))
    assert (s["audio_labels"][ref_slots] == X).all()  # the reference is context, never a target
    assert torch.equal(s["audio_labels"][len(prompt) :], LABELS_T2_ALL)
    assert s["task"] == "voice_clone" and s["ref_frames"] == 3

    p = build_v3_sample(tok, t, "New words.", ref_codes=ref, ref_text="Old words.")
    assert p["input_ids"].tolist() == prompt
    for key in ("audio_codes", "audio_roles"):
        assert torch.equal(p[key], s[key][: len(prompt)])
    assert (p["audio_labels"] == X).all()
    # audio-only cloning (no transcript), as the engines allow
    q = build_v3_sample(tok, t, "New words.", ref_codes=ref)
    assert q["input_ids"].tolist() == [t.tts, t.ref_audio, *[AUDIO_SLOT] * 10, t.text, *text_ids, t.audio]


def test_arabic_text():
    tok, t = tiny_tokenizer(), tiny_tokens()
    text = "مرحبا بكم في هذا الاختبار"
    s = build_v3_sample(
        tok, t, text, target_codes=random_codes(4, 0), ref_codes=random_codes(2, 1), ref_text="صباح الخير"
    )
    ids = s["input_ids"].tolist()
    text_ids = tok.encode(text, add_special_tokens=False)
    start = ids.index(t.text) + 1
    assert ids[start : start + len(text_ids)] == text_ids and ids[start + len(text_ids)] == t.audio
    assert tok.decode(text_ids) == text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=""), "empty or whitespace"),
        (dict(text="  \n\t "), "empty or whitespace"),
        (dict(text="say <|tiny_control_1|> this"), "<|tiny_control_1|>"),
        (dict(text="say <|audio|> this"), "<|audio|>"),
        (dict(text="fine", ref_codes=random_codes(2, 0), ref_text="bad <|ref_audio|>"), "<|ref_audio|>"),
        (dict(text="fine", ref_codes=random_codes(2, 0), ref_text=" "), "reference transcript is empty"),
        (dict(text="fine", ref_text="no audio"), "without reference audio"),
        (dict(text="fine", target_codes=torch.full((8, 2), 1024)), "outside 0..1023"),
        (dict(text="fine", target_codes=torch.zeros((7, 2), dtype=torch.long)), "expected (8, T>0)"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(DataError, match=None) as e:
        build_v3_sample(tiny_tokenizer(), tiny_tokens(), sample_id="bad", **kwargs)
    assert message in str(e.value) and "'bad'" in str(e.value)


def test_collate_pads_right():
    tok, t = tiny_tokenizer(), tiny_tokens()
    a = build_v3_sample(tok, t, "One.", target_codes=random_codes(2, 0))
    b = build_v3_sample(tok, t, "A longer sentence here.", target_codes=random_codes(5, 1))
    batch = collate_v3([a, b], tok.pad_token_id)
    n = a["input_ids"].shape[0]
    assert batch["input_ids"].shape[0] == 2 and batch["audio_codes"].shape[-1] == 8
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["audio_labels"][0, n:] == X).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
