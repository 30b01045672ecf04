"""The loss module on hand-made batches of the documented layout (docs/CONTRACTS.md "Batch").

The batches are built here, token by token, from the contract (not with the project's collator)
so a collator bug cannot hide a loss bug. The reference loss is computed with explicit loops:
per audio segment, column j's label is predicted by the hidden state of the placeholder before
it (j >= 1 only: column 0 is all BOS and never a label), text label at t by the state at t-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

from higgs_tune.config import ConfigError, LossConfig
from higgs_tune.errors import DataError
from higgs_tune.train.loss import HiggsLossModule, StepMetrics, TokenCounts, finalize_metrics

K = 8
BOS, EOS = 1024, 1025  # stream BOS/EOS of the tiny model (codebook_size 1026)


# ---------------------------------------------------------------------- batch builder
@dataclass
class Segment:
    """Where one audio segment sits: text positions start..start+columns-1, audio columns col..col+columns-1."""

    row: int
    start: int
    columns: int
    col: int
    trained: bool


def delay_pattern(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, T) codes -> inputs and labels, both (T+K+1, K), as the contract states.

    input row k = (k+1) x BOS, the T codes, (K-k) x EOS; label row k = (k+1) x -100, the T
    codes, ONE EOS, (K-1-k) x -100.
    """
    k_, t_ = codes.shape
    n = t_ + k_ + 1
    inp = torch.full((k_, n), EOS, dtype=torch.long)
    lab = torch.full((k_, n), -100, dtype=torch.long)
    for k in range(k_):
        inp[k, : k + 1] = BOS
        inp[k, k + 1 : k + 1 + t_] = codes[k]
        lab[k, k + 1 : k + 1 + t_] = codes[k]
        lab[k, k + 1 + t_] = EOS
    return inp.T.contiguous(), lab.T.contiguous()


def build_sample(tok, config, turns):
    """turns: ("system"|"user", text) or ("assistant", codes (K, T), trained: bool).

    Returns ids, text labels, audio input columns (N, K), audio labels (N, K), roles (N,), and
    the segments (row filled in by `collate`). Only a trained assistant turn has labels: its
    <|audio_out_bos|>, <|audio_eos|>, <|eot_id|> and its audio labels.
    """
    ids, labels, a_in, a_lab, roles, segs = [], [], [], [], [], []

    def text(s, label=False):
        t = tok(s, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if label else [-100] * len(t))

    text("<|begin_of_text|>")
    for turn in turns:
        role = turn[0]
        text(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
        if role != "assistant":
            text(turn[1])
            text("<|eot_id|>")
            continue
        codes, trained = turn[1], turn[2]
        text("<|audio_out_bos|>", label=trained)
        inp, lab = delay_pattern(codes)
        n = inp.shape[0]
        segs.append(Segment(row=-1, start=len(ids), columns=n, col=sum(x.shape[0] for x in a_in), trained=trained))
        t_frames = codes.shape[1]
        ids.extend([config.audio_token_id] * (t_frames + 2) + [config.audio_delay_token_id] * (K - 1))
        labels.extend([-100] * n)
        a_in.append(inp)
        a_lab.append(lab if trained else torch.full_like(lab, -100))
        roles.append(torch.full((n,), 2 if trained else 1, dtype=torch.long))
        text("<|audio_eos|>", label=trained)
        text("<|eot_id|>", label=trained)
    return dict(
        ids=ids, labels=labels, a_in=torch.cat(a_in), a_lab=torch.cat(a_lab), roles=torch.cat(roles), segments=segs
    )


def collate(samples, pad_id, sample_ids=None):
    """Right padding; audio pad = stream EOS with mask False, labels -100, role 0."""
    B = len(samples)
    L = max(len(s["ids"]) for s in samples)
    N = max(s["a_in"].shape[0] for s in samples)
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, L), dtype=torch.long),
        "labels": torch.full((B, L), -100, dtype=torch.long),
        "audio_input_ids": torch.full((B, N, K), EOS, dtype=torch.long),
        "audio_input_ids_mask": torch.zeros((B, N), dtype=torch.bool),
        "audio_labels": torch.full((B, N, K), -100, dtype=torch.long),
        "audio_roles": torch.zeros((B, N), dtype=torch.long),
        "sample_ids": list(sample_ids or [f"s{i}" for i in range(B)]),
    }
    segments = []
    for b, s in enumerate(samples):
        n, c = len(s["ids"]), s["a_in"].shape[0]
        batch["input_ids"][b, :n] = torch.tensor(s["ids"])
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = torch.tensor(s["labels"])
        batch["audio_input_ids"][b, :c] = s["a_in"]
        batch["audio_input_ids_mask"][b, :c] = True
        batch["audio_labels"][b, :c] = s["a_lab"]
        batch["audio_roles"][b, :c] = s["roles"]
        for seg in s["segments"]:
            seg.row = b
            segments.append(seg)
    return batch, segments


def random_codes(T, generator, high=1024):
    return torch.randint(0, high, (K, T), generator=generator)


def two_row_batch(tok, config, seed=0, high=1024, sample_ids=("clone-0", "tts-1")):
    """Row 0: voice clone (reference segment 5 frames, untrained; target 4 frames). Row 1: TTS, target 7 frames."""
    g = torch.Generator().manual_seed(seed)
    system = ("system", "Generate audio following instruction.")
    row0 = build_sample(
        tok,
        config,
        [
            system,
            ("user", "The cat sat on the mat."),
            ("assistant", random_codes(5, g, high), False),
            ("user", "A short target line."),
            ("assistant", random_codes(4, g, high), True),
        ],
    )
    row1 = build_sample(
        tok, config, [system, ("user", "Hello there, good morning."), ("assistant", random_codes(7, g, high), True)]
    )
    return collate([row0, row1], tok.pad_token_id, sample_ids)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    return HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()


@pytest.fixture(scope="module")
def batch_and_segments(tok, model):
    return two_row_batch(tok, model.config)


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")}


# ---------------------------------------------------------------------- reference
def reference(model, batch, segments, text_weight=1.0, audio_weight=1.0, codebook_weights=None):
    """The loss by explicit loops: per segment shift, per codebook, per text label."""
    C = model.config.codebook_size
    with torch.no_grad():
        h = model.model(**model_inputs(batch)).last_hidden_state  # (B, L, H)
    wt, wa = model.text_lm_head.weight, model.audio_lm_head.weight  # (V, H), (K*C, H)

    def ce(logits, target):
        return (torch.logsumexp(logits, -1) - logits[target]).item()

    text_ce, text_ok = [], 0
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                logits = h[b, t - 1] @ wt.T
                text_ce.append(ce(logits, labels[b, t]))
                text_ok += int(logits.argmax() == labels[b, t])
    cb_ce = [[] for _ in range(K)]
    cb_ok = [0] * K
    for seg in segments:
        for j in range(seg.columns):
            for k in range(K):
                lab = int(batch["audio_labels"][seg.row, seg.col + j, k])
                if lab == -100:
                    continue
                assert j >= 1, "a segment's first column is never a label"
                logits = (h[seg.row, seg.start + j - 1] @ wa.T).view(K, C)[k]
                cb_ce[k].append(ce(logits, lab))
                cb_ok[k] += int(logits.argmax() == lab)
    per_cb = [sum(v) / len(v) for v in cb_ce]
    w = codebook_weights or [1.0] * K
    audio = sum(wk * lk for wk, lk in zip(w, per_cb, strict=True)) / sum(w)
    text = sum(text_ce) / len(text_ce)
    return {
        "loss": text_weight * text + audio_weight * audio,
        "text_loss": text,
        "audio_loss": audio,
        "audio_loss_sum": sum(per_cb),
        "per_codebook_loss": per_cb,
        "per_codebook_acc": [ok / len(v) for ok, v in zip(cb_ok, cb_ce, strict=True)],
        "text_acc": text_ok / len(text_ce),
        "n_text_tokens": len(text_ce),
        "n_audio_tokens_per_codebook": [len(v) for v in cb_ce],
    }


# ---------------------------------------------------------------------- tests
def test_hand_made_batch_follows_the_contract(tok, model, batch_and_segments):
    batch, segments = batch_and_segments
    # 2 rows of different lengths, right padded; row 0 has a reference and a target segment
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and batch["input_ids"].shape[1] == max(lengths)
    assert [(s.row, s.trained, s.columns) for s in segments] == [(0, False, 5 + 9), (0, True, 4 + 9), (1, True, 7 + 9)]
    ids = tok.convert_tokens_to_ids
    # text labels: exactly <|audio_out_bos|>, <|audio_eos|>, <|eot_id|> of each target turn
    for b in range(2):
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert labelled == [ids("<|audio_out_bos|>"), ids("<|audio_eos|>"), ids("<|eot_id|>")]
    # audio labels sit at the same column as the input; reference all -100
    set_ = batch["audio_labels"] != -100
    assert torch.equal(batch["audio_labels"][set_], batch["audio_input_ids"][set_])
    ref = segments[0]
    assert (batch["audio_labels"][0, ref.col : ref.col + ref.columns] == -100).all()
    # each codebook of a target segment: T codes + one EOS labelled, first column all -100
    tgt = segments[2]
    lab = batch["audio_labels"][1, tgt.col : tgt.col + tgt.columns]
    assert (lab[0] == -100).all()
    assert (lab != -100).sum(0).tolist() == [7 + 1] * K
    assert ((lab == EOS).sum(0) == 1).all()


def test_loss_equals_hand_computed_reference(model, batch_and_segments):
    batch, segments = batch_and_segments
    module = HiggsLossModule(model, LossConfig(text_weight=0.5, audio_weight=2.0))
    with torch.no_grad():
        out = module(**batch)
    ref = reference(model, batch, segments, text_weight=0.5, audio_weight=2.0)
    got = out.metrics()
    for key in ("loss", "text_loss", "audio_loss", "audio_loss_sum", "text_acc"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    for key in ("per_codebook_loss", "per_codebook_acc"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert got["n_text_tokens"] == ref["n_text_tokens"] == 6
    # row 0 target: 4 codes + EOS, row 1: 7 codes + EOS, per codebook; the reference adds nothing
    assert got["n_audio_tokens_per_codebook"] == ref["n_audio_tokens_per_codebook"] == [5 + 8] * K
    assert got["n_audio_tokens"] == 13 * K
    assert got["n_samples"] == 2 and got["n_tokens"] == int(batch["attention_mask"].sum())
    # the tensors the recipe backpropagates agree with the report
    assert out.loss.item() == pytest.approx(ref["loss"], rel=1e-6)  # float32 scalar: 1 ulp at 17.7 is 2e-6
    assert out.shift == 1


def test_codebook_weights_reweight_the_audio_mean(model, batch_and_segments):
    batch, segments = batch_and_segments
    w = [4.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    module = HiggsLossModule(model, LossConfig(codebook_weights=w))
    with torch.no_grad():
        out = module(**batch)
    ref = reference(model, batch, segments, codebook_weights=w)
    assert out.audio_loss.item() == pytest.approx(ref["audio_loss"], abs=1e-6)
    # the sum over codebooks stays unweighted (comparable with the HF forward's loss)
    assert out.audio_loss_sum.item() == pytest.approx(ref["audio_loss_sum"], rel=1e-6)  # float32 scalar near 55
    with pytest.raises(ConfigError, match="8 codebooks"):
        HiggsLossModule(model, LossConfig(codebook_weights=[1.0] * 7))


def test_text_and_audio_ce_equal_the_full_head_forward(model, batch_and_segments):
    """Heads at labelled rows only == the HF forward's full (B, L, V) / (B, L, K*C) logits path."""
    batch, _ = batch_and_segments
    module = HiggsLossModule(model, LossConfig())
    with torch.no_grad():
        out = module(**batch)
        full_text = model(**model_inputs(batch), labels=batch["labels"]).loss
        full_audio = model(**model_inputs(batch), audio_labels=batch["audio_labels"]).loss
        # and by hand: the full text head over all positions, then masked (shifted per row)
        h = model.model(**model_inputs(batch)).last_hidden_state
        logits = model.text_lm_head(h)  # (B, L, V)
        next_labels = batch["labels"][:, 1:]
        keep = next_labels != -100
        masked = torch.nn.functional.cross_entropy(logits[:, :-1][keep], next_labels[keep])
    assert out.text_loss.item() == pytest.approx(full_text.item(), abs=1e-6)
    assert out.text_loss.item() == pytest.approx(masked.item(), abs=1e-6)
    # the HF forward sums the per-codebook means: our unweighted audio_loss_sum
    assert out.audio_loss_sum.item() == pytest.approx(full_audio.item(), abs=1e-5)


def test_per_codebook_accuracy_exact_on_a_crafted_case(tiny_dir, tok):
    """Zero heads: every logit is 0, so CE = ln(C) exactly and argmax = 0 everywhere.

    Codebook k's target codes are 0 in exactly k of its 6 frames, so its accuracy is k/7
    (6 codes + the EOS label, which is never 0).
    """
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()
    with torch.no_grad():
        m.audio_lm_head.weight.zero_()
        m.text_lm_head.weight.zero_()
    codes = torch.arange(1, 7).repeat(K, 1)  # (K, 6) codes 1..6, never 0
    for k in range(K):
        codes[k, :k] = 0  # k of them 0 (codebook 7 has 6 zeros at most)
    sample = build_sample(
        tok,
        m.config,
        [("system", "Generate audio following instruction."), ("user", "Hi."), ("assistant", codes, True)],
    )
    batch, _ = collate([sample], tok.pad_token_id)
    with torch.no_grad():
        got = HiggsLossModule(m, LossConfig())(**batch).metrics()
    assert got["per_codebook_acc"] == [min(k, 6) / 7 for k in range(K)]
    assert got["n_audio_tokens_per_codebook"] == [7] * K
    assert got["per_codebook_loss"] == pytest.approx([math.log(1026)] * K, abs=1e-6)
    assert got["text_loss"] == pytest.approx(math.log(2048), abs=1e-6)
    assert got["text_acc"] == 0.0  # argmax 0 is never one of the three labelled specials
    assert got["audio_acc"] == pytest.approx(sum(min(k, 6) for k in range(K)) / (7 * K))


def test_never_materialises_full_logits(model, batch_and_segments):
    """The heads see only the gathered rows: P text rows, M audio rows, never B x L."""
    batch, _ = batch_and_segments
    seen = {}
    hooks = [
        model.text_lm_head.register_forward_hook(lambda mod, i, o: seen.__setitem__("text", tuple(i[0].shape))),
        model.audio_lm_head.register_forward_hook(lambda mod, i, o: seen.__setitem__("audio", tuple(i[0].shape))),
    ]
    try:
        with torch.no_grad():
            out = HiggsLossModule(model, LossConfig())(**batch)
    finally:
        for hk in hooks:
            hk.remove()
    H = model.config.hidden_size
    assert seen["text"] == (6, H)
    # audio rows = positions whose next column has a label: columns 1..T+K of each target segment
    assert seen["audio"] == ((4 + 8) + (7 + 8), H)
    assert out.predictions.audio_target.shape == (27, K)


def test_the_shift_never_crosses_rows_or_segments(model, batch_and_segments):
    """Changing one row leaves the other's loss terms untouched, and no predictor is a pad/other row."""
    batch, segments = batch_and_segments
    module = HiggsLossModule(model, LossConfig())
    with torch.no_grad():
        out = module(**batch)
    p = out.predictions
    # every scored audio target is predicted from inside its own segment (context = previous column)
    for seg in segments:
        if not seg.trained:
            continue
        sel = (
            (p.audio_rows == seg.row) & (p.audio_positions >= seg.start) & (p.audio_positions < seg.start + seg.columns)
        )
        assert int(sel.sum()) == seg.columns - 1  # column 0 is never a target
        cols = p.audio_positions[sel] - seg.start + seg.col
        prev = batch["audio_input_ids"][seg.row, cols - 1]
        assert torch.equal(p.audio_context[sel], prev)
    assert int(((p.audio_rows == 0) & (p.audio_positions < segments[1].start)).sum()) == 0  # nothing from the reference


def test_count_tokens_and_step_normalisation_across_micro_batches(model, tok, batch_and_segments):
    """Token-weighted over micro-batches: sum of loss_for_step == the whole step at once."""
    batch, _ = batch_and_segments
    module = HiggsLossModule(model, LossConfig(text_weight=0.3))
    with torch.no_grad():
        whole = module(**batch)
    counts = module.count_tokens(batch)
    assert int(counts.text) == int(whole.n_text_tokens) and counts.audio.tolist() == whole.n_audio_tokens.tolist()
    assert whole.loss_for_step(counts).item() == pytest.approx(whole.loss.item(), abs=1e-6)

    # split into two micro-batches of one row each (each re-padded to its own length)
    parts = []
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        c = int(batch["audio_input_ids_mask"][b].sum())
        parts.append(
            {
                "input_ids": batch["input_ids"][b : b + 1, :n],
                "attention_mask": batch["attention_mask"][b : b + 1, :n],
                "labels": batch["labels"][b : b + 1, :n],
                "audio_input_ids": batch["audio_input_ids"][b : b + 1, :c],
                "audio_input_ids_mask": batch["audio_input_ids_mask"][b : b + 1, :c],
                "audio_labels": batch["audio_labels"][b : b + 1, :c],
                "audio_roles": batch["audio_roles"][b : b + 1, :c],
                "sample_ids": batch["sample_ids"][b : b + 1],
            }
        )
    total = sum((module.count_tokens(p) for p in parts), TokenCounts.zeros(K))
    assert int(total.text) == 6 and total.audio.tolist() == [13] * K
    acc = StepMetrics()
    step_loss = 0.0
    with torch.no_grad():
        for p in parts:
            out = module(**p)
            step_loss += out.loss_for_step(total).item()
            acc.add(out)
    merged = finalize_metrics(acc.pop())
    assert step_loss == pytest.approx(whole.loss.item(), abs=1e-5)
    assert merged["loss"] == pytest.approx(whole.loss.item(), abs=1e-5)
    assert merged["per_codebook_loss"] == pytest.approx(whole.per_codebook_loss.tolist(), abs=1e-5)
    assert merged["n_audio_tokens_per_codebook"] == [13] * K and merged["n_samples"] == 2
    # why token counts matter: the plain mean of the two micro-batch losses is NOT the step
    # loss (row 0 scores 5 frames per codebook, row 1 scores 8)
    with torch.no_grad():
        plain = sum(module(**p).loss.item() for p in parts) / 2
    assert abs(plain - whole.loss.item()) > 1e-3


def test_gradients_reach_every_trainable_part_even_without_text_tokens(tiny_dir, tok, batch_and_segments):
    """A batch without text labels still runs the text head (on 0 rows): a zero gradient, no None."""
    batch, _ = batch_and_segments
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    no_text = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = HiggsLossModule(m, LossConfig())(**no_text)
    out.loss.backward()
    assert int(out.n_text_tokens) == 0 and out.text_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(out.audio_loss.item())
    assert m.text_lm_head.weight.grad is not None and m.text_lm_head.weight.grad.abs().sum() == 0
    assert m.audio_lm_head.weight.grad.abs().sum() > 0
    assert m.model.layers[0].audio_mlp.up_proj.weight.grad.abs().sum() > 0


def test_peft_wrapped_model_gives_the_same_loss(tiny_dir, model, batch_and_segments):
    import peft

    batch, _ = batch_and_segments
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()
    wrapped = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    module = HiggsLossModule(wrapped, LossConfig())
    with torch.no_grad():
        a = module(**batch).loss.item()
        b = HiggsLossModule(model, LossConfig())(**batch).loss.item()
    assert a == pytest.approx(b, abs=1e-6)  # LoRA B starts at 0
    # the loss module registers the wrapped model once: its parameters are the model's
    assert {n for n, _ in module.named_parameters()} == {f"model.{n}" for n, _ in wrapped.named_parameters()}


def test_bad_batches_raise_named_data_errors(model, batch_and_segments):
    batch, _ = batch_and_segments
    module = HiggsLossModule(model, LossConfig())
    short = dict(batch, audio_input_ids_mask=batch["audio_input_ids_mask"].clone())
    last = int(short["audio_input_ids_mask"][1].sum()) - 1
    short["audio_input_ids_mask"][1, last] = False
    with pytest.raises(DataError, match=r"row 1 \(sample 'tts-1'\) has 16 audio placeholders .* 15 audio columns"):
        module(**short)
    bad = dict(batch, audio_labels=batch["audio_labels"].clone())
    bad["audio_labels"][0, 20, 3] = 1026
    with pytest.raises(DataError, match="audio labels outside"):
        module(**bad)


def test_text_weight_without_text_head_is_a_config_error(tiny_dir):
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir)  # no text head
    with pytest.raises(ConfigError, match="use_text_head"):
        HiggsLossModule(m, LossConfig(text_weight=1.0))
    HiggsLossModule(m, LossConfig(text_weight=0.0))


def test_debug_unshifted_switch_pairs_logits_at_t_with_label_at_t(model, batch_and_segments):
    batch, _ = batch_and_segments
    with pytest.warns(UserWarning, match="WRONG"):
        module = HiggsLossModule(model, LossConfig(), _debug_unshifted=True)
    with torch.no_grad():
        out = module(**batch)
    p = out.predictions
    scored = p.audio_target != -100
    assert out.shift == 0
    # the copy task: every target equals the input at the predicting position
    assert torch.equal(p.audio_target[scored], p.audio_context[scored])


def test_forward_step_and_report_use_one_formula(model, batch_and_segments):
    """The forward's loss, `loss_for_step` over the batch's own counts and `finalize_metrics`
    agree, with text, audio and codebook weights all different from 1 (one formula, three users)."""
    batch, _ = batch_and_segments
    w = [4.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    module = HiggsLossModule(model, LossConfig(text_weight=0.3, audio_weight=1.5, codebook_weights=w))
    with torch.no_grad():
        out = module(**batch)
    report = finalize_metrics(out.stats())
    step = out.loss_for_step(module.count_tokens(batch)).item()
    assert step == pytest.approx(out.loss.item(), rel=1e-6)
    assert report["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert report["audio_loss"] == pytest.approx(out.audio_loss.item(), rel=1e-6)
    assert report["text_loss"] == pytest.approx(out.text_loss.item(), rel=1e-6)
