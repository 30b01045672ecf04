"""`higgs-tune convert`: an original-layout checkpoint, built here by inverting the mapping on the
tiny model, converts back to a model with identical weights and logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_model_support import model_inputs, synthetic_batch

from higgs_tune.app.cli import main
from higgs_tune.config import ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.convert import convert_checkpoint, convert_key
from higgs_tune.model.load import load_model, load_processor

BPE_VOCAB = 1792  # the tiny tokenizer's regular tokens; PartiallyFrozenEmbedding froze rows below the specials
DROPPED = [
    "audio_codebook_weights",
    "audio_encoder_proj.linear.weight",
    "audio_tower.conv1.weight",
    "layers.0.self_attn.rotary_emb.inv_freq",
]


def _to_original_key(key: str) -> str:
    """The inverse of the conversion's renames."""
    if key.startswith("model.embed_audio_tokens.embed_audio_tokens."):
        return "audio_codebook_embeddings." + key.split(".", 3)[3]
    if key.startswith("model."):
        return key[len("model.") :]
    return "audio_decoder_proj." + key  # audio_lm_head / text_lm_head


def make_original(tiny_dir, out, extra: dict | None = None, **config_changes):
    """An original boson_multimodal-style checkpoint with the tiny model's weights."""
    hf = load_file(str(tiny_dir / "model.safetensors"))
    hf.update(extra or {})
    state = {_to_original_key(k): v for k, v in hf.items()}
    # PartiallyFrozenEmbedding / PartiallyFrozenLinear splits, as the original trainer saves them
    emb = state.pop("embed_tokens.weight")
    state["embed_tokens.embedding_frozen.weight"] = emb[:BPE_VOCAB].clone()
    state["embed_tokens.embedding_trainable.weight"] = emb[BPE_VOCAB:].clone()
    head = state.pop("audio_decoder_proj.audio_lm_head.weight")
    state["audio_decoder_proj.audio_lm_head.linear_frozen.weight"] = head[:4000].clone()
    state["audio_decoder_proj.audio_lm_head.linear_trainable.weight"] = head[4000:].clone()
    # tensors the port does not use
    state["audio_codebook_weights"] = torch.full((8,), 0.125)
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["audio_tower.conv1.weight"] = torch.zeros(4, 2, 3)
    state["audio_encoder_proj.linear.weight"] = torch.zeros(64, 4)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    hf_cfg = json.loads((tiny_dir / "config.json").read_text())
    rope = dict(hf_cfg["rope_parameters"])
    config = {
        "model_type": "higgs_audio",
        "architectures": ["HiggsAudioModel"],
        "text_config": {
            "model_type": "llama",
            **{
                k: hf_cfg[k]
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "hidden_act",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "attention_bias",
                    "attention_dropout",
                    "mlp_bias",
                    "bos_token_id",
                )
            },
            "rope_theta": rope.pop("rope_theta"),
            "rope_scaling": rope,
        },
        "audio_adapter_type": "dual_ffn_fast_forward",
        "audio_dual_ffn_layers": [0, 1],
        "audio_num_codebooks": 8,
        "audio_codebook_size": 1024,
        "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025,
        "audio_out_token_idx": hf_cfg["audio_token_id"],
        "audio_out_bos_token_id": hf_cfg["audio_bos_token_id"],
        "pad_token_id": hf_cfg["pad_token_id"],
        "use_delay_pattern": True,
        "skip_audio_tower": False,
        "use_audio_out_self_attention": False,
        "torch_dtype": "float32",
        **config_changes,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, out / name)
    return out


def _logits(model, batch):
    with torch.no_grad():
        out = model.model(**model_inputs(batch)).last_hidden_state
        return model.audio_lm_head(out), model.text_lm_head(out)


def test_convert_round_trip_gives_identical_model(tiny_dir, tmp_path):
    src = make_original(tiny_dir, tmp_path / "orig")
    summary = convert_checkpoint(src, tmp_path / "hf", audio_tokenizer=tiny_dir / "audio_tokenizer")
    assert summary["dropped"] == DROPPED
    assert summary["text_head"] is True and summary["audio_self_attention"] is False
    assert summary["tensors"] == 33

    converted_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    tiny_cfg = json.loads((tiny_dir / "config.json").read_text())
    for key in (
        "num_codebooks",
        "codebook_size",
        "audio_token_id",
        "audio_bos_token_id",
        "audio_delay_token_id",
        "audio_stream_bos_id",
        "audio_stream_eos_id",
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
        "rope_parameters",
        "head_dim",
        "vocab_size",
    ):
        assert converted_cfg[key] == tiny_cfg[key], key
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["ras_win_len"] == 7 and generation["ras_win_max_num_repeat"] == 2

    original = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32")).eval()
    converted = load_model(ModelConfig(name_or_path=str(tmp_path / "hf"), dtype="float32")).eval()
    for name, tensor in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    batch = synthetic_batch(original.config)
    for a, b in zip(_logits(original, batch), _logits(converted, batch), strict=True):
        assert torch.equal(a, b)
    processor = load_processor(tmp_path / "hf")
    assert processor.tokenizer.chat_template == load_processor(tiny_dir).tokenizer.chat_template


def test_convert_keeps_audio_self_attention(tiny_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    block = {}
    for i in range(2):
        for proj, shape in (("q_proj", (64, 64)), ("k_proj", (32, 64)), ("v_proj", (32, 64)), ("o_proj", (64, 64))):
            block[f"model.layers.{i}.audio_attn.{proj}.weight"] = torch.randn(shape, generator=g)
        block[f"model.layers.{i}.audio_post_audio_attn_layer_norm.weight"] = torch.rand(64, generator=g)
    src = make_original(tiny_dir, tmp_path / "orig", extra=block, use_audio_out_self_attention=True)
    assert "layers.0.audio_attn.q_proj.weight" in load_file(str(src / "model.safetensors"))
    summary = convert_checkpoint(src, tmp_path / "hf")  # no audio tokenizer: model + text tokenizer only
    assert summary["audio_self_attention"] is True and summary["audio_tokenizer"] is None
    assert not (tmp_path / "hf" / "audio_tokenizer").exists()
    model = load_model(
        ModelConfig(
            name_or_path=str(tmp_path / "hf"),
            dtype="float32",
            audio_self_attention=True,
            audio_tokenizer=str(tiny_dir / "audio_tokenizer"),
        )
    )
    state = model.state_dict()
    for name, tensor in block.items():
        assert torch.equal(state[name], tensor), name


def test_convert_refuses_what_it_cannot_express(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"already in the transformers layout"):
        convert_checkpoint(tiny_dir, tmp_path / "x")
    src = make_original(
        tiny_dir, tmp_path / "stack_adapter", audio_adapter_type="stack", use_audio_out_embed_projector=True
    )
    with pytest.raises(
        ModelLoadError, match=r"cannot express: audio_adapter_type 'stack' .*; use_audio_out_embed_projector: true"
    ):
        convert_checkpoint(src, tmp_path / "y")
    src = make_original(tiny_dir, tmp_path / "partial", audio_dual_ffn_layers=[1])
    with pytest.raises(ModelLoadError, match=r"audio_dual_ffn_layers \[1\] \(the port has DualFFN in all 2 layers\)"):
        convert_checkpoint(src, tmp_path / "z")


def test_loading_an_original_checkpoint_points_to_convert(tiny_dir, tmp_path):
    src = make_original(tiny_dir, tmp_path / "orig")
    with pytest.raises(ModelLoadError, match=r"higgs-tune convert"):
        load_model(ModelConfig(name_or_path=str(src)))


def test_convert_key():
    assert convert_key("audio_codebook_embeddings.weight") == "model.embed_audio_tokens.embed_audio_tokens.weight"
    assert convert_key("layers.3.audio_attn.q_proj.weight") == "model.layers.3.audio_attn.q_proj.weight"
    assert convert_key("norm.weight") == "model.norm.weight"
    assert convert_key("audio_decoder_proj.text_lm_head.weight") == "text_lm_head.weight"


def test_convert_cli(tiny_dir, tmp_path):
    src = make_original(tiny_dir, tmp_path / "orig")
    runner = CliRunner()
    result = runner.invoke(
        main, ["convert", str(src), str(tmp_path / "hf"), "--audio-tokenizer", str(tiny_dir / "audio_tokenizer")]
    )
    assert result.exit_code == 0, result.output
    assert f"converted {src} -> {tmp_path / 'hf'}: 33 tensors (float32)" in result.output
    assert "dropped 4 tensor(s)" in result.output
    assert (tmp_path / "hf" / "audio_tokenizer" / "config.json").is_file()
    again = runner.invoke(main, ["convert", str(src), str(tmp_path / "hf")])
    assert again.exit_code == 2 and "is not empty; choose an empty folder or pass --overwrite" in again.output
