"""Base model + adapter (LoRA or full fine-tune weights) loaded for inference.

    stack = load_inference_stack("models/higgs", adapter="runs/x/final")   # model, processor, tokens
    stack = load_inference_stack(None, adapter="runs/x/final")              # base from the checkpoint's config.yaml

`generate`, `evaluate` and `export` load through here; `check_adapter_fits` compares an
adapter's tensors with the base model's shapes before PEFT sees them, so an adapter of
another base model fails with a message that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from higgs_tune.config import ModelConfig
from higgs_tune.data.layout import SpecialTokens
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.audio_attention import AUDIO_ATTN_KEY_PARTS
from higgs_tune.model.load import (
    TEXT_HEAD_KEY,
    check_higgs_checkpoint,
    checkpoint_keys,
    load_model,
    load_processor,
    resolve_checkpoint,
)
from higgs_tune.model.lora import load_trainable


@dataclass
class InferenceStack:
    model: object  # HiggsAudioV2ForConditionalGeneration or PeftModel
    processor: object  # HiggsAudioV2Processor
    tokens: SpecialTokens
    base: str  # the base model folder / id
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)

    @property
    def sample_rate(self) -> int:
        return self.processor.audio_tokenizer.config.sample_rate


def adapter_base_from_checkpoint(adapter: Path) -> str | None:
    """model.name_or_path from a higgs-tune checkpoint's config.yaml beside the adapter, if any."""
    path = adapter / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelLoadError(f"{path} is not valid YAML ({e}). Pass the base model with --model.") from None
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("name_or_path") if isinstance(model, dict) else None


def _same_source(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_fits(base_model, adapter_dir: Path, base_name: str) -> list[str]:
    """Compare the adapter's tensors with the base model's module shapes before loading.

    Raises ModelLoadError naming the first tensors that do not fit (an adapter trained on
    another base model). Returns notes (e.g. the recorded base differs but the shapes fit).
    """
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        adapter_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e}). Re-save the adapter.") from None
    recorded = adapter_cfg.get("base_model_name_or_path")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(
            f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors. Point --adapter at a "
            "complete adapter folder (checkpoint-N/ or final/ of a run)."
        )

    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters())
    # audio self-attention blocks are created from the layer's own shapes when the adapter needs them
    alias = {".audio_attn.": ".self_attn.", ".audio_post_audio_attn_layer_norm": ".audio_input_layernorm"}
    wrong, unknown = [], []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for a, b in alias.items():
                name = name.replace(a, b)
            if ".lora_A." in name or ".lora_B." in name:
                module_name = name.split(".lora_")[0]
                module = modules.get(module_name)
                if module is None or not hasattr(module, "in_features"):
                    unknown.append(key)
                    continue
                want_dim = module.in_features if ".lora_A." in name else module.out_features
                got_dim = shape[1] if ".lora_A." in name else shape[0]
                if got_dim != want_dim:
                    wrong.append(f"{key} {shape} (base {module_name} is {module.out_features}x{module.in_features})")
            elif ".lora_" in name:
                continue  # DoRA magnitudes and other LoRA variants: checked by PEFT itself
            else:
                base_param = params.get(name.replace(".modules_to_save.default.", "."))
                if base_param is None:
                    unknown.append(key)
                elif tuple(base_param.shape) != shape:
                    wrong.append(f"{key} {shape} (base has {tuple(base_param.shape)})")
    if wrong or unknown:
        details = "; ".join(wrong[:4] + [f"{k} (no such module in the base model)" for k in unknown[:4]])
        more = len(wrong) + len(unknown) - min(len(wrong), 4) - min(len(unknown), 4)
        raise ModelLoadError(
            f"the adapter {adapter_dir} does not fit the base model {base_name}: {details}"
            f"{f' (and {more} more)' if more > 0 else ''}. It was trained on "
            f"{recorded!r} (adapter_config.json base_model_name_or_path). Load it onto that base model (--model)."
        )
    notes = []
    if recorded and not _same_source(recorded, base_name):
        notes.append(
            f"the adapter records base model {recorded!r}, you loaded {base_name!r}; the shapes fit, so it is used, "
            "but if these are different models the output will be wrong."
        )
    return notes


def adapter_needs_text_head(adapter: Path) -> bool:
    """True when the trained weights include the text head (LoRA modules_to_save, or full weights)."""
    cfg_path = adapter / "adapter_config.json"
    if cfg_path.is_file():
        to_save = json.loads(cfg_path.read_text(encoding="utf-8")).get("modules_to_save") or []
        return any("text_lm_head" in m for m in to_save)
    return TEXT_HEAD_KEY in checkpoint_keys(adapter)


def load_inference_stack(
    model: str | Path | None,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    audio_tokenizer: str | Path | None = None,
    use_text_head: bool | None = None,
) -> InferenceStack:
    """Base model (+ adapter folder written by training: LoRA or full weights) ready to generate.

    `model` may be None when `adapter` is a higgs-tune checkpoint folder: its config.yaml
    names the base model. `dtype` "auto" = bfloat16 on CUDA, float32 otherwise.
    `use_text_head` None: only when the adapter trained it (generation never uses it).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ModelLoadError(
                f"adapter folder {adapter_dir} does not exist. Pass a run's checkpoint-N/ or final/ folder (or a "
                "PEFT adapter folder)."
            )
        if not (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").is_file():
            raise ModelLoadError(
                f"{adapter_dir} holds neither adapter_config.json (LoRA adapter) nor config.json (full fine-tune "
                "weights). Pass a run's checkpoint-N/ or final/ folder."
            )
    if model is None:
        recorded = adapter_base_from_checkpoint(adapter_dir) if adapter_dir is not None else None
        if recorded is None:
            raise ModelLoadError("no base model: pass --model (the base model folder or Hub id, or a merged export).")
        model = recorded
    model = str(model)
    folder = resolve_checkpoint(model)
    _, keys = check_higgs_checkpoint(folder)
    has_audio_attn = any(any(p in k for p in AUDIO_ATTN_KEY_PARTS) for k in keys)
    if use_text_head is None:
        use_text_head = adapter_dir is not None and adapter_needs_text_head(adapter_dir)
    cfg = ModelConfig(
        name_or_path=model,
        audio_tokenizer=str(audio_tokenizer) if audio_tokenizer is not None else None,
        dtype=dtype,
        use_text_head=use_text_head,
        audio_self_attention=has_audio_attn,
    )
    net = load_model(cfg)
    notes: list[str] = []
    if adapter_dir is not None:
        if (adapter_dir / "adapter_config.json").is_file():
            notes += check_adapter_fits(net, adapter_dir, model)
        try:
            net = load_trainable(net, adapter_dir)
        except RuntimeError as e:  # torch's load_state_dict size mismatch, for shapes the pre-check cannot see
            raise ModelLoadError(
                f"the weights in {adapter_dir} do not fit the base model {model}: {str(e).splitlines()[0]}. Load "
                "them onto the base model they were trained from (--model)."
            ) from e
    net = net.to(device).eval()
    processor = load_processor(folder, audio_tokenizer)
    processor.audio_tokenizer.to(device)
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer, net.config)
    return InferenceStack(
        net, processor, tokens, base=model, adapter=str(adapter_dir) if adapter_dir else None, notes=notes
    )
