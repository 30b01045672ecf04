"""Full fine-tuning precision (issue 17, item 3): at lr 2e-5 bf16 weights with a plain AdamW lose
most updates to rounding; float32 master weights under bf16 autocast keep every one; the config
refuses the lossy combination unless it is asked for, and the optimizer choice is checked."""

from __future__ import annotations

import pytest
import torch
from test_model_support import synthetic_batch

from higgs_tune.config import ConfigError, FinetuneConfig, LossConfig, TrainConfig, config_from_dict
from higgs_tune.train.optim import make_optimizer

LR = 2e-5


def _model(tiny_dir, dtype):
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_tune.model.lora import apply_finetuning

    config = HiggsAudioV2Config.from_pretrained(str(tiny_dir))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)  # float32, std 0.02 init
    return apply_finetuning(model.to(dtype), FinetuneConfig(mode="full", pathways=[])).train()


def _changed_fraction(tiny_dir, dtype, autocast, steps=3, optimizer="adamw"):
    """Median over steps of: weights the step's gradient reaches whose value changed / those weights."""
    from higgs_tune.train.loss import HiggsLossModule

    model = _model(tiny_dir, dtype)
    loss_module = HiggsLossModule(model, LossConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainConfig(learning_rate=LR, optimizer=optimizer))
    batch = synthetic_batch(model.config)
    fractions = []
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_module(**batch).loss
        loss.backward()
        reached = [p.grad != 0 for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed = sum(int(((b != p.detach()) & r).sum()) for b, p, r in zip(before, params, reached, strict=True))
        fractions.append(changed / sum(int(r.sum()) for r in reached))
    return sorted(fractions)[len(fractions) // 2]


def test_bf16_weights_round_updates_away_and_float32_master_weights_keep_them(tiny_dir):
    lossy = _changed_fraction(tiny_dir, torch.bfloat16, autocast=False)
    kept = _changed_fraction(tiny_dir, torch.float32, autocast=True)
    # bf16: only weights below ~0.005 in magnitude move (benchmarks/bf16_precision.py: 29% of those a step reaches);
    # float32 master weights: every weight the gradient reaches
    assert lossy < 0.4, lossy
    assert kept > 0.99, kept


def test_bf16_stochastic_rounding_keeps_small_updates_on_average(tiny_dir):
    pytest.importorskip("torchao")
    sr = _changed_fraction(tiny_dir, torch.bfloat16, autocast=False, steps=1, optimizer="adamw_bf16_sr")
    lossy = _changed_fraction(tiny_dir, torch.bfloat16, autocast=False, steps=1)
    assert sr > lossy, (sr, lossy)


MINIMAL = {
    "data": {"train_cache": "c"},
    "train": {"max_steps": 10},
    "checkpoint": {"output_dir": "o"},
    "finetune": {"mode": "full", "pathways": []},
}


def test_config_refuses_full_fine_tuning_of_bf16_weights_with_a_plain_adamw_unless_asked():
    with pytest.raises(ConfigError) as e:
        config_from_dict(MINIMAL)  # model.dtype defaults to bfloat16
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(
        "finetune.mode full with model.dtype bfloat16 and a plain AdamW: most updates round away"
    )
    assert "model.dtype: float32 with train.mixed_precision: bf16" in e.value.problems[0]
    config_from_dict(MINIMAL, ["model.dtype=float32", "train.mixed_precision=bf16"])  # float32 master weights
    config_from_dict(MINIMAL, ["train.optimizer=adamw_bf16_sr"])  # stochastic rounding
    config_from_dict(MINIMAL, ["train.optimizer=adamw"])  # asked for explicitly
    config_from_dict({**MINIMAL, "finetune": {"mode": "lora"}})  # LoRA: adapters are float32 (peft)
    with pytest.raises(ConfigError) as e:
        config_from_dict(MINIMAL, ["model.dtype=float32", "train.optimizer=adamw_bf16_sr"])
    assert e.value.problems == [
        "train.optimizer: adamw_bf16_sr rounds updates into bf16 weights, but model.dtype is "
        "float32: set model.dtype: bfloat16, or use train.optimizer: adamw."
    ]
    with pytest.raises(ConfigError) as e:
        config_from_dict(MINIMAL, ["train.optimizer=adamw8"])
    assert e.value.problems == ["train.optimizer: 'adamw8' is not one of adamw, adamw_bf16_sr. Did you mean 'adamw'?"]


def test_stochastic_rounding_is_refused_under_ddp():
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    with pytest.raises(ConfigError, match="adamw_bf16_sr under DDP \\(2 processes"):
        make_optimizer(params, TrainConfig(optimizer="adamw_bf16_sr"), replicas=2)
    assert isinstance(make_optimizer(params, TrainConfig()), torch.optim.AdamW)
