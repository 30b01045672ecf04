"""The tiny offline stack: deterministic, reloadable, consistent special tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
)

from higgs_tune.tiny import (
    OutputDirNotEmpty,
    TinySpec,
    build_audio_tokenizer,
    build_model,
    build_processor,
    build_text_tokenizer,
    make_tiny,
)


def _conversation(wav):
    return [
        {"role": "system", "content": [{"type": "text", "text": "Generate audio following instruction."}]},
        {"role": "user", "content": [{"type": "text", "text": "The cat sat on the mat."}]},
        {"role": "assistant", "content": [{"type": "audio", "audio": wav}]},
        {"role": "user", "content": [{"type": "text", "text": "مرحبا بكم في البيت."}]},
    ]


@pytest.fixture(scope="module")
def in_memory():
    spec = TinySpec(seed=0)
    torch.manual_seed(0)
    tok = build_text_tokenizer(spec)
    codec = build_audio_tokenizer(spec)
    torch.manual_seed(0)
    model = build_model(spec, tok)
    return tok, codec, model, build_processor(tok, codec)


def test_text_tokenizer_round_trips_arabic_and_english(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ["Hello, world! 123 times.", "مرحبا بكم في البيت، كيف حالك؟", "mixed نص and text ٣٤٥"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # every special token of the Higgs chat layout is one token
    for name in [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|audio_out_bos|>",
        "<|audio_eos|>",
        "<|AUDIO_OUT|>",
        "<|reserved_special_token_6|>",
        "<|scene_desc_start|>",
        "<|scene_desc_end|>",
    ]:
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1, name


def test_model_config_special_ids_match_tokenizer(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    ids = tok.convert_tokens_to_ids
    assert cfg["audio_token_id"] == ids("<|AUDIO_OUT|>")
    assert cfg["audio_bos_token_id"] == ids("<|audio_out_bos|>")
    assert cfg["audio_delay_token_id"] == ids("<|reserved_special_token_6|>")
    assert cfg["eos_token_id"] == ids("<|eot_id|>")
    assert cfg["bos_token_id"] == ids("<|begin_of_text|>")
    assert cfg["pad_token_id"] == tok.pad_token_id
    assert cfg["vocab_size"] == len(tok)
    codec = json.loads((tiny_dir / "audio_tokenizer" / "config.json").read_text())
    assert cfg["codebook_size"] == codec["codebook_size"] + 2
    assert cfg["audio_stream_bos_id"] == codec["codebook_size"]
    assert cfg["audio_stream_eos_id"] == codec["codebook_size"] + 1


def test_audio_codes_shape_and_variety(tiny_dir):
    codec = HiggsAudioV2TokenizerModel.from_pretrained(tiny_dir / "audio_tokenizer").eval()
    assert codec.config.num_quantizers == 8 and codec.config.frame_rate == 25
    seconds = 2
    t = torch.arange(24000 * seconds) / 24000
    wav = (0.3 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 1.5 * t)).reshape(1, 1, -1)
    with torch.no_grad():
        codes = codec.encode(wav, return_dict=False)
    assert codes.shape == (1, 8, 25 * seconds)
    assert codes.unique().numel() > 10  # randomised codebooks, not every frame -> code 0


def test_reload_gives_identical_processor_outputs_loss_and_generation(tiny_dir, in_memory):
    tok, codec, model, processor = in_memory
    wav = np.random.RandomState(0).randn(24000).astype(np.float32) * 0.1
    kwargs = dict(tokenize=True, return_dict=True, add_generation_prompt=True, sampling_rate=24000, return_tensors="pt")
    before = processor.apply_chat_template(_conversation(wav), **kwargs)

    re_proc = HiggsAudioV2Processor.from_pretrained(tiny_dir)
    re_model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True).eval()
    after = re_proc.apply_chat_template(_conversation(wav), **kwargs)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key

    labels = before["input_ids"].clone()
    audio_labels = before["audio_input_ids"].clone()
    with torch.no_grad():
        l1 = model(**before, labels=labels, audio_labels=audio_labels).loss
        l2 = re_model(**after, labels=labels, audio_labels=audio_labels).loss
    assert torch.isfinite(l1) and l1.item() == l2.item()
    for name, p in model.state_dict().items():
        assert torch.equal(p, re_model.state_dict()[name]), name

    g1 = model.generate(**before, max_new_tokens=12, do_sample=False)
    g2 = re_model.generate(**after, max_new_tokens=12, do_sample=False)
    assert g1.shape[1] > before["audio_input_ids"].shape[1]
    assert torch.equal(g1, g2)


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    other = make_tiny(tmp_path / "again", seed=0)
    for name in ["model.safetensors", "tokenizer.json", "audio_tokenizer/model.safetensors"]:
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_make_tiny_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(OutputDirNotEmpty, match="--overwrite"):
        make_tiny(tmp_path, seed=0)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_make_tiny_cli_refuses_without_overwrite(tmp_path):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path)])
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "config.json").exists() and not (tmp_path / "keep.txt").exists()
