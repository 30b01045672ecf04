"""Training step time on CPU: gradient checkpointing on/off, LoRA vs full fine-tuning.

A small model (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 688, 8 codebooks x
1026, the tiny stack's 2048-token vocabulary, text head on, fp32) built from a
`HiggsAudioV2Config` like the real one. One batch of real-layout samples (`layout.build_sample`
-> `Collator`: voice cloning, ~80% audio positions, random codes); one step = the training
loss module forward + backward + AdamW step. The four settings are timed interleaved (one step
of each in turn) and the median per setting is compared:

- full: grad ckpt vs none   (recomputing the forward costs time; it buys memory, not measured on CPU)
- LoRA: grad ckpt vs none
- no ckpt: LoRA vs full      (LoRA skips the frozen weights' gradients and most optimizer work)
"""

from __future__ import annotations

import torch

from benchmarks import interleaved_medians, row, tiny_text_stack
from benchmarks.gpu_real_arch import ArchSpec, build_model, make_batch

SMALL = ArchSpec(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=688,
    vocab_size=2048,
)


def make_step(mode: str, grad_ckpt: bool, batch: dict):
    from higgs_tune.config import FinetuneConfig, LossConfig
    from higgs_tune.model.lora import apply_finetuning
    from higgs_tune.train.loss import HiggsLossModule

    _, tokens = tiny_text_stack()
    torch.manual_seed(0)
    model = build_model(SMALL, tokens, torch.float32, "cpu")
    if grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ft = FinetuneConfig(mode="lora", lora_dropout=0.0) if mode == "lora" else FinetuneConfig(mode="full", pathways=[])
    model = apply_finetuning(model, ft)
    model.train()
    loss_module = HiggsLossModule(model, LossConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss_module(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def run(quick: bool = False) -> list[dict]:
    tokenizer, tokens = tiny_text_stack()
    seq, batch_size = (256, 2) if quick else (384, 4)
    batch = make_batch(seq, batch_size, tokens, tokenizer)
    settings = {}
    trainable, total = {}, {}
    for mode in ("full", "lora"):
        for ckpt in (False, True):
            settings[(mode, ckpt)], trainable[mode], total[mode] = make_step(mode, ckpt, batch)
    times = interleaved_medians(
        {f"{m}/{c}": fn for (m, c), fn in settings.items()}, repeats=3 if quick else 7, warmup=1
    )
    full, full_ck, lora, lora_ck = (times[k] for k in ("full/False", "full/True", "lora/False", "lora/True"))
    size = f"hidden 256, 4 layers, {total['full']:,} params, batch {batch_size} x {seq} tokens, fp32 CPU"
    return [
        row("train_step", "step s, full fine-tuning", "no grad ckpt", "grad ckpt", full, full_ck, note=size),
        row("train_step", "step s, LoRA r16", "no grad ckpt", "grad ckpt", lora, lora_ck, note=size),
        row(
            "train_step",
            "step s, no grad ckpt",
            "full",
            "LoRA r16",
            full,
            lora,
            note=f"trainable full {trainable['full']:,} / LoRA {trainable['lora']:,}",
        ),
    ]
