"""Model cards: the README.md of every checkpoint (final/, the best, checkpoint-N/) and of every
export, instead of PEFT's blank template.

It says what a person needs to use or share the weights: base model and family, mode (LoRA
r/alpha/targets or full), the data (hours, speakers, languages), steps, the last train and eval
losses, evaluation WER/CER/speaker similarity when they were measured, the command to generate
with it, how to load it with plain PEFT/transformers (a trained text head needs
`use_text_head=True`), and the base model's licence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from higgs_tune.data.cache import read_index

FAMILY = "Higgs Audio v2"
README = "README.md"


def data_summary(cache_dir: str | Path | None) -> dict | None:
    """Hours, clips, speakers and languages of a code cache (None when it cannot be read)."""
    if not cache_dir:
        return None
    try:
        index = read_index(Path(cache_dir))
    except Exception:  # noqa: BLE001 - a card never fails a save; the data line then says "unknown"
        return None
    if not index:
        return None
    entries = index.get("entries", [])
    return {
        "clips": len(entries),
        "hours": sum(float(e.get("duration_s", 0)) for e in entries) / 3600,
        "speakers": len({e.get("speaker") for e in entries}),
        "languages": sorted({str(e.get("language") or "und") for e in entries}),
    }


def base_licence(base: str) -> str:
    """The `license:` of the base model's own card when it is a local folder with one."""
    readme = Path(base) / README
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            return m.group(1)
    return "other"


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def build_model_card(
    *,
    base: str,
    config: Mapping[str, Any],
    step: int | None,
    metrics: Mapping[str, Any] | None = None,
    eval_loss: float | None = None,
    eval_summary: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    use_text_head: bool = False,
    folder_kind: str = "adapter",  # "adapter" (a run's checkpoint) or "export" (merged model)
) -> str:
    ft = dict(config.get("finetune", {}))
    mode = ft.get("mode", "lora")
    licence = base_licence(base)
    if mode == "lora":
        how = (
            f"LoRA r={ft.get('lora_r')}, alpha={ft.get('lora_alpha')}, pathways {', '.join(ft.get('pathways') or [])}"
            + (f"; trained in full: {', '.join(ft['train_modules'])}" if ft.get("train_modules") else "")
        )
    else:
        how = "full fine-tune" + (f" (frozen: {', '.join(ft['freeze'])})" if ft.get("freeze") else "")
    if folder_kind == "export":
        how += "; merged into the base weights"
    metrics = dict(metrics or {})
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if folder_kind == 'adapter' and mode == 'lora' else 'transformers'}",
        f"license: {licence}",
        "pipeline_tag: text-to-speech",
        "tags: [higgs-tune, higgs-audio-v2, text-to-speech]",
        "---",
        "",
        f"# Fine-tuned {FAMILY} ({'adapter' if folder_kind == 'adapter' else 'merged export'})",
        "",
        f"- Base model: `{base}` ({FAMILY} family)",
        f"- Mode: {how}",
    ]
    if data:
        lines.append(
            f"- Data: {data['hours']:.2f} h in {data['clips']} clips, {data['speakers']} speaker(s), "
            f"languages {', '.join(data['languages'])}"
        )
    else:
        lines.append("- Data: unknown (the training cache could not be read)")
    lines += [
        f"- Steps: {_fmt(step)}",
        f"- Last train loss: {_fmt(metrics.get('loss'))} (text {_fmt(metrics.get('text_loss'))}, "
        f"audio {_fmt(metrics.get('audio_loss'))})",
        f"- Eval loss: {_fmt(eval_loss)}",
    ]
    if eval_summary:
        lines.append(
            f"- Evaluation ({eval_summary.get('num_clips', '?')} held-out clips): WER {_fmt(eval_summary.get('wer'))}, "
            f"CER {_fmt(eval_summary.get('cer'))}, speaker similarity {_fmt(eval_summary.get('speaker_similarity'))}"
        )
    else:
        lines.append("- Evaluation: not run (`higgs-tune evaluate` measures WER/CER/speaker similarity)")
    lines += [f"- Licence: {licence} (the base model's; check its card)", "", "## Generate", "", "```bash"]
    if folder_kind == "adapter":
        lines.append('higgs-tune generate "Hello there." --adapter THIS_FOLDER --ref-audio ref.wav --ref-text "..."')
    else:
        lines.append('higgs-tune generate "Hello there." --model THIS_FOLDER --ref-audio ref.wav --ref-text "..."')
    lines += ["```", "", "## Load without higgs-tune", ""]
    if folder_kind == "adapter" and mode == "lora":
        lines += [
            "```python",
            "from transformers import HiggsAudioV2ForConditionalGeneration",
            "from peft import PeftModel",
            f"base = HiggsAudioV2ForConditionalGeneration.from_pretrained({base!r}"
            + (", use_text_head=True)" if use_text_head else ")"),
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
            "```",
        ]
        if use_text_head:
            lines.append(
                "`use_text_head=True` is needed: this adapter trained the text head, and without it plain loading "
                "drops the trained text-head weights."
            )
    else:
        lines += [
            "```python",
            "from transformers import AutoProcessor, HiggsAudioV2ForConditionalGeneration",
            'model = HiggsAudioV2ForConditionalGeneration.from_pretrained("THIS_FOLDER"'
            + (", use_text_head=True)" if use_text_head else ")"),
            'processor = AutoProcessor.from_pretrained("THIS_FOLDER")',
            "```",
        ]
    lines += ["", "Made with higgs-tune; the run's resolved config is config.yaml beside the weights."]
    return "\n".join(lines) + "\n"


def eval_summary_near(folder: Path) -> dict | None:
    """The summary of RUN_DIR/eval/results.json for a run's checkpoint folder, when evaluated."""
    results = Path(folder).parent / "eval" / "results.json"
    if results.is_file():
        try:
            return json.loads(results.read_text(encoding="utf-8")).get("summary")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None
