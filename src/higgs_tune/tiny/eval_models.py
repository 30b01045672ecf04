"""Tiny random-weight evaluation models, built offline: a Whisper-style ASR and a WavLM x-vector.

`higgs-tune evaluate` loads its ASR and speaker models by id through `transformers`
(`WhisperForConditionalGeneration` + `WhisperProcessor`, `WavLMForXVector` + its feature
extractor). The tests and the CPU demo cannot download `openai/whisper-large-v3` or
`microsoft/wavlm-base-plus-sv`, so this module saves tiny models of the same classes with
`save_pretrained`; evaluation then runs through exactly the code path of the real ones.
Their numbers are meaningless (random weights); the code path is real.

`make_tiny_adapter` writes a LoRA adapter for the tiny Higgs stack the way training saves one
(`model.lora.apply_finetuning` + `save_trainable`), with random non-zero LoRA B matrices and a
perturbed audio head, so base + adapter differs from the base: generate / evaluate / export
can be exercised without a training run.

    ASR folder:     config.json, model.safetensors, generation_config.json,
                    tokenizer.json, tokenizer_config.json, processor_config.json
    speaker folder: config.json, model.safetensors, preprocessor_config.json

The Whisper tokenizer reuses the vocabulary and merges of the tiny stack's byte-level BPE
(`higgs_tune.tiny.v2.build_text_tokenizer`, trained on English + Arabic) and appends Whisper's
special tokens in Whisper's order (`<|endoftext|>`, `<|startoftranscript|>`, one token per
language, `<|translate|>`, `<|transcribe|>`, `<|startoflm|>`, `<|startofprev|>`,
`<|nospeech|>`, `<|notimestamps|>`), which `WhisperTokenizer.prefix_tokens` relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WavLMForXVector,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from higgs_tune.config import FinetuneConfig, ModelConfig
from higgs_tune.model.load import load_model
from higgs_tune.model.lora import apply_finetuning, save_trainable
from higgs_tune.tiny.v2 import TinySpec, build_text_tokenizer

ASR_SAMPLE_RATE = 16000
SPEAKER_SAMPLE_RATE = 16000


def _whisper_specials() -> list[str]:
    langs = [f"<|{code}|>" for code in LANGUAGES]
    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + langs
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    )


def build_whisper_tokenizer(seed: int = 0):
    """A WhisperTokenizer on the tiny stack's English+Arabic BPE, with Whisper's special tokens."""
    bpe = json.loads(build_text_tokenizer(TinySpec(seed=seed)).backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tok = WhisperTokenizer(vocab=dict(bpe["vocab"]), merges=merges, model_max_length=448)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in _whisper_specials()]}
    )
    return tok


def build_tiny_asr(seed: int = 0):
    """(WhisperForConditionalGeneration, WhisperProcessor), random weights, ~0.3M parameters."""
    tok = build_whisper_tokenizer(seed)
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s of 10 ms mel frames, halved by the conv stem
        max_target_positions=128,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=None,  # generation settings live in generation_config only
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        # As in Whisper's own configs: no special token inside the text, no empty transcript.
        suppress_tokens=[i for i in tok.all_special_ids if i != eot],
        begin_suppress_tokens=[eot],
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=ASR_SAMPLE_RATE)
    return model, WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tok)


def build_tiny_speaker_model(seed: int = 0):
    """(WavLMForXVector, Wav2Vec2FeatureExtractor), random weights, 16-dim embeddings."""
    config = WavLMConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        tdnn_dim=(16, 16, 16, 16, 32),
        xvector_output_dim=16,
        layerdrop=0.0,
    )
    torch.manual_seed(seed)
    model = WavLMForXVector(config).eval()
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SPEAKER_SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    return model, feature_extractor


def make_tiny_eval_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save the tiny ASR into `out_dir/asr` and the speaker model into `out_dir/speaker`.

    Returns (asr_dir, speaker_dir): pass them as `--asr-model` / `--speaker-model`."""
    out = Path(out_dir)
    asr_dir, spk_dir = out / "asr", out / "speaker"
    asr_model, asr_processor = build_tiny_asr(seed)
    asr_model.save_pretrained(asr_dir)
    asr_processor.save_pretrained(asr_dir)
    spk_model, spk_features = build_tiny_speaker_model(seed)
    spk_model.save_pretrained(spk_dir)
    spk_features.save_pretrained(spk_dir)
    return asr_dir, spk_dir


def make_tiny_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    pathways: tuple[str, ...] = ("text_attn", "text_mlp", "audio_mlp"),
    train_modules: tuple[str, ...] = ("audio_lm_head",),
    audio_self_attention: bool = False,
    scale: float = 0.05,
) -> Path:
    """A LoRA adapter folder for the tiny stack at `base_dir`: B ~ N(0, scale^2) instead of PEFT's
    zeros, fully trained modules perturbed by N(0, (scale/5)^2), saved with `save_trainable`."""
    model = load_model(
        ModelConfig(
            name_or_path=str(base_dir), dtype="float32", use_text_head=True, audio_self_attention=audio_self_attention
        )
    )
    cfg = FinetuneConfig(
        pathways=list(pathways), train_modules=list(train_modules), lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    peft_model = apply_finetuning(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale / 5)
    return save_trainable(peft_model, out_dir)
