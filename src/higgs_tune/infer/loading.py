"""Base model + adapter (LoRA or full fine-tune weights) loaded for inference.

    stack = load_inference_stack("models/higgs", adapter="runs/x/final")   # model, processor, tokens
    stack = load_inference_stack(None, adapter="runs/x/final")              # base from the checkpoint's config.yaml

`generate`, `evaluate` and `export` load through here. The model family (v2 / v3, from the
base's config.json) loads the model and the trained weights (`family.load_for_inference`) and
refuses weights of another base model or family with a message that names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from higgs_tune.errors import ModelLoadError
from higgs_tune.families.base import ModelFamily, has_usual_weights
from higgs_tune.families.select import family_for
from higgs_tune.families.v2.family import V2
from higgs_tune.families.v2.loading import adapter_needs_text_head, check_adapter_fits  # noqa: F401 - imported from here
from higgs_tune.model.load import resolve_checkpoint
from higgs_tune.runfs import DCP_DIR, MANIFEST_FILE, verify_listed_files


@dataclass
class InferenceStack:
    model: object  # the family's model (v2 HiggsAudioV2ForConditionalGeneration, v3 HiggsV3Model) or a PeftModel
    processor: object  # text tokenizer + codec (v2: HiggsAudioV2Processor)
    tokens: object  # the family's special tokens
    base: str  # the base model folder / id
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)
    family: ModelFamily = V2

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


def verify_adapter_manifest(adapter_dir: Path) -> None:
    """A higgs-tune checkpoint (it has manifest.json): every listed file present with its size and
    sha256, every weight file listed. ModelLoadError naming the file. A plain PEFT folder (no
    manifest) has nothing to verify against."""
    path = adapter_dir / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"{path} cannot be read ({e}): the checkpoint is damaged. Use another checkpoint."
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    problems = verify_listed_files(adapter_dir, files)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ModelLoadError(
            f"{problems[0]}{more} Use another checkpoint of the run (checkpoint-N/), or the run's own copy of this one."
        )


def check_finite_weights(net, source: Path) -> None:
    """Refuse a model whose weights hold NaN/Inf (a diverged run's checkpoint): it would export
    or speak noise. Names the first parameters at fault."""
    bad = [name for name, p in net.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ModelLoadError(
            f"the weights loaded from {source} hold NaN/Inf values ({shown}): the run diverged before this save. "
            "Use an earlier checkpoint of the run (before the loss became non-finite)."
        )


def load_inference_stack(
    model: str | Path | None,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    audio_tokenizer: str | Path | None = None,
    use_text_head: bool | None = None,
    family: str | None = None,
) -> InferenceStack:
    """Base model (+ adapter folder written by training: LoRA or full weights) ready to generate.

    `model` may be None when `adapter` is a higgs-tune checkpoint folder: its config.yaml
    names the base model. `dtype` "auto" = bfloat16 on CUDA, float32 otherwise.
    `use_text_head` None: only when the adapter trained it (generation never uses it; v2 only).
    `family` "v2" | "v3" | None (detected from the base's config.json).
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
        if not has_usual_weights(adapter_dir):
            if (adapter_dir / DCP_DIR).is_dir():
                raise ModelLoadError(
                    f"{adapter_dir} is a checkpoint of an FSDP run: it holds the weights only as shards ({DCP_DIR}/), "
                    "to resume from. Generate, evaluate or export the run's final/ or best/ folder (both also hold "
                    "the weights in the usual format)."
                )
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
    family = family_for(folder, family)
    if adapter_dir is not None:
        verify_adapter_manifest(adapter_dir)  # before anything reads the weights
    net, notes = family.load_for_inference(
        model, folder, adapter_dir, dtype=dtype, audio_tokenizer=audio_tokenizer, use_text_head=use_text_head
    )
    check_finite_weights(net, adapter_dir or folder)
    net = net.to(device).eval()
    processor = family.load_processor(folder, audio_tokenizer)
    processor.audio_tokenizer.to(device)
    tokens = family.special_tokens(processor, net)
    return InferenceStack(
        net,
        processor,
        tokens,
        base=model,
        adapter=str(adapter_dir) if adapter_dir else None,
        notes=notes,
        family=family,
    )
