"""The released v3 key layout: strict key map, tied table kept as one tensor, config and codec."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from v3_support import copy_tiny, tiny_tokenizer, tiny_tokens, tiny_v3_dir

from higgs_tune.errors import ModelLoadError
from higgs_tune.families.v3.checkpoint import (
    AUDIO_HEAD_COPY_KEY,
    AUDIO_TABLE_KEY,
    CODEC_PREFIX,
    TEXT_EMBEDDING_KEY,
    TEXT_HEAD_COPY_KEY,
    load_v3_checkpoint,
    load_v3_codec,
    released_key_map,
    save_v3_checkpoint,
)
from higgs_tune.families.v3.layout import build_v3_sample, collate_v3
from higgs_tune.families.v3.model import apply_v3_lora


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_tiny_is_released_layout_and_loads_strictly(caplog):
    folder = tiny_v3_dir()
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "higgs_multimodal_qwen3" and raw["text_config"]["rope_theta"] is None
    keys = set(load_file(str(folder / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"tied", "body"}
    assert set(released_key_map(2)) == {k for k in keys if not k.startswith(CODEC_PREFIX)}
    with caplog.at_level(logging.INFO, logger="higgs_tune.families.v3.checkpoint"):
        ck = load_v3_checkpoint(folder)
    assert "rope_theta is null; using 1e+06" in caplog.text
    assert ck.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert ck.model.audio_table.weight.shape == (8 * 1026, 64)
    assert ck.head_copies == ()


def test_missing_key_is_named(tmp_path):
    folder = copy_tiny(tmp_path / "c")
    _rewrite(folder, lambda t: t.pop("body.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing keys: body\.layers\.1\.mlp\.up_proj\.weight"):
        load_v3_checkpoint(folder)


def test_unexpected_keys_are_named(tmp_path):
    folder = copy_tiny(tmp_path / "c")

    def add(t):
        t["body.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
        t["tied.head.modality_heads.1.weight"] = torch.zeros(2)

    _rewrite(folder, add)
    with pytest.raises(ModelLoadError) as e:
        load_v3_checkpoint(folder)
    assert "unexpected keys: body.layers.0.mlp.extra_proj.weight, tied.head.modality_heads.1.weight" in str(e.value)


def test_head_copies_accepted_only_when_equal(tmp_path):
    ck = load_v3_checkpoint(tiny_v3_dir(head_copies=True))
    assert set(ck.head_copies) == {AUDIO_HEAD_COPY_KEY, TEXT_HEAD_COPY_KEY}
    folder = copy_tiny(tmp_path / "c", head_copies=True)
    _rewrite(folder, lambda t: t[AUDIO_HEAD_COPY_KEY].add_(1e-3))
    with pytest.raises(
        ModelLoadError,
        match=(
            r"tied\.head\.modality_heads\.0\.weight differs from "
            r"tied\.embedding\.modality_embeddings\.0\.embedding\.weight"
        ),
    ):
        load_v3_checkpoint(folder)


def test_wrong_model_type_and_shape_errors(tmp_path):
    folder = copy_tiny(tmp_path / "c")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "higgs_audio_v2"}))
    with pytest.raises(ModelLoadError, match="not 'higgs_multimodal_qwen3'"):
        load_v3_checkpoint(folder)
    raw["text_config"]["hidden_size"] = 32
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="shapes do not match"):
        load_v3_checkpoint(folder)


def test_save_round_trip_is_bit_identical(tmp_path):
    src = tiny_v3_dir(head_copies=True)
    ck = load_v3_checkpoint(src)
    out = save_v3_checkpoint(ck.model, tmp_path / "out", codec_state=ck.codec_state, head_copies=ck.head_copies)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )  # rope_theta stays null


def test_codec_loads_into_v2_tokenizer_model(tmp_path):
    from transformers import HiggsAudioV2TokenizerModel

    folder = tiny_v3_dir()
    codec = load_v3_codec(folder)
    assert isinstance(codec, HiggsAudioV2TokenizerModel) and codec.config.num_quantizers == 8
    stored = {
        k[len(CODEC_PREFIX) :]: v
        for k, v in load_file(str(folder / "model.safetensors")).items()
        if k.startswith(CODEC_PREFIX)
    }
    assert all(torch.equal(codec.state_dict()[k], v) for k, v in stored.items())
    broken = copy_tiny(tmp_path / "c")
    _rewrite(broken, lambda t: t.pop(CODEC_PREFIX + "fc2.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tied\.embedding\.modality_embeddings\.0\.model\.fc2\.weight"):
        load_v3_codec(broken)


def _one_step(model, params):
    tok, t = tiny_tokenizer(), tiny_tokens()
    g = torch.Generator().manual_seed(3)
    sample = build_v3_sample(tok, t, "Hello.", target_codes=torch.randint(0, 1024, (8, 4), generator=g))
    opt = torch.optim.SGD(params, lr=0.5)
    model(**collate_v3([sample], tok.pad_token_id)).loss.backward()
    opt.step()


def _table_params(model):
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.shape == (8 * 1026, 64)]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tied_table_stays_one_tensor_through_training_and_export(tmp_path, mode):
    ck = load_v3_checkpoint(tiny_v3_dir(head_copies=True))
    model = ck.model
    before = model.audio_table.weight.detach().clone()
    if mode == "lora":
        model = apply_v3_lora(model, r=4, alpha=8)
        assert model.base_model.model.audio_table.weight.requires_grad
    assert len(_table_params(model)) == 1  # one parameter serves embedding and head (no modules_to_save copy)
    _one_step(model, [p for p in model.parameters() if p.requires_grad])
    base = model.merge_and_unload() if mode == "lora" else model
    assert len(_table_params(base)) == 1
    trained = base.audio_table.weight.detach().clone()
    assert not torch.equal(trained, before)
    out = save_v3_checkpoint(base, tmp_path / "out", codec_state=ck.codec_state, head_copies=ck.head_copies)
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved[AUDIO_TABLE_KEY], trained) and torch.equal(saved[AUDIO_HEAD_COPY_KEY], trained)
    assert torch.equal(saved[TEXT_HEAD_COPY_KEY], saved[TEXT_EMBEDDING_KEY])
    assert torch.equal(load_v3_checkpoint(out).model.audio_table.weight, trained)


def test_table_gets_gradient_from_embedding_and_head():
    """The one tensor's gradient is the sum of its input-path and head-path gradients."""
    import torch.nn.functional as F

    model = load_v3_checkpoint(tiny_v3_dir()).model
    tok, t = tiny_tokenizer(), tiny_tokens()
    batch = collate_v3([build_v3_sample(tok, t, "Hi.", target_codes=torch.arange(24).view(8, 3))], tok.pad_token_id)
    model(**batch).loss.backward()
    total = model.audio_table.weight.grad.clone()
    # the same forward with the two uses split into two separate leaf copies
    table = model.audio_table
    as_input = table.weight.detach().clone().requires_grad_()
    as_head = table.weight.detach().clone().requires_grad_()
    offsets = torch.arange(8) * 1026
    table.embed = lambda codes: F.embedding(codes + offsets, as_input).sum(-2)
    table.logits = lambda h: F.linear(h, as_head).view(*h.shape[:-1], 8, 1026)
    model(**batch).loss.backward()
    assert as_input.grad.abs().sum() > 0 and as_head.grad.abs().sum() > 0
    torch.testing.assert_close(total, as_input.grad + as_head.grad, rtol=1e-5, atol=1e-7)


def test_untied_text_head_passes_through_only_when_config_unties(tmp_path):
    folder = copy_tiny(tmp_path / "c", head_copies=True)
    _rewrite(folder, lambda t: t[TEXT_HEAD_COPY_KEY].mul_(2))
    with pytest.raises(
        ModelLoadError, match=r"tied\.head\.text_head\.weight differs from tied\.embedding\.text_embedding\.weight"
    ):
        load_v3_checkpoint(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(raw))
    ck = load_v3_checkpoint(folder)
    assert set(ck.passthrough) == {TEXT_HEAD_COPY_KEY} and ck.head_copies == (AUDIO_HEAD_COPY_KEY,)
    out = save_v3_checkpoint(
        ck.model, tmp_path / "out", codec_state=ck.codec_state, head_copies=ck.head_copies, passthrough=ck.passthrough
    )
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_loads(tmp_path):
    folder = copy_tiny(tmp_path / "c")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = load_v3_checkpoint(folder)
    assert torch.equal(ck.model.audio_table.weight, tensors[AUDIO_TABLE_KEY]) and len(ck.codec_state) > 100
