"""Sample layout: delay pattern, labels, parity with the transformers processor, overfit + generate."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor

from higgs_tune.data.collate import Collator
from higgs_tune.data.layout import (
    IGNORE_INDEX,
    ROLE_REFERENCE,
    ROLE_TARGET,
    Conversation,
    SpecialTokens,
    build_prompt,
    build_sample,
    delay_pattern,
    generated_codes,
    reference_lengths,
    revert_delay_pattern,
    sample_lengths,
    target_audio_labels,
)
from higgs_tune.errors import DataError, ModelLoadError

B, E, X = 1024, 1025, IGNORE_INDEX  # stream BOS, stream EOS, no label


@pytest.fixture(scope="module")
def stack(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    processor = HiggsAudioV2Processor.from_pretrained(tiny_dir)
    config = HiggsAudioV2Config.from_pretrained(tiny_dir)
    return tokenizer, processor, config, SpecialTokens.from_tokenizer(tokenizer, config)


def _codes(k: int, t: int, start: int) -> torch.Tensor:
    """Hand-made (K, T) codes: row k holds start + 10k, start + 10k + 1, ... (distinct, readable)."""
    return torch.tensor([[start + 10 * row + j for j in range(t)] for row in range(k)])


# ----------------------------------------------------------------------------- special tokens
def test_special_tokens_from_config_and_processor_agree(stack):
    tokenizer, processor, config, tokens = stack
    assert SpecialTokens.from_tokenizer(tokenizer, processor) == tokens
    ids = tokenizer.convert_tokens_to_ids
    assert tokens.audio_out == ids("<|AUDIO_OUT|>") == config.audio_token_id
    assert tokens.audio_delay == ids("<|reserved_special_token_6|>") == config.audio_delay_token_id
    assert tokens.audio_out_bos == ids("<|audio_out_bos|>") and tokens.audio_eos == ids("<|audio_eos|>")
    assert tokens.eot == ids("<|eot_id|>") and tokens.begin_of_text == ids("<|begin_of_text|>")
    assert (tokens.pad, tokens.stream_bos, tokens.stream_eos, tokens.num_codebooks) == (
        tokenizer.pad_token_id,
        1024,
        1025,
        8,
    )
    assert tokens.num_columns(20) == 20 + 2 + 7


def test_special_tokens_reject_a_config_that_disagrees_with_the_tokenizer(stack):
    tokenizer, _, config, _ = stack
    wrong = HiggsAudioV2Config(**{**config.to_dict(), "audio_token_id": config.audio_token_id + 1})
    with pytest.raises(ModelLoadError, match="audio_out: config"):
        SpecialTokens.from_tokenizer(tokenizer, wrong)
    small = HiggsAudioV2Config(**{**config.to_dict(), "codebook_size": 1024})
    with pytest.raises(ModelLoadError, match="codebook_size=1024"):
        SpecialTokens.from_tokenizer(tokenizer, small)


# ----------------------------------------------------------------------------- delay pattern
def test_delay_pattern_k3_worked_example():
    codes = torch.tensor([[11, 12], [21, 22], [31, 32]])  # (K=3, T=2)
    expected = torch.tensor(
        [
            [B, 11, 12, E, E, E],
            [B, B, 21, 22, E, E],
            [B, B, B, 31, 32, E],
        ]
    )
    assert torch.equal(delay_pattern(codes, B, E), expected)
    assert torch.equal(revert_delay_pattern(expected), torch.tensor([[B, 11, 12, E], [B, 21, 22, E], [B, 31, 32, E]]))
    assert torch.equal(
        target_audio_labels(codes, E),
        torch.tensor(
            [
                [X, 11, 12, E, X, X],
                [X, X, 21, 22, E, X],
                [X, X, X, 31, 32, E],
            ]
        ),
    )


def test_delay_pattern_k8_equals_processor_build_delay_pattern(stack):
    processor = stack[1]
    codes = _codes(8, 3, start=100)  # (8, 3)
    ours = delay_pattern(codes, B, E)
    assert ours.shape == (8, 3 + 2 + 7)
    for k in range(8):  # row k = (k+1) x BOS, the 3 codes, (8-k) x EOS
        assert ours[k].tolist() == [B] * (k + 1) + codes[k].tolist() + [E] * (8 - k)
    with_markers = torch.cat([torch.full((8, 1), B), codes, torch.full((8, 1), E)], dim=1)[None]
    assert torch.equal(processor.build_delay_pattern(with_markers)[0], ours)
    assert torch.equal(revert_delay_pattern(ours)[:, 1:-1], codes)
    assert torch.equal(processor.revert_delay_pattern(ours.T).T, revert_delay_pattern(ours))


# ----------------------------------------------------------------------------- hand-made samples
def test_k3_sample_matches_the_docstring_example(stack):
    tokenizer, _, _, tokens = stack
    tokens3 = dataclasses.replace(tokens, num_codebooks=3)
    sample = build_sample(
        Conversation.tts("Hello."), tokenizer, tokens3, target_codes=torch.tensor([[11, 12], [21, 22], [31, 32]])
    )
    ids = sample["input_ids"]
    aob = int((ids == tokens.audio_out_bos).nonzero()[0, 0])
    ao, d = tokens.audio_out, tokens.audio_delay
    assert ids[aob:].tolist() == [tokens.audio_out_bos, ao, ao, ao, ao, d, d, tokens.audio_eos, tokens.eot]
    assert sample["labels"][aob:].tolist() == [tokens.audio_out_bos, X, X, X, X, X, X, tokens.audio_eos, tokens.eot]
    assert (sample["labels"][:aob] == X).all()
    assert torch.equal(
        sample["audio_input_ids"].T,
        torch.tensor(
            [
                [B, 11, 12, E, E, E],
                [B, B, 21, 22, E, E],
                [B, B, B, 31, 32, E],
            ]
        ),
    )
    assert torch.equal(
        sample["audio_labels"].T,
        torch.tensor(
            [
                [X, 11, 12, E, X, X],
                [X, X, 21, 22, E, X],
                [X, X, X, 31, 32, E],
            ]
        ),
    )
    assert sample["audio_roles"].tolist() == [ROLE_TARGET] * 6
    (seg,) = sample["segments"]
    assert (seg.role, seg.num_frames, seg.token_start, seg.token_end, seg.audio_start, seg.audio_end) == (
        ROLE_TARGET,
        2,
        aob + 1,
        aob + 7,
        0,
        6,
    )


def test_k8_voice_clone_sample_inputs_and_labels(stack):
    tokenizer, _, _, tokens = stack
    ref, target = _codes(8, 2, start=100), _codes(8, 3, start=500)  # 2- and 3-frame clips
    conv = Conversation.voice_clone("Close the window.", "The cat sat.", scene="A quiet room.")
    s = build_sample(
        conv, tokenizer, tokens, target_codes=target, ref_codes=ref, sample_id="clip-1", reference="clip-0"
    )
    ids, audio, labels = s["input_ids"], s["audio_input_ids"], s["audio_labels"]
    ref_seg, tgt_seg = s["segments"]
    assert (s["sample_id"], s["task"], s["reference"]) == ("clip-1", "voice_clone", "clip-0")

    # placeholders: (T+2) x AUDIO_OUT then 7 x delay, framed by <|audio_out_bos|> ... <|audio_eos|>
    for seg, t in ((ref_seg, 2), (tgt_seg, 3)):
        assert ids[seg.token_start - 1] == tokens.audio_out_bos and ids[seg.token_end] == tokens.audio_eos
        assert ids[seg.token_start : seg.token_end].tolist() == [tokens.audio_out] * (t + 2) + [tokens.audio_delay] * 7
        assert seg.audio_end - seg.audio_start == seg.token_end - seg.token_start == t + 9
    assert (ref_seg.audio_start, ref_seg.audio_end, tgt_seg.audio_start, tgt_seg.audio_end) == (0, 11, 11, 23)
    assert audio.shape == labels.shape == (23, 8)
    assert s["audio_roles"].tolist() == [ROLE_REFERENCE] * 11 + [ROLE_TARGET] * 12

    # inputs: BOS at the start, EOS at the end of every row, of both segments
    for seg, codes in ((ref_seg, ref), (tgt_seg, target)):
        block = audio[seg.audio_start : seg.audio_end].T  # (8, T+9)
        for k in range(8):
            assert block[k].tolist() == [B] * (k + 1) + codes[k].tolist() + [E] * (8 - k)

    # labels: reference all masked; target row k = (k+1) x -100, codes, one EOS, (7-k) x -100
    assert (labels[:11] == X).all()
    tgt_labels = labels[11:].T
    for k in range(8):
        assert tgt_labels[k].tolist() == [X] * (k + 1) + target[k].tolist() + [E] + [X] * (7 - k)
    assert ((labels == E).sum(dim=0) == 1).all()  # exactly one EOS label per codebook
    assert not (labels == B).any()  # BOS is never a label
    assert (labels[tgt_seg.audio_start] == X).all()  # first column masked: no shift leaks across segments

    # text labels: the target turn's <|audio_out_bos|>, <|audio_eos|>, <|eot_id|> only
    trained = (s["labels"] != X).nonzero().flatten().tolist()
    assert trained == [tgt_seg.token_start - 1, tgt_seg.token_end, tgt_seg.token_end + 1]
    assert [int(s["labels"][p]) for p in trained] == [tokens.audio_out_bos, tokens.audio_eos, tokens.eot]
    assert int(ids[-1]) == tokens.eot and len(ids) == tgt_seg.token_end + 2


def test_prompt_is_the_sample_cut_after_the_target_audio_out_bos(stack):
    tokenizer, _, _, tokens = stack
    ref, target = _codes(8, 2, start=100), _codes(8, 3, start=500)
    conv = Conversation.voice_clone("Close the window.", "The cat sat.")
    s = build_sample(conv, tokenizer, tokens, target_codes=target, ref_codes=ref)
    p = build_prompt(conv, tokenizer, tokens, ref_codes=ref)
    cut = s["segments"][1].token_start
    assert torch.equal(p["input_ids"][0], s["input_ids"][:cut]) and int(p["input_ids"][0, -1]) == tokens.audio_out_bos
    assert torch.equal(p["audio_input_ids"][0], s["audio_input_ids"][:11])
    assert p["attention_mask"].dtype == torch.long and bool(p["attention_mask"].all())
    assert p["audio_input_ids_mask"].shape == (1, 11) and bool(p["audio_input_ids_mask"].all())
    tts = build_prompt(Conversation.tts("Close the window."), tokenizer, tokens)
    assert set(tts) == {"input_ids", "attention_mask"}  # no reference: no audio keys, like the processor


def test_lengths_from_frame_counts_equal_built_samples(stack):
    tokenizer, _, _, tokens = stack
    tts = Conversation.tts("مرحبا بكم في البيت.", scene="Studio.")
    clone = Conversation.voice_clone("مرحبا بكم في البيت.", "The cat sat on the mat.", scene="Studio.")
    ref, target = _codes(8, 4, start=0), _codes(8, 7, start=200)
    n_tts, n_clone = sample_lengths([tts, clone], tokenizer, tokens, [7, 7], [None, 4])
    assert n_tts == len(build_sample(tts, tokenizer, tokens, target_codes=target)["input_ids"])
    assert n_clone == len(build_sample(clone, tokenizer, tokens, target_codes=target, ref_codes=ref)["input_ids"])
    assert n_clone == n_tts + reference_lengths(["The cat sat on the mat."], [4], tokenizer, tokens)[0]


def test_markup_in_a_transcript_is_a_data_error_naming_the_sample(stack):
    tokenizer, _, _, tokens = stack
    bad = Conversation.tts("Say <|eot_id|> twice <|AUDIO_OUT|>.")
    with pytest.raises(DataError, match=r"'clip-7'.*<\|AUDIO_OUT\|>.*<\|eot_id\|>"):
        build_sample(bad, tokenizer, tokens, target_codes=_codes(8, 2, 0), sample_id="clip-7")


def test_codes_out_of_range_or_wrong_codebooks_are_data_errors(stack):
    tokenizer, _, _, tokens = stack
    conv = Conversation.tts("Hi.")
    with pytest.raises(DataError, match="'c1'.*outside 0..1023"):
        build_sample(conv, tokenizer, tokens, target_codes=torch.full((8, 2), 1024), sample_id="c1")
    with pytest.raises(DataError, match=r"'c2'.*\(4, 2\).*\(8, T>0\)"):
        build_sample(conv, tokenizer, tokens, target_codes=torch.zeros(4, 2, dtype=torch.long), sample_id="c2")


def test_generated_codes_reverts_and_strips_markers(stack):
    tokens = stack[3]
    target = _codes(8, 3, start=300)
    prompt_cols = torch.full((5, 8), 7)  # stand-in reference columns
    seq = torch.cat([prompt_cols, delay_pattern(target, B, E).T])[None]  # (1, 5 + 12, 8) as generate returns
    assert torch.equal(generated_codes(seq, 5, tokens), target)
    # cut short by max_new_tokens before any EOS: the complete frames so far
    assert torch.equal(generated_codes(seq[:, : 5 + 10], 5, tokens), target[:, :2])


# ----------------------------------------------------------------------------- parity with the processor
def _waveform(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * math.pi * (180 + 40 * seed) * t) + 0.05 * rng.randn(t.size)).astype(np.float32)


def _encode(processor, wav: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return processor.audio_tokenizer.encode(torch.from_numpy(wav)[None, None]).audio_codes[0]  # (K, T)


PARITY_CASES = {
    "clone_arabic_scene": Conversation.voice_clone(
        "مرحبا بكم في البيت، كيف حالك؟", "The cat sat on the mat.", scene="Recorded in a quiet room."
    ),
    "clone_english": Conversation.voice_clone(
        "Please close the window before you leave.", "The morning train was right on time."
    ),
    "tts_scene": Conversation.tts("My sister likes green tea with honey.", scene="A busy street."),
    "tts_arabic": Conversation.tts("مرحبا بكم في البيت."),
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_prompt_parity_with_processor_apply_chat_template(stack, name):
    tokenizer, processor, _, tokens = stack
    conv = PARITY_CASES[name]
    ref_wav = _waveform(1.0, seed=1) if conv.ref_text is not None else None
    theirs = processor.apply_chat_template(
        conv.messages(ref_audio=ref_wav),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        sampling_rate=24000,
        return_tensors="pt",
    )
    ref_codes = _encode(processor, ref_wav) if ref_wav is not None else None
    ours = build_prompt(conv, tokenizer, tokens, ref_codes=ref_codes)
    assert set(ours) == set(theirs.keys())
    for key in theirs.keys():
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert processor.apply_chat_template(conv.messages(ref_audio=ref_wav), add_generation_prompt=True) == conv.render(
        generation_prompt=True
    )


@pytest.mark.parametrize("name", ["clone_arabic_scene", "tts_scene"])
def test_training_sample_parity_and_documented_label_differences(stack, name):
    tokenizer, processor, _, tokens = stack
    conv = PARITY_CASES[name]
    ref_wav = _waveform(1.0, seed=1) if conv.ref_text is not None else None
    target_wav = _waveform(0.6, seed=2)
    theirs = processor.apply_chat_template(
        conv.messages(ref_audio=ref_wav, target_audio=target_wav),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=False,
        sampling_rate=24000,
        return_tensors="pt",
        output_labels=True,
    )
    ref_codes = _encode(processor, ref_wav) if ref_wav is not None else None
    target_codes = _encode(processor, target_wav)
    ours = build_sample(conv, tokenizer, tokens, target_codes=target_codes, ref_codes=ref_codes)
    ids = ours["input_ids"]
    assert torch.equal(ids, theirs["input_ids"][0])
    assert torch.equal(ours["audio_input_ids"], theirs["audio_input_ids"][0])

    # Text labels. Theirs label every token except <|AUDIO_OUT|> and <|audio_out_bos|>; ours only
    # the target turn's <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>. So they differ exactly at
    # (a) every non-placeholder token before the target turn's audio (system, scene, user turns,
    #     headers, the reference turn's markup) and every delay placeholder (theirs label them as
    #     text!) -- ours mask them: -100 vs the token id;
    # (b) the target <|audio_out_bos|>: ours train it, theirs mask it.
    p_text, o_text = theirs["labels"][0], ours["labels"]
    target = ours["segments"][-1]
    aob = target.token_start - 1
    masked_by_us = {
        p
        for p in range(len(ids))
        if (p < aob and int(ids[p]) not in (tokens.audio_out, tokens.audio_out_bos))
        or int(ids[p]) == tokens.audio_delay
    }
    diff = set((p_text != o_text).nonzero().flatten().tolist())
    assert diff == masked_by_us | {aob}
    assert all(int(o_text[p]) == X and int(p_text[p]) == int(ids[p]) for p in masked_by_us)
    assert (int(o_text[aob]), int(p_text[aob])) == (tokens.audio_out_bos, X)
    assert len(masked_by_us) > 20  # system prompt, headers, user text ...

    # Audio labels. Theirs label every code (reference included) and mask BOS and EOS. So they differ
    # exactly at (a) the reference codes (ours -100) and (b) the first EOS of each codebook in the
    # target segment (ours train it: how the model learns to stop). One EOS per codebook.
    p_audio, o_audio = theirs["audio_labels"][0], ours["audio_labels"]
    audio_in = ours["audio_input_ids"]
    expected = torch.zeros_like(audio_in, dtype=torch.bool)
    for seg in ours["segments"]:
        if seg.role == ROLE_REFERENCE:
            block = audio_in[seg.audio_start : seg.audio_end]
            expected[seg.audio_start : seg.audio_end] = (block != B) & (block != E)
        else:
            for k in range(8):
                expected[seg.audio_start + k + 1 + seg.num_frames, k] = True
    assert torch.equal(p_audio != o_audio, expected)
    assert (o_audio[expected] != p_audio[expected]).all()
    assert ((o_audio == E).sum(dim=0) == 1).all() and not (p_audio == E).any()


# ----------------------------------------------------------------------------- overfit + generate
def test_full_finetune_on_one_sample_then_greedy_generation_reproduces_it_and_stops(tiny_dir, stack):
    """Layout, labels and the generation prompt agree: a tiny model fully fine-tuned on one voice
    cloning sample (20 target frames) with the model's own loss regenerates exactly its codes and
    stops on its own (stream EOS learned, reference masked)."""
    tokenizer, _, _, tokens = stack
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    g = torch.Generator().manual_seed(0)
    # Distinct codes per codebook: generation's repetition-aware sampling (ras_win_len) never
    # resamples, so greedy decoding is fully deterministic.
    codes = torch.stack([torch.randperm(1024, generator=g)[:26] for _ in range(8)])
    ref, target = codes[:, :6], codes[:, 6:]  # (8, 6), (8, 20)
    conv = Conversation.voice_clone("Please close the window.", "The cat sat on the mat.")
    batch = Collator(tokens)(
        [build_sample(conv, tokenizer, tokens, target_codes=target, ref_codes=ref, sample_id="one")]
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")}

    start = time.perf_counter()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 200
    for _ in range(steps):
        loss = model(**inputs, labels=batch["labels"], audio_labels=batch["audio_labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    assert loss.item() < 0.5, loss.item()

    model.eval()
    prompt = build_prompt(conv, tokenizer, tokens, ref_codes=ref)
    prompt_cols = prompt["audio_input_ids"].shape[1]
    max_new = 60
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=False, max_new_tokens=max_new)
    new_cols = out.shape[1] - prompt_cols
    print(f"\noverfit: {steps} steps in {train_s:.1f} s, final loss {loss.item():.3f}; generated {new_cols} columns")
    assert torch.equal(generated_codes(out, prompt_cols, tokens), target)
    # stopped by itself: exactly the target's delay-patterned columns, ending all-EOS
    assert new_cols == tokens.num_columns(20) < max_new
    assert torch.equal(out[0, prompt_cols:], delay_pattern(target, B, E).T)
