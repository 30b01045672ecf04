"""v3 generation: the reference stop rule returns exactly T frames (constructed logits and an overfit tiny model)."""

from __future__ import annotations

import pytest
import torch
from v3_support import load_tiny_model, random_codes, tiny_tokenizer, tiny_tokens

from higgs_tune.families.v3.generate import V3Sampling, constrain_logits, generate_rows, generate_v3
from higgs_tune.families.v3.layout import BOC, EOC, build_v3_sample, collate_v3, delay_codes

K, V = 8, 1026


def scripted(rows: torch.Tensor, peak: float = 50.0, fallback=None):
    """A stepper whose logits at row r put `peak` on rows[r] (EOC everywhere past the end)."""
    fed = []

    def logits_for(r):
        out = torch.zeros(K, V)
        if r < rows.shape[0]:
            out[torch.arange(K), rows[r]] = peak
        else:
            out[:, EOC if fallback is None else fallback] = peak
        return out

    def step(row):
        fed.append(row.clone())
        return logits_for(len(fed))

    return (logits_for(0), step), fed


@pytest.mark.parametrize("frames", [1, 2, 5, 7, 8, 9, 20])
def test_stop_rule_gives_exactly_t_frames(frames):
    codes = random_codes(frames, seed=frames)
    delayed = delay_codes(codes)
    stepper, fed = scripted(delayed)
    gen = generate_rows(stepper, K, V3Sampling(temperature=0))
    assert gen.stopped and gen.num_frames == frames and torch.equal(gen.codes, codes)
    assert torch.equal(gen.rows, delayed)  # T + 7 rows: 6 more after codebook 0's EOC at row T
    assert len(fed) == frames + 6  # the last row is never fed back
    sampled = generate_rows(scripted(delayed)[0], K, V3Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=0))
    assert torch.equal(sampled.codes, codes)


def test_agreed_rows_drive_the_loop_and_the_stop():
    """`agree` (rank 0's row under FSDP) replaces each sampled row: the loop feeds, keeps and stops on it."""
    mine, rank0 = delay_codes(random_codes(9, seed=1)), delay_codes(random_codes(4, seed=2))
    stepper, fed = scripted(mine)  # this rank's model would generate 9 frames
    seen = []

    def agree(row):
        seen.append(row.clone())
        return rank0[len(seen) - 1]

    gen = generate_rows(stepper, K, V3Sampling(temperature=0), agree=agree)
    assert torch.equal(gen.rows, rank0) and gen.num_frames == 4 and gen.stopped  # rank 0's rows and stop
    assert torch.equal(torch.stack(fed), rank0[:-1])  # the model was fed rank 0's rows
    assert torch.equal(seen[0], mine[0])  # agree saw this rank's own sample


def test_layout_is_forced_where_the_training_layout_is_fixed():
    codes = random_codes(4, seed=0)
    delayed = delay_codes(codes)
    # a model that wants EOC on every codebook from the start, except where codes are due
    wrong = delayed.clone()
    wrong[wrong == BOC] = EOC
    for c in range(K):
        wrong[4 + c + 1 :, c] = 7  # ... and a code instead of the EOC fill after a codebook's first EOC
    stepper, fed = scripted(wrong)
    gen = generate_rows(stepper, K, V3Sampling(temperature=0))
    assert torch.equal(gen.rows, delayed)  # BOC forced in the delay head, EOC fill forced after the stop
    # constrain_logits: before the stop, EOC only on codebook 0 (from min_frames), never BOC on a code
    masked = constrain_logits(torch.zeros(K, V), row=3, eoc_row=None, min_frames=1)
    assert masked[0, EOC] == 0 and torch.isinf(masked[1:4, EOC]).all() and torch.isinf(masked[:4, BOC]).all()
    assert (masked[4:, BOC] == 0).all() and torch.isinf(masked[4:, :BOC]).all()
    assert torch.isinf(constrain_logits(torch.zeros(K, V), row=0, eoc_row=None, min_frames=1)[0, EOC])


def test_max_frames_without_stop():
    never = torch.randint(0, 1024, (100, K), generator=torch.Generator().manual_seed(0))
    gen = generate_rows(scripted(never, fallback=5)[0], K, V3Sampling(temperature=0, max_frames=10))
    assert not gen.stopped and gen.rows.shape[0] == 17 and gen.num_frames == 10


def test_overfit_tiny_model_generates_its_targets():
    """TTS (a short 3-frame target) and voice cloning (9 frames), greedy, through the KV-cached loop."""
    tok, t = tiny_tokenizer(), tiny_tokens()
    tts_codes, clone_codes, ref = random_codes(3, 11), random_codes(9, 12), random_codes(4, 13)
    samples = [
        build_v3_sample(tok, t, "Short one.", target_codes=tts_codes),
        build_v3_sample(tok, t, "كلمات جديدة", target_codes=clone_codes, ref_codes=ref, ref_text="Old words."),
    ]
    batch = collate_v3(samples, tok.pad_token_id)
    torch.manual_seed(0)
    model = load_tiny_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.accuracy == 1.0
    gen = generate_v3(model, tok, t, "Short one.", sampling=V3Sampling(temperature=0))
    assert gen.stopped and gen.num_frames == 3 and torch.equal(gen.codes, tts_codes)
    gen = generate_v3(
        model, tok, t, "كلمات جديدة", ref_codes=ref, ref_text="Old words.", sampling=V3Sampling(temperature=0)
    )
    assert gen.stopped and gen.num_frames == 9 and torch.equal(gen.codes, clone_codes)
    assert model.training  # generate_v3 restores the mode
