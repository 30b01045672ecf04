"""Health checks on real (tiny-model) loss outputs: each earlier-trainer failure is named."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from test_train_loss import EOS, K, build_sample, collate, two_row_batch
from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

from higgs_tune.config import HealthConfig, LossConfig
from higgs_tune.errors import TrainingHealthError
from higgs_tune.train.health import HealthMonitor
from higgs_tune.train.loss import HiggsLossModule

LN_C = math.log(1026)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()


@pytest.fixture(scope="module")
def batch(tok, model):
    return two_row_batch(tok, model.config)[0]


def monitor_for(model, tok, health=None, loss=None, sink=None):
    return HealthMonitor.for_model(
        health or HealthConfig(),
        loss or LossConfig(),
        model.config,
        tok,
        on_warning=(sink.append if sink is not None else None),
    )


def run(model, batch, **kw):
    with torch.no_grad():
        return HiggsLossModule(model, LossConfig(), **kw)(**batch)


def codes(warnings):
    return [w.code for w in warnings]


def test_contract_batch_raises_no_warning(model, tok, batch):
    sink = []
    mon = monitor_for(model, tok, sink=sink)
    out = run(model, batch)
    assert mon.check_batch(0, batch, out) == []
    assert mon.check_step(0, out.metrics(), grad_norm=torch.tensor(1.5), sample_ids=batch["sample_ids"]) == []
    assert sink == [] and mon.warnings == []


def test_structural_ids_exclude_the_documented_text_targets(model, tok):
    mon = monitor_for(model, tok)
    ids = tok.convert_tokens_to_ids
    for name in (
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|AUDIO_OUT|>",
        "<|reserved_special_token_6|>",
    ):
        assert ids(name) in mon.structural_token_ids, name
    assert tok.pad_token_id in mon.structural_token_ids
    for piece in ("user", "assistant", "system", "\n\n"):
        assert set(tok(piece, add_special_tokens=False)["input_ids"]) <= mon.structural_token_ids, piece
    for name in ("<|audio_out_bos|>", "<|audio_eos|>", "<|eot_id|>"):
        assert ids(name) not in mon.structural_token_ids, name


# ---------------------------------------------------------------------- copy task
def test_first_batch_flags_the_unshifted_loss_and_never_the_correct_one(model, tok, batch):
    with pytest.warns(UserWarning):
        broken = run(model, batch, _debug_unshifted=True)
    mon = monitor_for(model, tok)
    got = mon.check_batch(0, batch, broken)
    assert codes(got) == ["copy_task"]
    assert f"every one of the {int(broken.n_audio_tokens.sum())} scored audio targets" in got[0].message
    # the correct loss on the same batch: the labels equal the inputs at the same column (by
    # contract) but the pairs the loss scores do not
    assert monitor_for(model, tok).check_batch(0, batch, run(model, batch)) == []


def test_first_batch_copy_check_is_safe_on_constant_audio(model, tok):
    """Even a segment whose every code is identical has BOS->code and code->EOS pairs that differ."""
    constant = torch.full((K, 12), 7)
    sample = build_sample(
        tok,
        model.config,
        [("system", "Generate audio following instruction."), ("user", "Hm."), ("assistant", constant, True)],
    )
    b, _ = collate([sample], tok.pad_token_id)
    out = run(model, b)
    scored = out.predictions.audio_target != -100
    same = int(((out.predictions.audio_target == out.predictions.audio_context) & scored).sum())
    assert same == int(scored.sum()) - 2 * K  # all but the first code and the EOS of each codebook
    assert monitor_for(model, tok).check_batch(0, b, out) == []


def _train(model, batches, module_kw, monitor, steps, lr, loss_cfg=None, stop_on=None):
    """A plain loop: forward through the loss module, backward, clip, check_step, optimizer step."""
    module = HiggsLossModule(model, loss_cfg or LossConfig(text_weight=0.0), **module_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history, found = [], []
    for step in range(steps):
        b = batches[step % len(batches)] if isinstance(batches, list) else batches(step)
        out = module(**b)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        metrics = out.metrics()
        history.append(metrics)
        found += monitor.check_step(step, metrics, grad_norm=gn, sample_ids=b["sample_ids"])
        if stop_on in codes(found):
            break
        opt.step()
        opt.zero_grad()
    return history, found


def test_unshifted_training_trips_the_copy_symptom_and_shifted_does_not(tiny_dir, tok, model):
    """16 batches of random codes from an alphabet of 4, cycled: little to memorise. The unshifted
    loss learns to echo its input (accuracy 0.99 near step 50 here; 60-65 at lr 4e-3 or 5e-3);
    the correct loss cannot predict a random next code (accuracy stays ~0.4: unigram + EOS)."""
    batches = [two_row_batch(tok, model.config, seed=i, high=4)[0] for i in range(16)]
    cfg = HealthConfig(copy_check_steps=80, chance_after_steps=10_000)
    results = {}
    for unshifted in (True, False):
        torch.manual_seed(0)
        m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
        mon = monitor_for(m, tok, health=cfg, loss=LossConfig(text_weight=0.0))
        kw = {"_debug_unshifted": True} if unshifted else {}
        with pytest.warns(UserWarning) if unshifted else contextlib.nullcontext():
            history, found = _train(m, batches, kw, mon, steps=80, lr=6e-3, stop_on="copy_task")
        results[unshifted] = (history, found)
    history, found = results[True]
    assert "copy_task" in codes(found)
    w = next(w for w in found if w.code == "copy_task")
    assert w.step < 80 and w.details["audio_acc"] > 0.98
    history, found = results[False]
    assert "copy_task" not in codes(found)
    assert max(h["audio_acc"] for h in history) < 0.6


# ---------------------------------------------------------------------- chance level
def test_shuffled_labels_stay_at_chance_and_trip_chance_level(tiny_dir, tok, model, batch):
    """Labels permuted over the scored positions at every step: nothing to learn, loss ~ ln(1026)."""
    scored = batch["audio_labels"] != -100
    values = batch["audio_labels"][scored]

    def shuffled(step):
        g = torch.Generator().manual_seed(step)
        lab = batch["audio_labels"].clone()
        lab[scored] = values[torch.randperm(values.numel(), generator=g)]
        # and fresh random codes, so the unigram of the targets carries little either
        lab[scored & (lab != EOS)] = torch.randint(0, 1024, (int((scored & (lab != EOS)).sum()),), generator=g)
        return dict(batch, audio_labels=lab)

    torch.manual_seed(0)
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    cfg = HealthConfig(chance_after_steps=5, copy_check_steps=0)
    sink = []
    mon = monitor_for(m, tok, health=cfg, loss=LossConfig(text_weight=0.0), sink=sink)
    history, found = _train(m, shuffled, {}, mon, steps=8, lr=1e-3)
    for h in history:
        assert abs(h["audio_loss"] - LN_C) / LN_C < 0.05
    assert codes(found) == ["chance_level"] and found[0].step == 5
    assert found[0].message.startswith(
        f"audio loss {history[5]['audio_loss']:.2f} ≈ ln(1026)=6.93 after 5 steps: the model is not learning"
    )
    assert "learning rate" in found[0].message and "gradients" in found[0].message
    assert mon.warnings[0].count == 3 and mon.warnings[0].last_step == 7 and sink == found


def test_a_learning_run_does_not_trip_chance_level(tiny_dir, tok, batch):
    torch.manual_seed(0)
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    mon = monitor_for(
        m, tok, health=HealthConfig(chance_after_steps=5, copy_check_steps=0), loss=LossConfig(text_weight=0.0)
    )
    history, found = _train(m, [batch], {}, mon, steps=8, lr=1e-2)
    assert found == [] and history[5]["audio_loss"] < 0.9 * LN_C


def test_per_codebook_chance_is_named(model, tok):
    mon = monitor_for(model, tok, health=HealthConfig(chance_after_steps=0, copy_check_steps=0))
    metrics = {
        "loss": 4.0,
        "text_loss": 1.0,
        "audio_loss": 3.0,
        "audio_acc": 0.3,
        "n_text_tokens": 6,
        "n_audio_tokens": 80,
        "per_codebook_loss": [1.0] * 6 + [6.9, 7.2],
        "n_audio_tokens_per_codebook": [10] * 8,
    }
    (w,) = mon.check_step(3, metrics)
    assert w.code == "chance_level" and w.message.startswith(
        "codebook(s) 6 (6.90), 7 (7.20) at ln(1026)=6.93 after 3 steps"
    )
    mon = monitor_for(model, tok, health=HealthConfig(chance_after_steps=0, copy_check_steps=0))
    (w,) = mon.check_step(4, dict(metrics, text_loss=12.5, per_codebook_loss=[1.0] * 8))
    assert w.message.startswith("text loss 12.50 > ln(2048)=7.62 after 4 steps")


# ---------------------------------------------------------------------- non-finite
def test_nan_in_a_batch_raises_naming_step_samples_and_checkpoint(tiny_dir, tok, batch):
    m = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    # a token that only row 1 carries, with a NaN embedding row: the batch brings the NaN in
    pos = 20
    assert batch["labels"][1, pos] == -100 and batch["attention_mask"][1, pos] == 1
    poisoned_id = 1500
    assert poisoned_id not in batch["input_ids"][0].tolist()
    b = dict(batch, input_ids=batch["input_ids"].clone())
    b["input_ids"][1, pos] = poisoned_id
    with torch.no_grad():
        m.model.embed_tokens.weight[poisoned_id] = float("nan")
    out = HiggsLossModule(m, LossConfig())(**b)
    metrics = out.metrics()
    assert math.isnan(metrics["loss"])
    mon = monitor_for(m, tok)
    with pytest.raises(TrainingHealthError) as e:
        mon.check_step(7, metrics, grad_norm=None, sample_ids=b["sample_ids"], last_checkpoint="runs/demo/step-000005")
    msg = str(e.value)
    assert msg.startswith("step 7: non-finite loss = nan")
    assert "Samples in this step: clone-0, tts-1" in msg
    assert "last good checkpoint: runs/demo/step-000005" in msg

    # a finite loss with a NaN gradient norm is stopped the same way
    finite = dict(metrics, loss=2.0, text_loss=1.0, audio_loss=1.0)
    with pytest.raises(TrainingHealthError, match=r"step 8: non-finite grad_norm = nan.*no checkpoint saved yet"):
        mon.check_step(8, finite, grad_norm=torch.tensor(float("nan")), sample_ids=["x"])

    # health.stop_on_nonfinite: false -> a named warning (never a silent skip)
    lenient = monitor_for(m, tok, health=HealthConfig(stop_on_nonfinite=False))
    (w,) = lenient.check_step(9, metrics, sample_ids=b["sample_ids"])
    assert (
        w.code == "non_finite"
        and "must not be applied" in w.message
        and w.details["sample_ids"] == ["clone-0", "tts-1"]
    )


# ---------------------------------------------------------------------- data-level
def test_no_eos_in_labels_is_flagged_once_with_a_count(model, tok, batch):
    lab = batch["audio_labels"].clone()
    lab[lab == EOS] = -100  # what the transformers processor's output_labels does
    b = dict(batch, audio_labels=lab)
    out = run(model, b)
    mon = monitor_for(model, tok)
    (w,) = mon.check_batch(0, b, out)
    assert (
        w.code == "no_eos" and "never learns to stop" in w.message and w.details["sample_ids"] == ["clone-0", "tts-1"]
    )
    assert mon.check_batch(1, b, out) == [] and mon.check_batch(2, b, out) == []
    assert mon.warnings[0].count == 3 and mon.warnings[0].last_step == 2
    assert mon.warnings[0].record()["count"] == 3


def test_text_labels_on_markup_only_are_no_signal(model, tok, batch):
    ids = tok.convert_tokens_to_ids
    labels = torch.full_like(batch["labels"], -100)
    for name in ("<|start_header_id|>", "<|end_header_id|>"):
        hit = batch["input_ids"] == ids(name)
        labels[hit] = batch["input_ids"][hit]
    b = dict(batch, labels=labels)
    (w,) = monitor_for(model, tok).check_batch(0, b, run(model, b))
    assert w.code == "no_signal" and "chat markup" in w.message
    # the same labels with the text loss off are fine
    assert monitor_for(model, tok, loss=LossConfig(text_weight=0.0)).check_batch(0, b, run(model, b)) == []


def test_no_audio_tokens_with_audio_weight_is_no_signal(model, tok, batch):
    b = dict(batch, audio_labels=torch.full_like(batch["audio_labels"], -100))
    out = run(model, b)
    mon = monitor_for(model, tok)
    (w,) = mon.check_batch(0, b, out)
    assert w.code == "no_signal" and "no audio token is scored" in w.message
    # per step (rank-reduced counts): the same code, counted
    assert mon.check_step(1, out.metrics()) == []
    assert mon.warnings[0].count == 2


def test_pre_shifted_labels_are_label_misaligned(model, tok, batch):
    """A collator that shifted the labels itself: label[j] = input[j+1] (the loss shifts again)."""
    lab = torch.full_like(batch["audio_labels"], -100)
    lab[:, :-1] = batch["audio_labels"][:, 1:]
    b = dict(batch, audio_labels=lab)
    found = monitor_for(model, tok).check_batch(0, b, run(model, b))
    assert codes(found) == ["label_misaligned"]
    assert "equal the NEXT column's input: the labels were shifted already" in found[0].message
    assert found[0].details["fraction_next_column"] == 1.0
