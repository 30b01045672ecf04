"""Read and write Higgs Audio v3 checkpoints in the RELEASED layout, by an explicit key map.

Released keys (SGLang-Omni `weight_loader.py`, vLLM-Omni `higgs_audio_v3_talker.py`) and ours:

    tied.embedding.text_embedding.weight                  <-> body.embed_tokens.weight
    body.layers.N.<11 Qwen3 layer weights>                <-> body.layers.N.<same>
    body.norm.weight                                      <-> body.norm.weight
    tied.embedding.modality_embeddings.0.embedding.weight <-> audio_table.weight   (embedding = head)
    tied.head.modality_heads.0.weight   optional copy: accepted only if equal to the audio table
    tied.head.text_head.weight          optional: a copy equal to the text embedding, or (only when
                                        text_config.tie_word_embeddings is false) an untied text head,
                                        unused for speech, kept as is and written back on export
    tied.embedding.modality_embeddings.0.model.*          the bundled codec (HiggsAudioV2TokenizerModel)

Loading is strict: a required key that is missing, or any key outside this map, is an error
that names the key. `config.json` (`model_type: higgs_multimodal_qwen3`) carries the Qwen3
backbone as `text_config` and the audio side as `audio_encoder_config` (`encoder_type`,
`num_codebooks`, `vocab_size` = 1026, `tie_word_embeddings`, optional `out_dim`); the released
`text_config.rope_theta` is `null` and is set to 1e6 here (as both engines do), with a log line.

Saving writes the same layout back (config.json as read, codec included) so SGLang-Omni and
vLLM-Omni serve the export; a PEFT model must be merged first.

The bundled codec's config is not in the released config.json: the engines assume the standard
`bosonai/higgs-audio-v2-tokenizer` config (SGLang-Omni ships a copy as the v3 codec's config).
We read `codec_config.json` beside the weights when present (our tiny checkpoints, our
exports) and otherwise use `STANDARD_CODEC_CONFIG`. Note: transformers'
`HiggsAudioV2TokenizerConfig()` defaults are NOT that config (hop 320 instead of 960, 5
quantizers at the top bandwidth instead of 8); `STANDARD_CODEC_CONFIG` holds the released
values that differ and is checked field by field against SGLang's copy in tests/test_v3_parity.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from higgs_tune.errors import ModelLoadError
from higgs_tune.families.v3.model import DTYPES, HiggsV3Model, V3ModelConfig, build_v3_model

logger = logging.getLogger(__name__)

MODEL_TYPE = "higgs_multimodal_qwen3"
ARCHITECTURE = "HiggsMultimodalQwen3ForConditionalGeneration"
QWEN3_ROPE_THETA = 1_000_000.0
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CODEC_CONFIG_FILE = "codec_config.json"
# bosonai/higgs-audio-v2-tokenizer config.json where it differs from HiggsAudioV2TokenizerConfig()
# in transformers 5.24 (sub-config dicts merge over the defaults): 25 frames/s, 8 codebooks at 2 kbps.
STANDARD_CODEC_CONFIG = {
    "acoustic_model_config": {
        "downsampling_ratios": [8, 5, 4, 2, 3],
        "upsampling_ratios": [8, 5, 4, 2, 3],
        "hop_length": 960,
    },
    "target_bandwidths": [0.5, 1, 1.5, 2],
}

TEXT_EMBEDDING_KEY = "tied.embedding.text_embedding.weight"
AUDIO_TABLE_KEY = "tied.embedding.modality_embeddings.0.embedding.weight"
AUDIO_HEAD_COPY_KEY = "tied.head.modality_heads.0.weight"
TEXT_HEAD_COPY_KEY = "tied.head.text_head.weight"
CODEC_PREFIX = "tied.embedding.modality_embeddings.0.model."
LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
# optional released copies of a tied weight -> the released key they must equal
HEAD_COPIES = {AUDIO_HEAD_COPY_KEY: AUDIO_TABLE_KEY, TEXT_HEAD_COPY_KEY: TEXT_EMBEDDING_KEY}


def released_key_map(num_layers: int) -> dict[str, str]:
    """released key -> our parameter name, for every weight of the model (codec and copies excluded)."""
    mapping = {
        TEXT_EMBEDDING_KEY: "body.embed_tokens.weight",
        "body.norm.weight": "body.norm.weight",
        AUDIO_TABLE_KEY: "audio_table.weight",
    }
    for i in range(num_layers):
        for suffix in LAYER_SUFFIXES:
            mapping[f"body.layers.{i}.{suffix}"] = f"body.layers.{i}.{suffix}"
    return mapping


# ----------------------------------------------------------------------------- config
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(
            f"{path} not found: a Higgs Audio v3 checkpoint folder has config.json and model.safetensors."
        ) from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}).") from e


def v3_config_from_dict(raw: dict, where: str = "config.json") -> V3ModelConfig:
    """The released config dict -> V3ModelConfig (Qwen3Config with rope_theta patched)."""
    from transformers import Qwen3Config

    if raw.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(
            f"{where}: model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}: not a Higgs Audio v3 checkpoint."
        )
    enc = dict(raw.get("audio_encoder_config") or {})
    if enc.get("encoder_type", "discrete") != "discrete":
        raise ModelLoadError(
            f"{where}: audio_encoder_config.encoder_type is {enc.get('encoder_type')!r}; only the discrete TTS "
            "path is supported."
        )
    if not enc.get("tie_word_embeddings", True):
        raise ModelLoadError(
            f"{where}: audio_encoder_config.tie_word_embeddings is false (an untied audio head); only the tied "
            "layout is supported."
        )
    text = dict(raw.get("text_config") or {})
    if text.get("model_type", "qwen3") != "qwen3":
        raise ModelLoadError(f"{where}: text_config.model_type is {text.get('model_type')!r}, expected 'qwen3'.")
    rope_params = text.get("rope_parameters") or {}
    if text.get("rope_theta") is None and rope_params.get("rope_theta") is None:
        logger.info(
            "%s: text_config.rope_theta is null; using %g (the Qwen3 value the v3 engines set).",
            where,
            QWEN3_ROPE_THETA,
        )
        text["rope_theta"] = QWEN3_ROPE_THETA
        if rope_params:
            text["rope_parameters"] = {**rope_params, "rope_theta": QWEN3_ROPE_THETA}
    text.pop("model_type", None)
    text_config = Qwen3Config(**text)
    hidden = int(enc.get("out_dim", text_config.hidden_size))
    if hidden != text_config.hidden_size:
        raise ModelLoadError(
            f"{where}: audio_encoder_config.out_dim {hidden} != text_config.hidden_size {text_config.hidden_size}."
        )
    return V3ModelConfig(
        text_config=text_config,
        num_codebooks=int(enc.get("num_codebooks", 8)),
        codebook_vocab=int(enc.get("vocab_size", 1026)),
        raw=raw,
    )


def read_v3_config(folder: str | Path) -> V3ModelConfig:
    path = Path(folder) / "config.json"
    return v3_config_from_dict(_read_json(path), str(path))


# ----------------------------------------------------------------------------- tensors
def read_released_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (single `model.safetensors` or a sharded index)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.exists():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / WEIGHTS_FILE).exists():
        shards = [WEIGHTS_FILE]
    else:
        raise ModelLoadError(f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}.")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(folder / shard)))
    return tensors


@dataclass
class ReleasedParts:
    """A released state dict split by the key map."""

    model_state: dict[str, torch.Tensor]  # our parameter names
    codec_state: dict[str, torch.Tensor]  # codec names (prefix stripped)
    head_copies: tuple[str, ...]  # the released copy keys that were present (all equal to their source)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)  # kept as they are (an untied text head)


def split_released(
    tensors: dict[str, torch.Tensor], num_layers: int, where: str = "checkpoint", *, text_tied: bool = True
) -> ReleasedParts:
    """Strict split: every missing required key and every unknown key is named in one error.

    `text_tied` = text_config.tie_word_embeddings: when false, a `tied.head.text_head.weight` that
    differs from the text embedding is the untied text head (passed through, not an error).
    """
    mapping = released_key_map(num_layers)
    missing = sorted(k for k in mapping if k not in tensors)
    unexpected = sorted(
        k for k in tensors if k not in mapping and k not in HEAD_COPIES and not k.startswith(CODEC_PREFIX)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if problems:
        raise ModelLoadError(
            f"{where} does not match the Higgs Audio v3 layout ({num_layers} layers): " + "; ".join(problems) + "."
        )
    copies, passthrough = [], {}
    for copy_key, source_key in HEAD_COPIES.items():
        if copy_key in tensors:
            if (
                copy_key == TEXT_HEAD_COPY_KEY
                and not text_tied
                and not torch.equal(tensors[copy_key], tensors[source_key])
            ):
                passthrough[copy_key] = tensors[copy_key]
                continue
            if tensors[copy_key].shape != tensors[source_key].shape or not torch.equal(
                tensors[copy_key], tensors[source_key]
            ):
                raise ModelLoadError(
                    f"{where}: {copy_key} differs from {source_key}, but the config ties them (one tensor). "
                    "Fix the checkpoint or its config (tie_word_embeddings)."
                )
            copies.append(copy_key)
    return ReleasedParts(
        model_state={ours: tensors[released] for released, ours in mapping.items()},
        codec_state={k[len(CODEC_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)},
        head_copies=tuple(copies),
        passthrough=passthrough,
    )


def released_state(
    model: HiggsV3Model,
    codec_state: dict[str, torch.Tensor] | None,
    head_copies=(),
    passthrough: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our model (+ codec) -> a released state dict. Tied copies are written as separate clones
    (safetensors stores no shared tensors), equal to their source."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ModelLoadError(
            "Merge the LoRA adapter first (peft merge_and_unload): the released layout has no adapter keys."
        )
    ours = model.state_dict()
    mapping = released_key_map(model.config.text_config.num_hidden_layers)
    out = {released: ours[name].detach().contiguous() for released, name in mapping.items()}
    for copy_key in head_copies:
        out[copy_key] = out[HEAD_COPIES[copy_key]].clone()
    for key, tensor in (passthrough or {}).items():
        out[key] = tensor.detach().contiguous()
    for name, tensor in (codec_state or {}).items():
        out[CODEC_PREFIX + name] = tensor.detach().contiguous()
    return out


# ----------------------------------------------------------------------------- load / save
@dataclass
class V3Checkpoint:
    model: HiggsV3Model
    config: V3ModelConfig
    codec_state: dict[str, torch.Tensor]
    head_copies: tuple[str, ...]
    folder: Path
    passthrough: dict[str, torch.Tensor]  # pass to save_v3_checkpoint to write them back


def read_released(folder: str | Path) -> tuple[V3ModelConfig, ReleasedParts]:
    """A released-layout folder's config.json and its weights split strictly (`split_released`)."""
    config = read_v3_config(folder)
    parts = split_released(
        read_released_tensors(folder),
        config.text_config.num_hidden_layers,
        str(folder),
        text_tied=bool(config.text_config.tie_word_embeddings),
    )
    return config, parts


def load_v3_checkpoint(
    folder: str | Path,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> V3Checkpoint:
    """Build the model from config.json and load every weight strictly through the key map."""
    folder = Path(folder)
    config, parts = read_released(folder)
    model = build_v3_model(
        config, dtype=dtype, attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing
    )
    expected = model.state_dict()
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in parts.model_state.items()
        if v.shape != expected[k].shape
    ]
    if bad_shapes:
        raise ModelLoadError(f"{folder}: weight shapes do not match config.json: " + "; ".join(bad_shapes))
    result = model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in parts.model_state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # strict=True raised otherwise
    return V3Checkpoint(
        model=model,
        config=config,
        codec_state=parts.codec_state,
        head_copies=parts.head_copies,
        folder=folder,
        passthrough=parts.passthrough,
    )


def save_v3_checkpoint(
    model: HiggsV3Model,
    out_dir: str | Path,
    *,
    codec_state: dict[str, torch.Tensor] | None,
    head_copies=(),
    passthrough: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    codec_config: dict | None = None,
) -> Path:
    """Write config.json (as read) + model.safetensors in the released layout (+ tokenizer, codec config)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        released_state(model, codec_state, head_copies, passthrough), str(out / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(model.config.raw, indent=2) + "\n")
    if codec_config is not None:
        (out / CODEC_CONFIG_FILE).write_text(json.dumps(codec_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- tokenizer and codec
def load_v3_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def codec_config(folder: str | Path):
    """The bundled codec's HiggsAudioV2TokenizerConfig: codec_config.json if present, else the standard v2 one."""
    from transformers import HiggsAudioV2TokenizerConfig

    path = Path(folder) / CODEC_CONFIG_FILE
    if path.exists():
        return HiggsAudioV2TokenizerConfig(**_read_json(path))
    config = HiggsAudioV2TokenizerConfig(**STANDARD_CODEC_CONFIG)
    if config.num_quantizers != 8 or config.hop_length != 960:
        raise ModelLoadError(
            f"The standard Higgs codec config gives {config.num_quantizers} codebooks and hop {config.hop_length} "
            "with this transformers version (expected 8 and 960); put the codec's config in "
            f"{path} ."
        )
    return config


def load_v3_codec(folder: str | Path, codec_state: dict[str, torch.Tensor] | None = None):
    """The bundled codec as a `HiggsAudioV2TokenizerModel`, loaded strictly (eval, fp32)."""
    from transformers import HiggsAudioV2TokenizerModel

    folder = Path(folder)
    if codec_state is None:
        codec_state = {
            k[len(CODEC_PREFIX) :]: v for k, v in read_released_tensors(folder).items() if k.startswith(CODEC_PREFIX)
        }
    if not codec_state:
        raise ModelLoadError(f"{folder} bundles no codec (no {CODEC_PREFIX}* keys).")
    codec = HiggsAudioV2TokenizerModel(codec_config(folder)).eval()
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(codec_state))
    unexpected = sorted(set(codec_state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: the bundled codec does not match HiggsAudioV2TokenizerModel: "
            f"missing {', '.join(CODEC_PREFIX + k for k in missing) or 'none'}; "
            f"unexpected {', '.join(CODEC_PREFIX + k for k in unexpected) or 'none'}."
        )
    codec.load_state_dict(codec_state, strict=True)
    return codec
