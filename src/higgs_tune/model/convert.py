"""Convert an original boson_multimodal Higgs Audio checkpoint (`model_type: higgs_audio`) to the
transformers layout (`HiggsAudioV2ForConditionalGeneration`), for `higgs-tune convert SRC DST`.

Weights (the mapping transformers' own conversion script applies, written out here):
- PartiallyFrozenEmbedding / PartiallyFrozenLinear halves are concatenated back along dim 0:
  `X.embedding_frozen.weight` + `X.embedding_trainable.weight` -> `X.weight` (same for `linear_*`);
- `audio_codebook_embeddings.*`            -> `model.embed_audio_tokens.embed_audio_tokens.*`
- `embed_tokens.* | layers.* | norm.*`     -> `model.` + the same name
  (this keeps `layers.N.audio_attn.*` / `layers.N.audio_post_audio_attn_layer_norm.*`, the
  optional audio self-attention, under the names higgs-tune's block uses);
- `audio_decoder_proj.{audio,text}_lm_head.*` -> `{audio,text}_lm_head.*`;
- dropped: `audio_codebook_weights`, rotary `inv_freq` buffers, and the Whisper audio-understanding
  tower `audio_tower.*` / `audio_encoder_proj.*` (the transformers port has no audio input tower).

Config: the Llama `text_config` fields move to the top level (`rope_theta` + `rope_scaling` become
`rope_parameters`); `audio_num_codebooks` -> `num_codebooks`; `audio_codebook_size + 2` ->
`codebook_size` (rows for stream BOS/EOS); `audio_out_token_idx` -> `audio_token_id`;
`audio_out_bos_token_id` -> `audio_bos_token_id`; the delay token id and `eos_token_id`
(`<|eot_id|>`) are read from the tokenizer. Variants the port cannot express (stack adapter,
DualFFN on only some layers, audio-out embed projector, decoder-projector layers, averaged
audio embeddings, RQ-transformer, no delay pattern) are refused with the reason.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerModel,
)

from higgs_tune.errors import ModelLoadError
from higgs_tune.model.audio_attention import AUDIO_ATTN_KEY_PARTS, enable_audio_self_attention
from higgs_tune.model.load import (
    MODEL_TYPE,
    ORIGINAL_MODEL_TYPE,
    checkpoint_keys,
    is_original_layout,
    load_processor,
    load_text_tokenizer,
    read_model_config,
    read_tensors,
    resolve_checkpoint,
)
from higgs_tune.resources import chat_template

logger = logging.getLogger(__name__)

KEY_RENAMES = (
    (r"^audio_codebook_embeddings\.", "model.embed_audio_tokens.embed_audio_tokens."),
    (r"^(embed_tokens|layers|norm)\.", r"model.\1."),
    (r"^audio_decoder_proj\.(audio_lm_head|text_lm_head)\.", r"\1."),
)
DROPPED = (
    re.compile(r"(^|\.)audio_codebook_weights$"),
    re.compile(r"(^|\.)rotary_emb\.(original_)?inv_freq$"),
    re.compile(r"^audio_tower\."),
    re.compile(r"^audio_encoder_proj\."),
)
# PartiallyFrozen{Embedding,Linear}: rows [0, freeze) in *_frozen, the rest in *_trainable
SPLIT_PARTS = (("embedding_frozen", "embedding_trainable"), ("linear_frozen", "linear_trainable"))
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "attention_bias", "attention_dropout", "mlp_bias",
)  # fmt: skip
CONVERSION_INFO = "higgs_tune_conversion.json"


def convert_key(key: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def merge_partially_frozen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate `X.<frozen>.weight` + `X.<trainable>.weight` into `X.weight` (dim 0)."""
    out = dict(state)
    for frozen, trainable in SPLIT_PARTS:
        for key in [k for k in state if k.endswith(f".{frozen}.weight")]:
            base = key[: -len(f".{frozen}.weight")]
            partner = f"{base}.{trainable}.weight"
            if partner not in state:
                raise ModelLoadError(
                    f"original checkpoint has {key} but not {partner}: the split {frozen}/{trainable} weight is "
                    "incomplete."
                )
            out[f"{base}.weight"] = torch.cat([out.pop(key), out.pop(partner)], dim=0)
    return out


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original tensors -> (transformers tensors, names dropped)."""
    merged = merge_partially_frozen(state)
    out, dropped = {}, []
    for key, tensor in merged.items():
        if any(p.search(key) for p in DROPPED):
            dropped.append(key)
            continue
        out[convert_key(key)] = tensor
    return out, sorted(dropped)


def _rope_parameters(text: dict) -> dict:
    if isinstance(text.get("rope_parameters"), dict):
        return dict(text["rope_parameters"])
    theta = text.get("rope_theta", 500000.0)
    scaling = text.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    params = {k: v for k, v in scaling.items() if k != "type"}
    params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    params["rope_theta"] = theta
    return params


def convert_config(original: dict, tokenizer) -> dict:
    """Original HiggsAudioConfig dict -> HiggsAudioV2Config kwargs; unsupported variants raise."""
    text = original.get("text_config") or {}
    problems = []
    n_layers = text.get("num_hidden_layers")
    adapter = original.get("audio_adapter_type", "stack")
    if adapter not in ("dual_ffn", "dual_ffn_fast_forward"):
        problems.append(f"audio_adapter_type {adapter!r} (the port implements DualFFN only)")
    elif sorted(original.get("audio_dual_ffn_layers") or []) != list(range(n_layers or 0)):
        problems.append(
            f"audio_dual_ffn_layers {original.get('audio_dual_ffn_layers')} (the port has DualFFN in all "
            f"{n_layers} layers)"
        )
    for flag in ("use_audio_out_embed_projector", "audio_embed_avg", "use_rq_transformer"):
        if original.get(flag):
            problems.append(f"{flag}: true")
    if original.get("audio_decoder_proj_num_layers", 0):
        problems.append(
            f"audio_decoder_proj_num_layers {original['audio_decoder_proj_num_layers']} (the port's heads are "
            "plain linears)"
        )
    if not original.get("use_delay_pattern", False):
        problems.append("use_delay_pattern: false (transformers' generation always applies the delay pattern)")
    missing_text = [
        f for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if f not in text
    ]
    if missing_text:
        problems.append(f"text_config lacks {', '.join(missing_text)}")
    if problems:
        raise ModelLoadError(
            "this original checkpoint uses features the transformers Higgs Audio v2 port cannot express: "
            + "; ".join(problems)
            + "."
        )

    def token_id(token: str) -> int:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelLoadError(
                f"the tokenizer has no {token} token; it is not a Higgs Audio tokenizer. Use the tokenizer of the "
                "original checkpoint."
            )
        return tid

    audio_size = original.get("audio_codebook_size", 1024)
    kwargs = {f: text[f] for f in TEXT_FIELDS if f in text}
    kwargs["head_dim"] = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kwargs.setdefault("num_key_value_heads", text["num_attention_heads"])
    kwargs["rope_parameters"] = _rope_parameters(text)
    kwargs.update(
        num_codebooks=original.get("audio_num_codebooks", 12),
        codebook_size=audio_size + 2,  # + stream BOS and EOS rows
        audio_stream_bos_id=original.get("audio_stream_bos_id", audio_size),
        audio_stream_eos_id=original.get("audio_stream_eos_id", audio_size + 1),
        audio_token_id=original.get("audio_out_token_idx", token_id("<|AUDIO_OUT|>")),
        audio_bos_token_id=original.get("audio_out_bos_token_id", token_id("<|audio_out_bos|>")),
        audio_delay_token_id=token_id("<|reserved_special_token_6|>"),
        pad_token_id=original.get("pad_token_id", text.get("pad_token_id")),
        bos_token_id=text.get("bos_token_id", tokenizer.bos_token_id),
        eos_token_id=token_id("<|eot_id|>"),
        tie_word_embeddings=False,
    )
    for field, token in (("audio_token_id", "<|AUDIO_OUT|>"), ("audio_bos_token_id", "<|audio_out_bos|>")):
        if kwargs[field] != token_id(token):
            raise ModelLoadError(
                f"config {field} {kwargs[field]} but the tokenizer maps {token} to {token_id(token)}: tokenizer "
                "and checkpoint do not belong together."
            )
    if kwargs["audio_stream_eos_id"] != audio_size + 1 or kwargs["audio_stream_bos_id"] != audio_size:
        raise ModelLoadError(
            f"audio_stream_bos_id/eos_id must be {audio_size}/{audio_size + 1} for codebook size {audio_size}."
        )
    return kwargs


def _source_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def convert_checkpoint(
    src: str | Path, dst: str | Path, audio_tokenizer: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Convert SRC (original layout) into DST (transformers layout). Returns a summary dict."""
    source = resolve_checkpoint(src)
    original = read_model_config(source)
    keys = checkpoint_keys(source)
    if not is_original_layout(original, keys):
        if original.get("model_type") == MODEL_TYPE:
            raise ModelLoadError(
                f"{source} is already in the transformers layout (model_type {MODEL_TYPE!r}); use it directly."
            )
        raise ModelLoadError(
            f"{source} is not an original Higgs Audio checkpoint: model_type {original.get('model_type')!r} "
            f"(architectures {original.get('architectures')}); expected {ORIGINAL_MODEL_TYPE!r}."
        )
    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ModelLoadError(f"{out} is not empty; choose an empty folder or pass --overwrite.")
        shutil.rmtree(out)

    tokenizer = load_text_tokenizer(source)
    config = HiggsAudioV2Config(**convert_config(original, tokenizer))
    tensors, dropped = convert_state_dict(read_tensors(keys, keys))
    has_text_head = "text_lm_head.weight" in tensors
    audio_attn = bool(original.get("use_audio_out_self_attention")) or any(
        any(p in k for p in AUDIO_ATTN_KEY_PARTS) for k in tensors
    )
    dtype = _source_dtype(tensors)
    config.dtype = dtype

    # Build on the meta device (no memory), then assign the converted tensors: this checks every
    # name and shape against the real module tree before anything is written.
    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=has_text_head)
        if audio_attn:
            enable_audio_self_attention(model)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong_shape = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}"
        for k, v in model.state_dict().items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise ModelLoadError(
            f"{source} does not convert cleanly: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape mismatches {wrong_shape[:4]}. The config and the weights disagree."
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        ras_win_len=7,  # repetition-aware sampling as in the original serve engine
        ras_win_max_num_repeat=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    # the original tokenizer carries Llama-3's chat template, which cannot place audio turns
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(str(out))

    codec_note = None
    if audio_tokenizer is not None:
        codec_dir = resolve_checkpoint(audio_tokenizer)
        HiggsAudioV2TokenizerModel.from_pretrained(str(codec_dir)).save_pretrained(str(out / "audio_tokenizer"))
        processor = load_processor(out)  # checks codebooks and token ids against the new config
        processor.audio_tokenizer.name_or_path = str((out / "audio_tokenizer").resolve())
        processor.save_pretrained(str(out))
    else:
        codec_note = "no audio tokenizer given: set model.audio_tokenizer when loading, or rerun with --audio-tokenizer"
        logger.warning("%s: %s", out, codec_note)

    summary = {
        "source": str(src),
        "model_type": MODEL_TYPE,
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(tensors),
        "dropped": dropped,
        "text_head": has_text_head,
        "audio_self_attention": audio_attn,
        "audio_tokenizer": str(audio_tokenizer) if audio_tokenizer is not None else None,
    }
    (out / CONVERSION_INFO).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
