"""A tiny random Higgs Audio v3 checkpoint, written in the RELEASED layout, built offline.

    OUT/
      config.json          model_type higgs_multimodal_qwen3, text_config (qwen3, rope_theta null),
                           audio_encoder_config (discrete, 8 codebooks, vocab 1026, tied)
      model.safetensors    tied.* / body.* keys, the bundled codec under
                           tied.embedding.modality_embeddings.0.model.*
      codec_config.json    the tiny codec's HiggsAudioV2TokenizerConfig (not in a released checkpoint)
      tokenizer.json, tokenizer_config.json   byte-level BPE + the v3 special tokens

The special tokens keep the reported spacing of the real ids (`<|tts|>` 151667, `<|audio|>`
+3, `<|audio_end|>` +4, `<|text|>` +5, `<|ref_audio|>` +12, `<|ref_text|>` +13, control tags
after; unverified against the real tokenizer: the engines read every id from the tokenizer).
The codec is the tiny v2 codec of `higgs_tune.tiny` (called, not copied).

Self-contained on purpose (moves to `tiny/v3.py` at merge).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from higgs_tune.runfs import claim

# Relative to <|tts|>: the spacing reported for the real tokenizer (151667 ...).
V3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tts|>",  # tts + 0
    "<|tiny_reserved_0|>",
    "<|tiny_reserved_1|>",
    "<|audio|>",  # tts + 3
    "<|audio_end|>",  # tts + 4
    "<|text|>",  # tts + 5
    *(f"<|tiny_reserved_{i}|>" for i in range(2, 8)),
    "<|ref_audio|>",  # tts + 12
    "<|ref_text|>",  # tts + 13
    *(f"<|tiny_control_{i}|>" for i in range(4)),  # stand-ins for the control tags
)


@dataclass(frozen=True)
class V3TinySpec:
    seed: int = 0
    bpe_vocab_size: int = 1024
    vocab_size: int = 1088  # model rows >= tokenizer length (the real model has 151936)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    num_codebooks: int = 8


def build_v3_text_tokenizer(spec: V3TinySpec):
    """Byte-level BPE on the bundled English+Arabic corpus, then the v3 specials."""
    from transformers import PreTrainedTokenizerFast

    from higgs_tune.tiny.v2 import train_corpus_bpe

    tok = train_corpus_bpe(spec.bpe_vocab_size)
    filler = [f"<|unused_{i}|>" for i in range(spec.bpe_vocab_size - tok.get_vocab_size())]
    if filler:
        tok.add_tokens(filler)
    tok.add_special_tokens(list(V3_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    if len(fast) > spec.vocab_size:
        raise RuntimeError(f"tiny v3 tokenizer has {len(fast)} tokens > model vocab {spec.vocab_size}")
    return fast


def tiny_v3_config(spec: V3TinySpec, tokenizer) -> dict:
    """A config.json in the released shape (field names as the engines read them)."""
    return {
        "architectures": ["HiggsMultimodalQwen3ForConditionalGeneration"],
        "model_type": "higgs_multimodal_qwen3",
        "audio_token_id": -100,
        "mel_per_sample": 8,
        "audio_encoder_config": {
            "encoder_type": "discrete",
            "num_codebooks": spec.num_codebooks,
            "vocab_size": 1026,
            "tie_word_embeddings": True,
        },
        "text_config": {
            "model_type": "qwen3",
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": None,  # as released; patched to 1e6 at load
            "tie_word_embeddings": True,
            "hidden_act": "silu",
        },
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def make_tiny_v3(out_dir: str | Path, seed: int = 0, *, head_copies: bool = False, overwrite: bool = False) -> Path:
    """Build and save the tiny v3 checkpoint; `head_copies` also writes the `tied.head.*` copies."""
    from higgs_tune.families.v3.checkpoint import (
        AUDIO_HEAD_COPY_KEY,
        TEXT_HEAD_COPY_KEY,
        save_v3_checkpoint,
        v3_config_from_dict,
    )
    from higgs_tune.families.v3.model import build_v3_model
    from higgs_tune.tiny.v2 import TinySpec, build_audio_tokenizer, clear_owned_folder

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True or choose an empty folder.")
        clear_owned_folder(out, FileExistsError)
    spec = V3TinySpec(seed=seed)
    tokenizer = build_v3_text_tokenizer(spec)
    codec = build_audio_tokenizer(TinySpec(seed=seed, num_codebooks=spec.num_codebooks))
    raw = tiny_v3_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = build_v3_model(v3_config_from_dict(raw, "tiny config"))
    save_v3_checkpoint(
        model,
        out,
        codec_state=codec.state_dict(),
        head_copies=(AUDIO_HEAD_COPY_KEY, TEXT_HEAD_COPY_KEY) if head_copies else (),
        tokenizer=tokenizer,
        codec_config=codec.config.to_dict(),
    )
    (out / "higgs_tune_tiny.json").write_text(
        json.dumps({"family": "v3", **asdict(spec), "head_copies": head_copies}, indent=2) + "\n"
    )
    claim(out, *(p.name for p in out.iterdir()))
    return out
