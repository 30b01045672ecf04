"""The checkpoint-size estimates of train/outdir.py against the bytes a LoRA save writes, for the cases
the real-size runs exposed: bf16 models (peft keeps adapters in float32) and an audio self-attention
the loader adds (saved beside the adapter even when frozen)."""

from __future__ import annotations

import pytest

from higgs_tune.config import config_from_dict
from higgs_tune.train.outdir import estimate_checkpoint_bytes, rough_checkpoint_bytes


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dtype=bfloat16"],
        ["model.dtype=bfloat16", "model.audio_self_attention=true", "finetune.pathways=[text_attn, audio_attn]"],
        ["model.dtype=float32", "model.audio_self_attention=true", "finetune.train_modules=[audio_lm_head]"],
    ],
    ids=["bf16", "bf16-audio-attn-lora", "fp32-audio-attn-frozen"],
)
def test_estimates_before_and_after_loading_match_the_adapter_written(tiny_dir, tmp_path, overrides):
    from higgs_tune.model.load import load_model
    from higgs_tune.model.lora import apply_finetuning, save_trainable

    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(tiny_dir)},
            "data": {"train_cache": "c"},
            "train": {"max_steps": 1},
            "checkpoint": {"output_dir": str(tmp_path / "run")},
        },
        overrides,
    )
    model = apply_finetuning(load_model(cfg.model), cfg.finetune)
    folder = save_trainable(model, tmp_path / "adapter")
    written = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights_estimate = estimate_checkpoint_bytes(model, "lora") - (8 << 20)  # minus the fixed overhead
    # weights + 8 bytes of AdamW state per trained parameter, +1%; the safetensors headers are the rest
    assert abs(weights_estimate / 1.01 - 8 * trainable - written) < 0.02 * written + 64 * 1024
    assert rough_checkpoint_bytes(cfg) == estimate_checkpoint_bytes(model, "lora")
