"""Loader: options honoured, and every broken stack fails with a ModelLoadError that says what to do."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor

from higgs_tune.config import ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.load import load_audio_tokenizer, load_model, load_processor, load_text_tokenizer


def _cfg(path, **kw) -> ModelConfig:
    kw.setdefault("dtype", "float32")
    return ModelConfig(name_or_path=str(path), **kw)


@pytest.fixture
def stack(tiny_dir, tmp_path):
    """A private copy of the tiny stack the test may break."""
    return shutil.copytree(tiny_dir, tmp_path / "stack")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_load_model_defaults_and_text_head(tiny_dir):
    model = load_model(_cfg(tiny_dir))
    assert isinstance(model, HiggsAudioV2ForConditionalGeneration)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert not model.is_activation_checkpointing
    saved = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(model.text_lm_head.weight, saved["text_lm_head.weight"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_load_model_dtype_attention_checkpointing_no_text_head(tiny_dir):
    model = load_model(
        _cfg(tiny_dir, dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True, use_text_head=False)
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.is_activation_checkpointing
    assert model.text_lm_head is None


def test_flash_attention_missing_is_a_clear_error(tiny_dir):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(
        ModelLoadError, match=r"flash_attention_2 but flash-attn is not usable here.*attn_implementation: sdpa"
    ):
        load_model(_cfg(tiny_dir, dtype="bfloat16", attn_implementation="flash_attention_2"))


def test_text_head_missing_from_checkpoint_warns_loudly(stack, caplog):
    no_head = HiggsAudioV2ForConditionalGeneration.from_pretrained(stack, use_text_head=False)
    (stack / "model.safetensors").unlink()
    no_head.save_pretrained(stack)
    assert "text_lm_head.weight" not in load_file(str(stack / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="higgs_tune.model.load"):
        model = load_model(_cfg(stack, use_text_head=True))
    assert model.text_lm_head is not None
    assert "has no text_lm_head.weight: the text head is RANDOMLY initialised" in caplog.text
    assert "model.use_text_head: false" in caplog.text


def test_missing_weights_are_an_error(stack):
    weights = load_file(str(stack / "model.safetensors"))
    del weights["model.layers.1.audio_mlp.up_proj.weight"]
    save_file(weights, str(stack / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match=r"lacks 1 weight\(s\) of the model \(model.layers.1.audio_mlp.up_proj.weight\)"
    ):
        load_model(_cfg(stack))


def test_config_that_does_not_fit_the_weights(stack):
    _edit_json(stack / "config.json", intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"do not have the shapes its config.json describes"):
        load_model(_cfg(stack))


def test_non_higgs_folder_names_what_it_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(
        ModelLoadError,
        match=(
            r"not a Higgs Audio v2 checkpoint: config.json has model_type 'llama' \(architectures "
            r"\['LlamaForCausalLM'\]\)"
        ),
    ):
        load_model(_cfg(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config.json: it is not a model checkpoint"):
        load_model(_cfg(empty))
    with pytest.raises(ModelLoadError, match=r"checkpoint folder .*/nope does not exist"):
        load_model(_cfg(tmp_path / "nope"))


def test_original_layout_points_to_convert(stack):
    _edit_json(stack / "config.json", model_type="higgs_audio", architectures=["HiggsAudioModel"])
    with pytest.raises(
        ModelLoadError,
        match=(
            r"(?s)original boson_multimodal .*Convert it once with:\n    higgs-tune convert \S+/stack "
            r"\S+/stack-hf --audio-tokenizer"
        ),
    ):
        load_model(_cfg(stack))


def test_original_layout_detected_by_weight_names(stack):
    weights = load_file(str(stack / "model.safetensors"))
    weights["audio_codebook_embeddings.weight"] = weights.pop("model.embed_audio_tokens.embed_audio_tokens.weight")
    save_file(weights, str(stack / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"higgs-tune convert"):
        load_model(_cfg(stack))


def test_codebook_mismatch(stack):
    _edit_json(stack / "config.json", codebook_size=1024)
    with pytest.raises(ModelLoadError, match=r"codebook_size 1024 != audio tokenizer codebook_size 1024 \+ 2"):
        load_model(_cfg(stack))
    _edit_json(stack / "config.json", codebook_size=1026, num_codebooks=4)
    with pytest.raises(ModelLoadError, match=r"num_codebooks 4 != the audio tokenizer's num_quantizers 8"):
        load_model(_cfg(stack))
    with pytest.raises(ModelLoadError, match=r"num_codebooks 4"):
        load_processor(stack)


def test_missing_tokenizer(stack):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (stack / name).unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"has no text tokenizer \(looked for tokenizer.json, tokenizer_config.json, tokenizer.model\)",
    ):
        load_processor(stack)
    with pytest.raises(ModelLoadError, match=r"has no text tokenizer"):
        load_text_tokenizer(stack)


def test_missing_audio_tokenizer_names_the_places_looked(stack, tmp_path):
    shutil.rmtree(stack / "audio_tokenizer")
    # processor_config.json still records the codec of the original (session) folder: it is used
    assert load_audio_tokenizer(stack).config.num_quantizers == 8
    _edit_json(
        stack / "processor_config.json",
        audio_tokenizer={
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": str(tmp_path / "gone"),
        },
    )
    with pytest.raises(
        ModelLoadError, match=r"records the audio tokenizer at .*/gone, which does not exist.*Set model.audio_tokenizer"
    ):
        load_processor(stack)
    with pytest.raises(ModelLoadError, match=r"records the audio tokenizer at .*/gone"):
        load_model(_cfg(stack))
    (stack / "processor_config.json").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"no audio tokenizer for .*audio_tokenizer is absent and processor_config.json records none",
    ):
        load_processor(stack)


def test_audio_tokenizer_that_is_something_else(stack, tiny_dir):
    with pytest.raises(ModelLoadError, match=r"is not a Higgs Audio v2 audio tokenizer: model_type 'higgs_audio_v2'"):
        load_processor(stack, audio_tokenizer=tiny_dir)


def test_processor_from_a_moved_folder_equals_the_saved_one(tiny_dir, tmp_path):
    moved = shutil.copytree(tiny_dir, tmp_path / "moved")
    # the recorded absolute path points to a folder that no longer exists; ours looks in moved/audio_tokenizer
    _edit_json(
        moved / "processor_config.json",
        audio_tokenizer={
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": str(tmp_path / "gone"),
        },
    )
    ours = load_processor(moved)
    reference = HiggsAudioV2Processor.from_pretrained(tiny_dir)
    wav = np.random.RandomState(0).randn(24000).astype(np.float32) * 0.1
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Generate audio following instruction."}]},
        {"role": "user", "content": [{"type": "text", "text": "The cat sat on the mat."}]},
        {"role": "assistant", "content": [{"type": "audio", "audio": wav}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello there."}]},
    ]
    kw = dict(tokenize=True, return_dict=True, add_generation_prompt=True, sampling_rate=24000, return_tensors="pt")
    a, b = ours.apply_chat_template(conversation, **kw), reference.apply_chat_template(conversation, **kw)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ours.audio_stream_bos_id == 1024 and ours.audio_stream_eos_id == 1025


def test_explicit_audio_tokenizer_wins(stack, tiny_dir):
    _edit_json(stack / "audio_tokenizer" / "config.json", model_type="llama")  # the local one is broken
    with pytest.raises(ModelLoadError, match=r"not a Higgs Audio v2 audio tokenizer: model_type 'llama'"):
        load_processor(stack)
    processor = load_processor(stack, audio_tokenizer=tiny_dir / "audio_tokenizer")
    assert processor.audio_tokenizer.config.num_quantizers == 8
    assert load_model(_cfg(stack, audio_tokenizer=str(tiny_dir / "audio_tokenizer"))).config.num_codebooks == 8


def test_token_ids_must_match_the_tokenizer(stack):
    _edit_json(stack / "config.json", audio_token_id=5)
    with pytest.raises(ModelLoadError, match=r"audio_token_id=5 but the tokenizer maps <\|AUDIO_OUT\|> to 1808"):
        load_processor(stack)


def test_hub_id_that_cannot_be_fetched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError,
        match=r"could not fetch 'someone/not-cached-model' from the Hugging Face Hub \(LocalEntryNotFoundError",
    ):
        load_model(_cfg("someone/not-cached-model"))
