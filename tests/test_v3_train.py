"""v3 training on the tiny model: loss at labelled rows only, and it falls (full fine-tune and LoRA)."""

from __future__ import annotations

import time

import pytest
import torch
from v3_support import load_tiny_model, random_codes, tiny_tokenizer, tiny_tokens

from higgs_tune.families.v3.layout import ROLE_TARGET, build_v3_sample, collate_v3
from higgs_tune.families.v3.model import apply_v3_lora, lora_target_names


def _batch(eoc_labels="all"):
    tok, t = tiny_tokenizer(), tiny_tokens()
    samples = [
        build_v3_sample(tok, t, "Good morning.", target_codes=random_codes(6, 1), eoc_labels=eoc_labels, sample_id="a"),
        build_v3_sample(tok, t, "صباح الخير", target_codes=random_codes(4, 2), eoc_labels=eoc_labels, sample_id="b"),
        build_v3_sample(
            tok,
            t,
            "In my voice.",
            target_codes=random_codes(5, 3),
            ref_codes=random_codes(3, 4),
            ref_text="Reference words.",
            eoc_labels=eoc_labels,
            sample_id="c",
        ),
    ]
    return samples, collate_v3(samples, tok.pad_token_id)


@pytest.mark.parametrize(
    "eoc_labels, per_codebook", [("all", lambda t, c: t + 7 - c), ("first", lambda t, c: t + (c < 7))]
)
def test_loss_only_at_labelled_rows(eoc_labels, per_codebook):
    model = load_tiny_model()
    samples, batch = _batch(eoc_labels)
    out = model(**batch)
    # scored positions = the target slots (each predicted by the position before it), nothing else
    want = [
        (i, p) for i, s in enumerate(samples) for p in (s["audio_roles"] == ROLE_TARGET).nonzero().flatten().tolist()
    ]
    assert list(zip(out.rows.tolist(), out.positions.tolist(), strict=True)) == want
    frames = [s["target_frames"] for s in samples]
    assert out.n_tokens_per_codebook.tolist() == [sum(per_codebook(t, c) for t in frames) for c in range(8)]
    assert abs(out.loss.item() - 6.93) < 0.3  # ~ln(1026): random tiny model


def test_backends_and_gradient_checkpointing_agree():
    _, batch = _batch()
    losses = []
    for kwargs in (dict(), dict(attn_implementation="eager"), dict(gradient_checkpointing=True)):
        model = load_tiny_model(**kwargs).train()
        out = model(**batch)
        out.loss.backward()
        losses.append((out.loss.detach(), model.audio_table.weight.grad.clone()))
    for loss, grad in losses[1:]:
        torch.testing.assert_close(loss, losses[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, losses[0][1], rtol=1e-4, atol=1e-6)
    bf16 = load_tiny_model(dtype="bfloat16")
    assert bf16.audio_table.weight.dtype == torch.bfloat16 and torch.isfinite(bf16(**batch).loss)


def _train(model, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, out


def test_full_finetune_loss_falls():
    torch.manual_seed(0)
    model = load_tiny_model().train()
    _, batch = _batch()
    t0 = time.perf_counter()
    losses, out = _train(model, batch, steps=40, lr=3e-3)
    print(
        f"full fine-tune: loss {losses[0]:.3f} -> {losses[-1]:.3f}, acc {out.accuracy:.2f}, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert losses[-1] < 0.25 * losses[0] and out.accuracy > 0.9


def test_lora_loss_falls_base_frozen_table_trained():
    torch.manual_seed(0)
    model = load_tiny_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n != "audio_table.weight"}
    table = model.audio_table.weight.detach().clone()
    targets = lora_target_names(model)
    peft_model = apply_v3_lora(model, r=8, alpha=16).train()
    assert {n.rsplit(".", 1)[-1] for n in targets} >= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable if not n.endswith("audio_table.weight"))
    assert sum(n.endswith("audio_table.weight") for n in trainable) == 1
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    _, batch = _batch()
    t0 = time.perf_counter()
    losses, out = _train(peft_model, batch, steps=40, lr=1e-2)
    print(f"LoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}, acc {out.accuracy:.2f}, {time.perf_counter() - t0:.1f}s")
    assert losses[-1] < 0.35 * losses[0]
    base = peft_model.base_model.model
    for name, p in base.named_parameters():
        if "lora_" in name or name == "audio_table.weight":
            continue
        assert torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    assert not torch.equal(base.audio_table.weight, table)
    assert all(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_lora_checkpoint_round_trip_and_merged_export(tmp_path):
    """Adapter + the one trained table reload to the same loss; merged, the export serves the same model."""
    from v3_support import tiny_v3_dir

    from higgs_tune.families.v3.checkpoint import load_v3_checkpoint, save_v3_checkpoint
    from higgs_tune.families.v3.model import AUDIO_TABLE_FILE, load_v3_adapter, save_v3_adapter

    torch.manual_seed(0)
    _, batch = _batch()
    peft_model = apply_v3_lora(load_tiny_model(), r=4, alpha=8).train()
    _train(peft_model, batch, steps=3, lr=1e-2)
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(**batch).loss
    save_v3_adapter(peft_model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        AUDIO_TABLE_FILE,
    }
    reloaded = load_v3_adapter(load_tiny_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).loss, want)
    ck = load_v3_checkpoint(tiny_v3_dir())
    merged = reloaded.merge_and_unload()
    out = save_v3_checkpoint(merged, tmp_path / "export", codec_state=ck.codec_state)
    with torch.no_grad():
        torch.testing.assert_close(load_v3_checkpoint(out).model.eval()(**batch).loss, want, rtol=1e-5, atol=1e-5)
