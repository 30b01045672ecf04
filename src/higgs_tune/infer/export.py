"""`higgs-tune export`: base model + adapter -> one merged folder that plain `transformers` loads.

    export_merged("models/higgs", "runs/x/final", "models/higgs-mine")

The LoRA deltas are merged into the base weights with PEFT's `merge_and_unload` (fully
trained modules, `modules_to_save`, replace their base copies; audio self-attention blocks,
when the run added them, are merged and saved with the rest). A full fine-tune's weights are
loaded onto the base and saved the same way. The folder written:

    config.json, generation_config.json, model.safetensors   HiggsAudioV2ForConditionalGeneration
      (or model-0000N-of-0000M.safetensors + model.safetensors.index.json above --max-shard-size)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json                                     the audio tokenizer's Hub id (see below)
    audio_tokenizer/                                          copied from the base (codec unchanged)
    higgs_tune_export.json                                    base, adapter, dtype, text head, audio attention

so `HiggsAudioV2ForConditionalGeneration.from_pretrained(OUT)` and
`HiggsAudioV2Processor.from_pretrained(OUT)` work without higgs-tune, and give the outputs of
base + adapter (tests/test_infer_export.py compares greedy codes). `generation_config.json`
keeps the base's repetition-aware sampling settings (`ras_win_len`, ...).

Two things plain `transformers` cannot know, recorded in `higgs_tune_export.json`:
- `use_text_head`: pass `use_text_head=True` to `from_pretrained` to keep `text_lm_head`
  (only needed to train further with a text loss; generation does not use it);
- `audio_self_attention`: the added blocks are higgs-tune modules. transformers ignores their
  weights (a different model!); load such an export with higgs-tune
  (`model.audio_self_attention: true`, or `higgs-tune generate --model OUT`).

Where the audio tokenizer is: transformers (5.24, 5.25) loads `audio_tokenizer_name_or_path`
from processor_config.json as written -- a Hub id, or a path taken from the working directory,
never from the export folder. So the export records the codec's Hub id when it has one (given
as one, a Hub-cache snapshot, or recorded by the base, as the released model does): the folder
then loads after a move or an upload, the codec coming from the Hub or its cache. A codec that
is only a local folder is recorded by the absolute path of the copy in the export (a note says
what to change after a move). higgs-tune itself always uses OUT/audio_tokenizer/.

The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from peft import PeftModel

from higgs_tune.errors import ModelLoadError, OutputDirError
from higgs_tune.infer.card import README, build_model_card, data_summary, eval_summary_near
from higgs_tune.infer.loading import adapter_base_from_checkpoint, adapter_needs_text_head, load_inference_stack
from higgs_tune.model.audio_attention import has_audio_self_attention
from higgs_tune.model.hub import is_hub_id, snapshot_repo_id
from higgs_tune.model.load import (
    TEXT_HEAD_KEY,
    checkpoint_keys,
    recorded_audio_tokenizer,
    resolve_audio_tokenizer,
    resolve_checkpoint,
)
from higgs_tune.runfs import staged_dir

EXPORT_MARKER = "higgs_tune_export.json"
AUDIO_TOKENIZER_DIR = "audio_tokenizer"


@dataclass
class ExportResult:
    out_dir: Path
    merged_lora: bool  # False: full fine-tune weights (nothing to merge)
    audio_self_attention: bool
    use_text_head: bool
    num_parameters: int
    notes: list[str] = field(default_factory=list)


def codec_hub_id(base_folder: Path, audio_tokenizer: str | Path | None) -> str | None:
    """The Hub id of the audio tokenizer an export uses, when it has one: the explicit
    `audio_tokenizer` (an id, or a Hub-cache snapshot of one), else what the base's
    processor_config.json records (an id, or a snapshot path) -- the base's own
    `audio_tokenizer/` copy, which loading prefers, is that same codec (the codec is never
    trained). None: a local folder with no Hub id."""
    name = audio_tokenizer if audio_tokenizer is not None else recorded_audio_tokenizer(base_folder)
    if name is None:
        return None
    return str(name) if is_hub_id(name) else snapshot_repo_id(name)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is a file. Choose a folder path for the export.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"{out} is not empty. Choose an empty or new folder, or pass --overwrite to replace it."
            )
        if not (out / EXPORT_MARKER).is_file():
            raise OutputDirError(
                f"{out} is not empty and was not written by `higgs-tune export` (no {EXPORT_MARKER}); "
                "--overwrite only replaces earlier exports. Choose another folder."
            )


def _export_card(base: str, adapter: Path, use_text_head: bool) -> str:
    """The model card of an export: the run's config, step and metrics from the adapter checkpoint."""
    config, step, metrics, eval_loss = {}, None, {}, None
    if (adapter / "config.yaml").is_file():
        config = yaml.safe_load((adapter / "config.yaml").read_text(encoding="utf-8")) or {}
    if (adapter / "manifest.json").is_file():
        manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
        step, metrics, eval_loss = manifest.get("step"), manifest.get("metrics") or {}, manifest.get("eval_loss")
    return build_model_card(
        base=base,
        config=config,
        step=step,
        metrics=metrics,
        eval_loss=eval_loss,
        eval_summary=eval_summary_near(adapter),
        data=data_summary((config.get("data") or {}).get("train_cache")),
        use_text_head=use_text_head,
        folder_kind="export",
    )


def export_merged(
    model: str | Path | None,
    adapter: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    audio_tokenizer: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> ExportResult:
    """Merge `adapter` (a run's checkpoint-N/ or final/, or a PEFT folder) into `model` and save to `out_dir`.

    `model` None: the base recorded in the checkpoint's config.yaml. `dtype`: the saved weights'
    dtype (merging runs in it; float32 is exact, bfloat16 halves the size). `max_shard_size`:
    weight files of at most this size with a model.safetensors.index.json (the real v2 in
    bfloat16 is ~11.6 GB: three shards), as the Hub's own checkpoints are laid out.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    adapter = Path(adapter)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelLoadError(f"export dtype {dtype!r} is not one of float32, bfloat16, float16.")

    # Keep the text head when the base has one or the adapter trained it: the export is then a
    # complete checkpoint to fine-tune further (from_pretrained drops it unless asked).
    stack_base = model
    if stack_base is None:
        stack_base = adapter_base_from_checkpoint(adapter) if adapter.is_dir() else None
    text_head = None
    if stack_base is not None:
        base_folder = resolve_checkpoint(stack_base)
        text_head = TEXT_HEAD_KEY in checkpoint_keys(base_folder) or (
            adapter.is_dir() and adapter_needs_text_head(adapter)
        )
    stack = load_inference_stack(
        stack_base, adapter, device="cpu", dtype=dtype, audio_tokenizer=audio_tokenizer, use_text_head=text_head
    )
    net = stack.model
    merged_lora = isinstance(net, PeftModel)
    if merged_lora:
        net = net.merge_and_unload()
    if hasattr(stack.family, "write_merged"):  # a family with its own released layout (v3)
        return _export_family_layout(stack, net, out, adapter, dtype, merged_lora)
    # A merged model is a plain checkpoint: nothing in it points back at the adapter.
    net.config.name_or_path = str(out)
    for p in net.parameters():
        p.requires_grad_(False)
    audio_attn = has_audio_self_attention(net)
    use_text_head = net.text_lm_head is not None

    base_folder = resolve_checkpoint(stack.base)
    codec_source = Path(resolve_audio_tokenizer(base_folder, audio_tokenizer))

    with staged_dir(out) as tmp:
        net.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        codec_dir = tmp / AUDIO_TOKENIZER_DIR
        if codec_source.is_dir():
            shutil.copytree(codec_source, codec_dir)
        else:  # a Hub id: save the loaded codec
            stack.processor.audio_tokenizer.save_pretrained(str(codec_dir))
        processor = stack.processor
        # processor_config.json records where the audio tokenizer lives: its Hub id when it has
        # one (the folder then loads anywhere), else the copy in the export by absolute path.
        hub_codec = codec_hub_id(base_folder, audio_tokenizer)
        reference = hub_codec or str((out / AUDIO_TOKENIZER_DIR).resolve())
        processor.audio_tokenizer.name_or_path = reference
        processor.save_pretrained(str(tmp))
        recorded = json.loads((tmp / "processor_config.json").read_text(encoding="utf-8"))["audio_tokenizer"]
        if recorded.get("audio_tokenizer_name_or_path") != reference:
            raise ModelLoadError(
                f"processor_config.json recorded the audio tokenizer as {recorded!r} instead of {reference!r}; "
                "this transformers version saves processors differently. Report it with the transformers version."
            )
        notes = list(stack.notes)
        if audio_attn:
            notes.append(
                "this model has higgs-tune's audio self-attention blocks: plain transformers ignores their weights "
                "(a different model). Load it with higgs-tune (model.audio_self_attention: true, or `higgs-tune "
                "generate --model OUT`)."
            )
        # transformers resolves audio_tokenizer_name_or_path as written, never relative to the
        # folder (5.24 and 5.25): only a Hub id keeps a moved or uploaded export loadable.
        if hub_codec is None:
            notes.append(
                "processor_config.json points at the audio tokenizer by absolute path "
                f"({reference}): the audio tokenizer has no Hub id (a local folder), and transformers does not "
                "resolve paths relative to the export. If you move or upload the export, set "
                "audio_tokenizer_name_or_path there to its new place (or a Hub id) for plain transformers; "
                "higgs-tune finds OUT/audio_tokenizer by itself."
            )
        marker = {
            "format": "higgs-tune-export",
            "base_model": stack.base,
            "adapter": str(adapter),
            "merged_lora": merged_lora,
            "dtype": dtype,
            "use_text_head": use_text_head,
            "audio_self_attention": audio_attn,
            "audio_tokenizer_reference": reference,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "notes": notes,
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        (tmp / README).write_text(_export_card(stack.base, adapter, use_text_head), encoding="utf-8")
    return ExportResult(
        out_dir=out,
        merged_lora=merged_lora,
        audio_self_attention=audio_attn,
        use_text_head=use_text_head,
        num_parameters=sum(p.numel() for p in net.parameters()),
        notes=notes,
    )


def _export_family_layout(stack, net, out: Path, adapter: Path, dtype: str, merged_lora: bool) -> ExportResult:
    """The merged model written by its family in the released layout (v3), under a temporary name."""
    for p in net.parameters():
        p.requires_grad_(False)
    with staged_dir(out) as tmp:
        layout = stack.family.write_merged(net, Path(stack.base), tmp, stack.processor)
        marker = {
            "format": "higgs-tune-export",
            "family": stack.family.name,
            "base_model": stack.base,
            "adapter": str(adapter),
            "merged_lora": merged_lora,
            "dtype": dtype,
            **layout,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "notes": list(stack.notes),
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return ExportResult(
        out_dir=out,
        merged_lora=merged_lora,
        audio_self_attention=False,
        use_text_head=False,
        num_parameters=sum(p.numel() for p in net.parameters()),
        notes=list(stack.notes),
    )
