"""The memory model (model/memory.py) against real models: parameter counts at the released v2
shapes (meta device), weight/gradient/optimizer bytes of small models after a real step, the
activation terms against the bytes autograd saves, and the presets in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_support import synthetic_batch

from higgs_tune.config import FinetuneConfig, LossConfig, load_config
from higgs_tune.model.memory import (
    GIB,
    HIGGS_V2,
    Architecture,
    MemoryPlan,
    SavedTensorBytes,
    estimate_memory,
    layer_activation_terms,
    lora_parameters,
    memory_report,
    parameter_groups,
    parameter_tensors,
    plan_from_config,
)

REPO = Path(__file__).resolve().parents[1]


def _small_config(tiny_dir, layers: int, **changes):
    """The tiny stack's config at other sizes; q (heads x head_dim = 96) differs from hidden (64)
    so the q-sized terms are told apart from the hidden-sized ones."""
    from transformers import HiggsAudioV2Config

    config = HiggsAudioV2Config.from_pretrained(str(tiny_dir))
    config.num_hidden_layers = layers
    config.head_dim = 24
    config.intermediate_size = 112
    for k, v in changes.items():
        setattr(config, k, v)
    config._attn_implementation = "sdpa"
    return config


def _build(config, dtype, mode, **ft):
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_tune.model.lora import apply_finetuning

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    finally:
        torch.set_default_dtype(previous)
    cfg = (
        FinetuneConfig(mode=mode, lora_dropout=ft.pop("lora_dropout", 0.0), **ft)
        if mode == "lora"
        else FinetuneConfig(mode="full", pathways=[], **ft)
    )
    return apply_finetuning(model, cfg).train()


def test_parameter_counts_equal_the_real_v2_on_the_meta_device():
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_tune.model.lora import parameter_report

    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(HiggsAudioV2Config(codebook_size=1026), use_text_head=True)
    assert Architecture.from_hf_config(model.config) == HIGGS_V2.__class__(**{**HIGGS_V2.__dict__, "name": "model"})
    rows = {r.group: r.total for r in parameter_report(model).rows if r.group != "other"}
    assert parameter_groups(HIGGS_V2) == rows
    assert sum(parameter_groups(HIGGS_V2).values()) == 5_771_283_456
    assert parameter_tensors(HIGGS_V2) == len(list(model.parameters()))
    assert lora_parameters(HIGGS_V2, ("text_attn", "text_mlp", "audio_mlp"), 16) == (39_452_672, 28 * 2 * 10)
    # what the estimate says is trained / held, at the real shapes
    est = estimate_memory(MemoryPlan(mode="full", weight_dtype="bfloat16"))
    assert est.trainable == est.params == 5_771_283_456 and est.weights == est.grads == 2 * 5_771_283_456


@pytest.mark.parametrize(
    "dtype,mode,ft,optimizer",
    [
        (torch.bfloat16, "lora", {"train_modules": ["audio_lm_head"]}, "adamw"),
        (torch.float32, "lora", {"pathways": ["text_attn", "audio_mlp"], "lora_r": 4}, "adamw"),
        (torch.bfloat16, "full", {"freeze": ["text_embeddings", "text_mlp"]}, "adamw"),
        (torch.float32, "full", {}, "adamw"),
    ],
    ids=["lora-bf16-head", "lora-fp32-r4", "full-bf16-freeze", "full-fp32"],
)
def test_weight_grad_and_optimizer_bytes_are_exact(tiny_dir, dtype, mode, ft, optimizer):
    """One real AdamW step on a small model; every byte of weights, gradients and AdamW state counted."""
    config = _small_config(tiny_dir, layers=2)
    model = _build(config, dtype, mode, **dict(ft))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = synthetic_batch(config)
    model(**{k: v for k, v in batch.items()}).loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    arch = Architecture.from_hf_config(config)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    plan = MemoryPlan(
        arch=arch,
        mode=mode,
        weight_dtype=name,
        optimizer=optimizer,
        pathways=tuple(ft.get("pathways", ("text_attn", "text_mlp", "audio_mlp"))) if mode == "lora" else (),
        train_modules=tuple(ft.get("train_modules", ())),
        freeze=tuple(ft.get("freeze", ())),
        lora_r=ft.get("lora_r", 16),
    )
    est = estimate_memory(plan)
    assert (est.params, est.trainable) == (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params))
    assert (est.weights, est.grads, est.optimizer) == (weights, grads, states)


VARIANTS = {
    "full-fp32": (torch.float32, "full", {}, {}),
    "lora-fp32": (torch.float32, "lora", {}, {}),
    "lora-fp32-dropout": (torch.float32, "lora", {"lora_dropout": 0.05}, {"lora_dropout": 0.05, "device": "cpu"}),
    "full-bf16": (torch.bfloat16, "full", {}, {}),
    "lora-bf16": (torch.bfloat16, "lora", {}, {}),
    "full-fp32-autocast": (torch.float32, "full", {}, {"autocast_bf16": True}),
    "full-fp32-ckpt": (torch.float32, "full", {}, {"gradient_checkpointing": True}),
    "lora-bf16-ckpt": (torch.bfloat16, "lora", {}, {"gradient_checkpointing": True}),
    "full-fp32-padded": (torch.float32, "full", {}, {"padded": True}),
}


UNPADDED = ((20, (40,)), (19, (14, 15)))  # two rows of 73 positions: SDPA runs causal, no mask
PADDED = ((20, (40,)), (12, (24, 30)))


def _saved_bytes(tiny_dir, layers, dtype, mode, ft, plan_kw, seq_rows=UNPADDED):
    from higgs_tune.train.loss import HiggsLossModule

    config = _small_config(tiny_dir, layers=layers)
    model = _build(config, dtype, mode, **dict(ft))
    if plan_kw.get("gradient_checkpointing"):
        base = model.get_base_model() if mode == "lora" else model
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = synthetic_batch(config, rows=seq_rows)
    loss_module = HiggsLossModule(model, LossConfig())
    with SavedTensorBytes(model.parameters()) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(plan_kw.get("autocast_bf16"))):
            loss_module(**batch)
    return saved.bytes, int(batch["attention_mask"].numel()), Architecture.from_hf_config(config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activation_terms_equal_the_bytes_autograd_saves_per_layer(tiny_dir, variant):
    """One more decoder layer adds exactly the predicted bytes per token (the batch has no padding
    inside the compared difference: both models see the same B x L positions)."""
    dtype, mode, ft, plan_kw = VARIANTS[variant]
    rows = PADDED if plan_kw.get("padded") else UNPADDED
    one, tokens, arch1 = _saved_bytes(tiny_dir, 1, dtype, mode, ft, plan_kw, rows)
    two, _, arch2 = _saved_bytes(tiny_dir, 2, dtype, mode, ft, plan_kw, rows)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    shape = {"seq_len": tokens // 2, "batch_size": 2}
    plan = MemoryPlan(arch=arch2, mode=mode, weight_dtype=name, **shape, **plan_kw)
    est2 = estimate_memory(plan)
    est1 = estimate_memory(MemoryPlan(arch=arch1, mode=mode, weight_dtype=name, **shape, **plan_kw))
    predicted = est2.activations - est1.activations + est2.autocast_weights - est1.autocast_weights
    assert two - one == predicted, layer_activation_terms(plan)


@pytest.mark.parametrize("variant", ["full-fp32", "lora-fp32", "lora-bf16", "full-bf16"])
def test_whole_model_saved_bytes_within_one_percent(tiny_dir, variant):
    """Layers + what is outside them (final norm, RoPE tables, ids, the loss heads' rows and log-softmax)."""
    from higgs_tune.train.loss import HiggsLossModule

    dtype, mode, ft, plan_kw = VARIANTS[variant]
    config = _small_config(tiny_dir, layers=2)
    model = _build(config, dtype, mode, **dict(ft))
    batch = synthetic_batch(config, rows=UNPADDED)
    with SavedTensorBytes(model.parameters()) as saved:
        HiggsLossModule(model, LossConfig())(**batch)
    tokens = int(batch["attention_mask"].sum())
    plan = MemoryPlan(
        arch=Architecture.from_hf_config(config),
        mode=mode,
        weight_dtype=str(dtype).replace("torch.", ""),
        seq_len=tokens // 2,
        batch_size=2,
        audio_share=int(batch["audio_input_ids_mask"].sum()) / tokens,
        audio_label_share=int((batch["audio_labels"] != -100).any(-1).sum()) / tokens,
        text_labels_per_sample=int((batch["labels"] != -100).sum()) / 2,
        **plan_kw,
    )
    est = estimate_memory(plan)
    assert abs(est.activations + est.loss_heads_saved - saved.bytes) / saved.bytes < 0.01, (
        est.activations + est.loss_heads_saved,
        saved.bytes,
    )


def test_every_preset_loads_and_validates(monkeypatch, tmp_path):
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in presets} >= {"lora-1gpu.yaml", "full-multigpu.yaml", "lora-24gb.yaml", "demo-tiny-cpu.yaml"}
    # the demo preset's ${...} paths come from the environment (an unset one is an error)
    for var in ("TINY_MODEL", "DEMO_CACHE", "DEMO_HELDOUT_CACHE", "OUTPUT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for path in presets:
        cfg = load_config(path)
        assert cfg.model.name_or_path


def test_lora_24gb_preset_fits_24_gb_at_seq_2048_by_the_model():
    cfg = load_config(REPO / "configs" / "lora-24gb.yaml")
    est = estimate_memory(plan_from_config(cfg, seq_len=2048))
    assert est.plan.batch_size * 2048 <= cfg.data.max_tokens_per_batch
    assert est.peak < 24e9 * 0.9, est.format()  # 10% margin for the allocator and the CUDA context
    # the same LoRA without checkpointing and with 4 sequences per batch would not fit
    no_ckpt = estimate_memory(
        plan_from_config(cfg, seq_len=2048, batch_size=4).__class__(
            **{**plan_from_config(cfg, seq_len=2048, batch_size=4).__dict__, "gradient_checkpointing": False}
        )
    )
    assert no_ckpt.peak > 24 * GIB


def test_memory_report_of_a_preset():
    from higgs_tune.model.memory import memory_report

    text = memory_report(load_config(REPO / "configs" / "lora-24gb.yaml"))
    assert "lora, weights bfloat16, adamw, seq 1024 x 8, grad ckpt on" in text
    assert "seq 2048 x 4, grad ckpt on" in text and "with gradient checkpointing off instead: peak" in text


def test_inspect_memory_prints_the_prediction_of_a_config():
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    res = CliRunner().invoke(main, ["inspect", "--memory", str(REPO / "configs" / "lora-24gb.yaml")])
    assert res.exit_code == 0, res.output
    cfg = load_config(REPO / "configs" / "lora-24gb.yaml")
    assert res.output.strip() == memory_report(cfg).strip()
    assert "seq 2048 x 4, grad ckpt on" in res.output and "peak" in res.output
    missing = CliRunner().invoke(main, ["inspect"])
    assert missing.exit_code == 2 and "give CACHE_DIR" in missing.output
