"""Load a Higgs Audio v2 stack (model, text tokenizer, audio tokenizer, processor) with checks.

Every loader resolves `name_or_path` to a local folder first (a Hub id is downloaded with
`huggingface_hub.snapshot_download`), then reads its config and weight index itself, so a wrong
folder fails with a `ModelLoadError` that names what was found and what to do — before any
weights are read:

- not a Higgs Audio v2 checkpoint (the model_type / architectures found are named);
- the original `boson_multimodal` layout (`model_type: higgs_audio`, keys `audio_codebook_embeddings.*`,
  `audio_decoder_proj.audio_lm_head.*`): we do not convert on the fly (6 B parameters per run);
  the message gives the one-time `higgs-tune convert SRC DST` command;
- a missing text tokenizer, feature-extractor config or audio tokenizer (each place looked at is named);
- model `num_codebooks` / `codebook_size` / stream BOS-EOS ids that do not match the audio tokenizer
  (`num_codebooks == num_quantizers`, `codebook_size == codec codebook_size + 2`);
- weights missing from the checkpoint (other than `text_lm_head`, which only warns: see below).

`use_text_head` is a constructor argument transformers does not save: it is passed at load, and
when it is on but the checkpoint has no `text_lm_head.weight` the head is random — a loud warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    DacFeatureExtractor,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
)
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from higgs_tune.config import ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.audio_attention import (
    AUDIO_ATTN_KEY_PARTS,
    enable_audio_self_attention,
)
from higgs_tune.model.hub import check_hub_source, hub_cache_dir, is_hub_id
from higgs_tune.resources import chat_template

logger = logging.getLogger(__name__)

MODEL_TYPE = "higgs_audio_v2"
ORIGINAL_MODEL_TYPE = "higgs_audio"
ARCHITECTURE = "HiggsAudioV2ForConditionalGeneration"
TEXT_HEAD_KEY = "text_lm_head.weight"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# what snapshot_download fetches for a Hub id: configs, weights, tokenizer and template files
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "audio_tokenizer/*"]


# ----------------------------------------------------------------------------- folders and files
def _looks_like_path(name: str) -> bool:
    return not is_hub_id(name)


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder for `name_or_path`: the folder itself, or a Hub snapshot of the id."""
    name = str(name_or_path)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"checkpoint folder {path} does not exist. Set model.name_or_path to a Higgs Audio v2 folder or Hub id."
            )
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is a file, not a checkpoint folder. Set model.name_or_path to the folder that holds "
                "config.json."
            )
        return path
    local = check_hub_source(name, what="model", option="--model (or model.name_or_path)")  # offline: fail at once
    try:
        kw = {"local_files_only": True, "cache_dir": str(hub_cache_dir())} if local else {}
        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_PATTERNS, **kw))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If it is a local folder, it does not exist here; if it is a Hub id, check it and your network/HF_TOKEN, "
            "or download it and set model.name_or_path to the local folder."
        ) from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}). Re-download or re-save the checkpoint.") from e


def read_model_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json: it is not a model checkpoint. Point model.name_or_path at a Higgs Audio "
            "v2 checkpoint folder."
        )
    return _read_json(path)


def checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the files themselves (headers only)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return {key: folder / name for key, name in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} has no model.safetensors (or model.safetensors.index.json): no weights to load. "
            "Save the model with save_pretrained (safetensors) into this folder."
        )
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update({k: file for k in f.keys()})
    return keys


def read_tensors(keys: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """Load the named tensors only, grouped per shard."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(keys[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in file_names})
    return out


def is_original_layout(config: dict, keys) -> bool:
    """True for a boson_multimodal `higgs_audio` checkpoint (config or weight names say so)."""
    if config.get("model_type") == ORIGINAL_MODEL_TYPE:
        return True
    keys = set(keys)
    return "audio_codebook_embeddings.weight" in keys or (
        "audio_decoder_proj.audio_lm_head.weight" in keys and "audio_lm_head.weight" not in keys
    )


def _original_layout_error(folder: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{folder} is an original boson_multimodal Higgs Audio checkpoint (model_type 'higgs_audio'), "
        "not the transformers layout. Convert it once with:\n"
        f"    higgs-tune convert {folder} {folder}-hf --audio-tokenizer <HF audio tokenizer folder or id>\n"
        "then set model.name_or_path to the converted folder."
    )


def check_higgs_checkpoint(folder: Path) -> tuple[dict, dict[str, Path]]:
    """config.json + weight index of a transformers-layout Higgs Audio v2 checkpoint, or a clear error."""
    config = read_model_config(folder)
    if config.get("model_type") == ORIGINAL_MODEL_TYPE:
        raise _original_layout_error(folder)
    if config.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(
            f"{folder} is not a Higgs Audio v2 checkpoint: config.json has model_type {config.get('model_type')!r} "
            f"(architectures {config.get('architectures')}); expected model_type {MODEL_TYPE!r} ({ARCHITECTURE}). "
            "Set model.name_or_path to a Higgs Audio v2 checkpoint, e.g. bosonai/higgs-audio-v2-generation-3B-base."
        )
    keys = checkpoint_keys(folder)
    if is_original_layout(config, keys):
        raise _original_layout_error(folder)
    return config, keys


# ----------------------------------------------------------------------------- tokenizers and processor
def load_text_tokenizer(name_or_path: str | Path):
    """The text tokenizer (AutoTokenizer) of a checkpoint folder or Hub id."""
    folder = resolve_checkpoint(name_or_path)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no text tokenizer (looked for {', '.join(TOKENIZER_FILES)}). "
            "Copy the base model's tokenizer files into it (tokenizer.save_pretrained(folder))."
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"the text tokenizer in {folder} could not be loaded ({e}). Re-save it with tokenizer.save_pretrained."
        ) from e


def recorded_audio_tokenizer(folder: Path) -> str | None:
    """The audio tokenizer id/path that processor_config.json records, if any."""
    path = folder / "processor_config.json"
    if not path.is_file():
        return None
    entry = _read_json(path).get("audio_tokenizer")
    if isinstance(entry, dict):
        return entry.get("audio_tokenizer_name_or_path")
    return entry if isinstance(entry, str) else None


def resolve_audio_tokenizer(folder: Path, audio_tokenizer: str | Path | None = None) -> str:
    """Where the audio tokenizer is: the explicit argument (model.audio_tokenizer) wins, then
    `<folder>/audio_tokenizer/`, then the path/id recorded in processor_config.json."""
    if audio_tokenizer is not None:
        return str(audio_tokenizer)
    local = folder / "audio_tokenizer"
    if (local / "config.json").is_file():
        return str(local)
    recorded = recorded_audio_tokenizer(folder)
    if recorded is not None:
        if _looks_like_path(recorded) and not Path(recorded).expanduser().is_dir():
            raise ModelLoadError(
                f"{folder}/processor_config.json records the audio tokenizer at {recorded}, which does not exist "
                f"(and {local} is absent). Set model.audio_tokenizer to the audio tokenizer folder or Hub id, "
                f"or copy it into {local}."
            )
        return recorded
    raise ModelLoadError(
        f"no audio tokenizer for {folder}: {local} is absent and processor_config.json records none. "
        "Set model.audio_tokenizer to a HiggsAudioV2TokenizerModel folder or Hub id."
    )


def load_audio_tokenizer_config(folder: Path, audio_tokenizer: str | Path | None = None):
    where = resolve_audio_tokenizer(folder, audio_tokenizer)
    source = resolve_checkpoint(where)
    config = read_model_config(source)
    if config.get("model_type") != "higgs_audio_v2_tokenizer":
        raise ModelLoadError(
            f"{source} is not a Higgs Audio v2 audio tokenizer: model_type {config.get('model_type')!r} "
            f"(architectures {config.get('architectures')}); expected 'higgs_audio_v2_tokenizer'. "
            "Point model.audio_tokenizer at a HiggsAudioV2TokenizerModel folder."
        )
    return HiggsAudioV2TokenizerConfig.from_pretrained(str(source)), source


def load_audio_tokenizer(name_or_path: str | Path, audio_tokenizer: str | Path | None = None, device=None):
    """The HiggsAudioV2TokenizerModel (codec) belonging to a checkpoint, in eval mode."""
    folder = resolve_checkpoint(name_or_path)
    _, source = load_audio_tokenizer_config(folder, audio_tokenizer)
    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(source)).eval()
    return codec.to(device) if device is not None else codec


def check_codec_matches(model_config: dict, codec_config, model_where: Path, codec_where) -> None:
    """The model's audio vocabulary must be the codec's: K codebooks of codebook_size + BOS + EOS."""
    k, size = codec_config.num_quantizers, codec_config.codebook_size
    problems = []
    if model_config.get("num_codebooks") != k:
        problems.append(
            f"num_codebooks {model_config.get('num_codebooks')} != the audio tokenizer's num_quantizers {k}"
        )
    if model_config.get("codebook_size") != size + 2:
        problems.append(
            f"codebook_size {model_config.get('codebook_size')} != audio tokenizer codebook_size {size} + 2 "
            "(stream BOS and EOS rows)"
        )
    if (
        model_config.get("audio_stream_bos_id", size) != size
        or model_config.get("audio_stream_eos_id", size + 1) != size + 1
    ):
        problems.append(
            "audio_stream_bos_id/eos_id "
            f"{model_config.get('audio_stream_bos_id')}/{model_config.get('audio_stream_eos_id')} != "
            f"{size}/{size + 1}"
        )
    if problems:
        raise ModelLoadError(
            f"model {model_where} does not match audio tokenizer {codec_where}: " + "; ".join(problems) + ". "
            "Use the audio tokenizer the model was trained with (model.audio_tokenizer), or fix config.json."
        )


def _feature_extractor(folder: Path, sample_rate: int):
    """DacFeatureExtractor from processor_config.json / preprocessor_config.json, else the standard
    Higgs one (mono, hop 1, right padding) at the codec's sample rate."""
    fields = None
    if (folder / "processor_config.json").is_file():
        fields = _read_json(folder / "processor_config.json").get("feature_extractor")
    if fields is None and (folder / "preprocessor_config.json").is_file():
        fields = _read_json(folder / "preprocessor_config.json")
    if fields is None:
        fields = {
            "feature_size": 1,
            "hop_length": 1,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
        }
    fields = {k: v for k, v in fields.items() if k not in ("feature_extractor_type", "processor_class")}
    fields.setdefault("sampling_rate", sample_rate)
    if fields["sampling_rate"] != sample_rate:
        raise ModelLoadError(
            f"{folder}: the feature extractor expects {fields['sampling_rate']} Hz but the audio tokenizer runs at "
            f"{sample_rate} Hz. Use the matching audio tokenizer (model.audio_tokenizer)."
        )
    return DacFeatureExtractor(**fields)


def _check_token_ids(model_config: dict, tokenizer, folder: Path) -> None:
    """The special-token ids in config.json must be the tokenizer's ids of the Higgs markup tokens."""
    expected = {
        "audio_token_id": "<|AUDIO_OUT|>",
        "audio_bos_token_id": "<|audio_out_bos|>",
        "audio_delay_token_id": "<|reserved_special_token_6|>",
    }
    wrong = []
    for field, token in expected.items():
        if field in model_config:
            got = tokenizer.convert_tokens_to_ids(token)
            if got != model_config[field]:
                wrong.append(f"{field}={model_config[field]} but the tokenizer maps {token} to {got}")
    if wrong:
        raise ModelLoadError(
            f"tokenizer and model config of {folder} disagree: "
            + "; ".join(wrong)
            + ". Use the tokenizer saved with this model."
        )


def load_processor(name_or_path: str | Path, audio_tokenizer: str | Path | None = None):
    """HiggsAudioV2Processor built from its parts.

    Built here rather than with `HiggsAudioV2Processor.from_pretrained`, which follows the audio
    tokenizer path recorded at save time (an absolute path that breaks when a folder moves).
    """
    folder = resolve_checkpoint(name_or_path)
    tokenizer = load_text_tokenizer(folder)
    codec_config, codec_source = load_audio_tokenizer_config(folder, audio_tokenizer)
    model_config = read_model_config(folder) if (folder / "config.json").is_file() else None
    if model_config is not None:
        check_codec_matches(model_config, codec_config, folder, codec_source)
        _check_token_ids(model_config, tokenizer, folder)
    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(codec_source)).eval()
    template = tokenizer.chat_template
    if template is None:
        logger.info("%s has no chat template; using higgs-tune's bundled Higgs template", folder)
        template = chat_template()
    return HiggsAudioV2Processor(
        feature_extractor=_feature_extractor(folder, codec_config.sample_rate),
        tokenizer=tokenizer,
        audio_tokenizer=codec,
        chat_template=template,
        audio_stream_bos_id=codec_config.codebook_size,
        audio_stream_eos_id=codec_config.codebook_size + 1,
    )


# ----------------------------------------------------------------------------- model
def _check_attention_backend(name: str, dtype: torch.dtype) -> None:
    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if name in available:
        if not available[name]():
            package = "flash-attn" if name == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
            raise ModelLoadError(
                f"model.attn_implementation is {name} but {package} is not usable here (not installed, or no CUDA "
                "GPU). Install it (pip install flash-attn --no-build-isolation) or set model.attn_implementation: "
                "sdpa."
            )
        if dtype == torch.float32:
            raise ModelLoadError(
                f"{name} needs bfloat16 or float16 weights; model.dtype is float32. Set model.dtype: bfloat16 or "
                "use sdpa."
            )


def load_model(cfg: ModelConfig, device=None):
    """HiggsAudioV2ForConditionalGeneration as `cfg` says: dtype, attention backend, text head,
    audio self-attention (loaded from the checkpoint when present, else a no-op start) and
    gradient checkpointing (use_reentrant=False)."""
    folder = resolve_checkpoint(cfg.name_or_path)
    config, keys = check_higgs_checkpoint(folder)
    dtype = DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ModelLoadError(f"model.dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}.")
    _check_attention_backend(cfg.attn_implementation, dtype)
    codec_config, codec_source = load_audio_tokenizer_config(folder, cfg.audio_tokenizer)
    check_codec_matches(config, codec_config, folder, codec_source)

    audio_attn_keys = sorted(k for k in keys if any(part in k for part in AUDIO_ATTN_KEY_PARTS))
    if audio_attn_keys and not cfg.audio_self_attention:
        raise ModelLoadError(
            f"{folder} has audio self-attention weights ({len(audio_attn_keys)} tensors, e.g. {audio_attn_keys[0]}) "
            "but model.audio_self_attention is false: they would be dropped. Set model.audio_self_attention: true."
        )

    try:
        model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
            str(folder),
            use_text_head=cfg.use_text_head,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            output_loading_info=True,
        )
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise ModelLoadError(
            f"the weights in {folder} do not have the shapes its config.json describes (see the MISMATCH rows of the "
            "load report above). config.json was edited or belongs to another checkpoint; restore the matching one."
        ) from e
    missing = set(info["missing_keys"])
    if cfg.use_text_head and TEXT_HEAD_KEY in missing:
        missing.discard(TEXT_HEAD_KEY)
        logger.warning(
            "\n%s\nmodel.use_text_head is true but %s has no %s: the text head is RANDOMLY initialised.\n"
            "The text loss starts at chance level (ln(vocab)) and the head must learn from scratch.\n"
            "Set model.use_text_head: false and loss.text_weight: 0 unless that is what you want.\n%s",
            "!" * 78,
            folder,
            TEXT_HEAD_KEY,
            "!" * 78,
        )
    if missing:
        names = sorted(missing)
        raise ModelLoadError(
            f"{folder} lacks {len(names)} weight(s) of the model "
            f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}): they would be random. The checkpoint is "
            "incomplete or for a different configuration; re-download or re-save it."
        )
    unexpected = sorted(k for k in info["unexpected_keys"] if not any(p in k for p in AUDIO_ATTN_KEY_PARTS))
    if unexpected:
        logger.warning(
            "%s has %d weight(s) the model does not use (ignored): %s",
            folder,
            len(unexpected),
            ", ".join(unexpected[:8]),
        )

    if cfg.audio_self_attention:
        enable_audio_self_attention(model)
        if audio_attn_keys:
            _load_audio_attention(model, keys, audio_attn_keys, folder)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if device is not None:
        model = model.to(device)
    return model


def _load_audio_attention(model, keys: dict[str, Path], audio_attn_keys: list[str], folder: Path) -> None:
    """Load checkpoint audio self-attention weights over the no-op init; every block must be complete."""
    expected = {k for k, _ in model.state_dict().items() if any(p in k for p in AUDIO_ATTN_KEY_PARTS)}
    present = set(audio_attn_keys)
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise ModelLoadError(
            f"{folder} has audio self-attention weights that do not fit this model: missing "
            f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{extra[:6]}{'...' if len(extra) > 6 else ''}. The checkpoint was saved from a model with a different "
            "layer count or block layout."
        )
    tensors = read_tensors(keys, audio_attn_keys)
    model.load_state_dict(tensors, strict=False)  # keys checked against the model's state dict above
    logger.info("loaded audio self-attention weights for %d tensors from %s", len(tensors), folder)
