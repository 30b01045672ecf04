"""Audio-only self-attention: exact no-op start, trains, attends audio->earlier audio only,
cached generation == full recompute, gradient checkpointing, checkpoint round trip."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch
from test_model_support import model_inputs, synthetic_batch, train_steps
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import apply_rotary_pos_emb

from higgs_tune.config import ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.audio_attention import (
    HiggsAudioV2DecoderLayerWithAudioAttention,
    audio_attention_param_count,
    enable_audio_self_attention,
)
from higgs_tune.model.load import load_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
# q (64x64) + k, v (32x64 each) + o (64x64) + norm (64) per layer
PER_LAYER = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 64


def _load(tiny_dir, **kw):
    return load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32", **kw)).eval()


def _randomise_audio_attention(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in list(layer.audio_attn.parameters()) + list(layer.audio_post_audio_attn_layer_norm.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 else 0.0))


def test_enable_adds_named_blocks_and_logs_count(tiny_dir, caplog):
    model = _load(tiny_dir)
    before = set(model.state_dict())
    with caplog.at_level(logging.INFO, logger="higgs_tune.model.audio_attention"):
        assert enable_audio_self_attention(model) == 2
    added = sorted(set(model.state_dict()) - before)
    assert added == sorted(
        f"model.layers.{i}.{name}.weight"
        for i in range(2)
        for name in (
            "audio_attn.q_proj",
            "audio_attn.k_proj",
            "audio_attn.v_proj",
            "audio_attn.o_proj",
            "audio_post_audio_attn_layer_norm",
        )
    )
    assert audio_attention_param_count(model) == 2 * PER_LAYER == 24704
    assert "audio self-attention added to 2 decoder layers: 24,704 new parameters (12,352 per layer)" in caplog.text
    assert all(isinstance(layer, HiggsAudioV2DecoderLayerWithAudioAttention) for layer in model.model.layers)
    assert enable_audio_self_attention(model) == 0  # idempotent
    # FSDP auto-wrap finds the swapped layer class by the name in _no_split_modules
    from accelerate.utils.dataclasses import get_module_class_from_name

    assert model._no_split_modules == model.model._no_split_modules == ["HiggsAudioV2DecoderLayerWithAudioAttention"]
    assert get_module_class_from_name(model, model._no_split_modules[0]) is HiggsAudioV2DecoderLayerWithAudioAttention
    layer = model.model.layers[0]
    assert torch.equal(layer.audio_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(layer.audio_attn.v_proj.weight, layer.self_attn.v_proj.weight)
    assert torch.count_nonzero(layer.audio_attn.o_proj.weight) == 0
    assert torch.equal(layer.audio_post_audio_attn_layer_norm.weight, layer.audio_input_layernorm.weight)


def test_no_op_at_step_zero(tiny_dir):
    base = _load(tiny_dir)
    with_attn = _load(tiny_dir, audio_self_attention=True)
    batch = synthetic_batch(base.config)
    with torch.no_grad():
        a = base(**model_inputs(batch))
        b = with_attn(**model_inputs(batch))
        ta = base.text_lm_head(base.model(**model_inputs(batch)).last_hidden_state)
        tb = with_attn.text_lm_head(with_attn.model(**model_inputs(batch)).last_hidden_state)
    assert (a.logits - b.logits).abs().max().item() <= 1e-6
    assert (ta - tb).abs().max().item() <= 1e-6


def test_trains_weights_change_and_loss_falls(tiny_dir):
    model = _load(tiny_dir, audio_self_attention=True)
    batch = synthetic_batch(model.config)
    start = {k: v.clone() for k, v in model.state_dict().items() if "audio_attn" in k or "audio_post_audio_attn" in k}

    # step 0: o_proj and the norm get gradient; q/k/v none (o_proj is zero), as designed
    model.train()
    model(**batch).loss.backward()
    layer = model.model.layers[0]
    assert layer.audio_attn.o_proj.weight.grad.abs().sum() > 0
    assert layer.audio_post_audio_attn_layer_norm.weight.grad.abs().sum() > 0
    assert layer.audio_attn.q_proj.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)

    losses = train_steps(model, batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    unchanged = [k for k, v in start.items() if torch.equal(v, after[k])]
    assert unchanged == [], unchanged  # q, k, v, o and the norm of both layers all moved


def _naive_audio_attention(layer, normed, mask, cos, sin):
    """Per row, loop form: audio row i attends audio rows j <= i (full-sequence RoPE positions)."""
    attn = layer.audio_attn
    out = []
    for b in range(normed.shape[0]):
        pos = mask[b].nonzero().flatten()
        x = normed[b, pos]  # (n, H)
        q = attn.q_proj(x).view(-1, HEADS, HEAD_DIM).transpose(0, 1)[None]
        k = attn.k_proj(x).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
        v = attn.v_proj(x).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos[:, pos], sin[:, pos])
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2)) / HEAD_DIM**0.5
        scores = scores.masked_fill(~torch.ones(len(pos), len(pos), dtype=torch.bool).tril(), float("-inf"))
        o = (scores.softmax(-1) @ v)[0].transpose(0, 1).reshape(len(pos), -1)
        out.append(attn.o_proj(o))
    return torch.cat(out)


def test_audio_rows_attend_only_earlier_audio_rows(tiny_dir):
    model = _load(tiny_dir, audio_self_attention=True)
    _randomise_audio_attention(model)
    config = model.config
    batch = synthetic_batch(config)
    mask = model.model.get_placeholder_mask(batch["input_ids"], None, None)  # (B, L)
    g = torch.Generator().manual_seed(3)
    normed = torch.randn(*mask.shape, HIDDEN, generator=g)
    position_ids = torch.arange(mask.shape[1])[None]
    cos, sin = model.model.rotary_emb(normed, position_ids)
    layer = model.model.layers[0]
    with torch.no_grad():
        got = layer._audio_self_attention(normed, mask, (cos, sin), cache=None)
        want = _naive_audio_attention(layer, normed, mask, cos, sin)
        assert got.shape == (int(mask.sum()), HIDDEN)
        assert torch.allclose(got, want, atol=1e-5)
        # text rows and later audio rows do not reach an audio row's output
        changed = normed.clone()
        changed[~mask] = 5.0
        last_audio = mask[0].nonzero().flatten()[-1]
        changed[0, last_audio] = -5.0
        again = layer._audio_self_attention(changed, mask, (cos, sin), cache=None)
    first_row_count = int(mask[0].sum())
    assert torch.equal(again[: first_row_count - 1], got[: first_row_count - 1])
    assert not torch.equal(again[first_row_count - 1], got[first_row_count - 1])
    assert torch.equal(again[first_row_count:], got[first_row_count:])  # row 1 untouched except its text


def _left_padded_prompts(config, seed=0, reference=True):
    """Two generation prompts of different lengths (left padding), with or without a reference audio turn."""
    g = torch.Generator().manual_seed(seed)
    k = config.num_codebooks
    prompts = []
    for n_text, frames in ((5, 6), (2, 3)):
        ids = [config.bos_token_id] + torch.randint(0, 1700, (n_text,), generator=g).tolist()
        if reference:
            ids += (
                [config.audio_bos_token_id]
                + [config.audio_token_id] * (frames + 2)
                + [config.audio_delay_token_id] * (k - 1)
            )
            ids += [config.audio_bos_token_id - 1, config.eos_token_id]  # <|audio_eos|>, <|eot_id|>
        # >= K text tokens before the new <|audio_out_bos|>, so the delay-pattern processor's
        # look-back window does not see the reference turn's <|audio_eos|>
        ids += torch.randint(0, 1700, (10,), generator=g).tolist() + [config.audio_bos_token_id]
        cols = torch.full((k, frames + k + 1), config.audio_stream_eos_id)
        codes = torch.randint(0, 1024, (k, frames), generator=g)
        for row in range(k):
            cols[row, : row + 1] = config.audio_stream_bos_id
            cols[row, row + 1 : row + 1 + frames] = codes[row]
        prompts.append((ids, cols.T))
    length = max(len(p[0]) for p in prompts)
    out = {
        "input_ids": torch.full((2, length), config.pad_token_id),
        "attention_mask": torch.zeros(2, length, dtype=torch.long),
    }
    for i, (ids, _) in enumerate(prompts):
        out["input_ids"][i, length - len(ids) :] = torch.tensor(ids)
        out["attention_mask"][i, length - len(ids) :] = 1
    if reference:
        n = max(p[1].shape[0] for p in prompts)
        out["audio_input_ids"] = torch.full((2, n, k), config.audio_stream_eos_id)
        out["audio_input_ids_mask"] = torch.zeros(2, n, dtype=torch.bool)
        for i, (_, cols) in enumerate(prompts):
            out["audio_input_ids"][i, : cols.shape[0]] = cols
            out["audio_input_ids_mask"][i, : cols.shape[0]] = True
    return out


def _full_recompute_logits(model, prompts, out, step: int) -> torch.Tensor:
    """Logits of generation step `step` from one uncached forward over prompt + generated tokens."""
    prompt_len = prompts["input_ids"].shape[1]
    prompt_cols = prompts["audio_input_ids"].shape[1] if "audio_input_ids" in prompts else 0
    b = prompts["input_ids"].shape[0]
    inputs = {
        "input_ids": out.sequences[:, : prompt_len + step],
        "attention_mask": torch.cat([prompts["attention_mask"], torch.ones(b, step, dtype=torch.long)], dim=1),
    }
    if prompt_cols + step:
        mask = torch.ones(b, step, dtype=torch.bool)
        if prompt_cols:
            mask = torch.cat([prompts["audio_input_ids_mask"], mask], dim=1)
        inputs.update(audio_input_ids=out.audio_sequences[:, : prompt_cols + step], audio_input_ids_mask=mask)
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.mark.parametrize("reference", [True, False], ids=["voice_clone", "tts"])
def test_cached_generation_equals_full_recompute(tiny_dir, reference):
    # (transformers' own use_cache=False generation fails on a prompt without audio, block or not,
    # so the reference is one uncached forward per step over everything generated so far)
    model = _load(tiny_dir, audio_self_attention=True)
    _randomise_audio_attention(model)
    model.generation_config.ras_win_len = None  # no random resampling: greedy is deterministic
    base = _load(tiny_dir)
    base.generation_config.ras_win_len = None
    prompts = _left_padded_prompts(model.config, reference=reference)
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(**prompts, **kw)
    assert len(cached.logits) == 12
    for step, logits in enumerate(cached.logits):
        assert torch.allclose(logits, _full_recompute_logits(model, prompts, cached, step), atol=1e-5), step
    # the block matters: without it the logits differ
    plain = base.generate(**prompts, **kw)
    # strict=True: the plain model may emit EOS before max_new_tokens; compare the steps both made
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, plain.logits, strict=False)) > 0.1


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    model = _load(tiny_dir, audio_self_attention=True)
    _randomise_audio_attention(model)
    ckpt = copy.deepcopy(model)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = synthetic_batch(model.config)
    grads, calls = [], []
    for m in (model, ckpt):
        counter = []
        hook = m.model.layers[0].audio_attn.register_forward_hook(lambda *_, counter=counter: counter.append(1))
        m.train()
        m(**batch).loss.backward()
        hook.remove()
        calls.append(len(counter))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if "audio_attn" in n})
    assert ckpt.is_activation_checkpointing and not model.is_activation_checkpointing
    assert calls == [1, 2]  # checkpointed: the layer (block included) is recomputed in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 10  # q, k, v, o, norm x 2 layers
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_checkpoint_with_block_loads_its_weights(tiny_dir, tmp_path):
    model = _load(tiny_dir, audio_self_attention=True)
    _randomise_audio_attention(model, seed=7)
    folder = tmp_path / "with_block"
    shutil.copytree(tiny_dir, folder)
    model.save_pretrained(folder)

    loaded = _load(folder, audio_self_attention=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    with pytest.raises(
        ModelLoadError, match=r"has audio self-attention weights \(10 tensors.*model.audio_self_attention: true"
    ):
        _load(folder)
