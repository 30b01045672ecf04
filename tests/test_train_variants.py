"""The recipe under the settings users switch: dtype/mixed precision with gradient checkpointing,
full fine-tuning with accumulation, the audio self-attention pathway, eager attention with
rsLoRA + DoRA, and a run length given in epochs. Each trains a few steps in one process
(one after the other: accelerate's process-wide state must not leak between runs)."""

from __future__ import annotations

import json

import pytest
from recipe_support import preset_dict

from higgs_tune.config import config_from_dict
from higgs_tune.model.lora import verify_trainable
from higgs_tune.train.recipe import train

BASE = [
    "train.max_steps=6",
    "train.log_steps=1",
    "train.warmup_steps=1",
    "checkpoint.save_steps=3",
    "train.sample_steps=null",
    "train.eval_steps=null",
    "checkpoint.keep_best=false",
    "data.eval_cache=null",
]
VARIANTS = {
    "bf16_mixed_precision_grad_checkpointing": [
        "model.dtype=bfloat16",
        "train.mixed_precision=bf16",
        "model.gradient_checkpointing=true",
    ],
    "full_with_accumulation": "full",
    "audio_self_attention_lora": [
        "model.audio_self_attention=true",
        "finetune.pathways=[text_attn,audio_mlp,audio_attn]",
    ],
    "eager_rslora_dora": ["model.attn_implementation=eager", "finetune.use_rslora=true", "finetune.use_dora=true"],
    "epochs": ["train.num_epochs=2", "train.max_steps=null", "checkpoint.save_total_limit=null"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_saves(name, tiny_dir, demo_cache, tmp_path):
    data = preset_dict(tiny_dir, demo_cache, None, tmp_path / "run")
    overrides = list(BASE)
    if VARIANTS[name] == "full":
        data["finetune"] = {"mode": "full"}
        overrides.append("train.gradient_accumulation_steps=2")
    else:
        overrides += VARIANTS[name]
    result = train(config_from_dict(data, overrides))
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if r.get("event") == "metrics"]
    assert metrics[-1]["audio_loss"] < metrics[0]["audio_loss"] - 0.5
    assert result.steps == (8 if name == "epochs" else 6)  # 2 epochs x 4 batches of the demo data
    assert not result.warnings
    verify_trainable(result.model, result.final_dir)  # what final/ holds is what was trained
