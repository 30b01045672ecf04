"""Training throughput, MFU and peak memory at the real Higgs Audio v2 shapes (random weights).

    python -m benchmarks.gpu_real_arch                      # CUDA: real shapes, bf16
    python -m benchmarks.gpu_real_arch --cpu-smoke          # any machine: hidden 128, 2 layers, seq 256
    python -m benchmarks.gpu_real_arch --seq 1024 2048 --steps 5 --json out.json

Model: `HiggsAudioV2ForConditionalGeneration` built from a `HiggsAudioV2Config` at the released
sizes (hidden 3072, 28 layers, 24 heads, 8 KV heads, head_dim 128, intermediate 8192, 8
codebooks x 1026, vocab 128256, text head on; ~5.8B parameters), random weights, bf16.
Batches: the real layout (`layout.build_sample` -> `Collator`), voice-cloning samples filled to
exactly the sequence length with ~80% audio positions (the TTS shape: a few dozen text tokens,
then hundreds of audio frames). Loss: `train.loss.HiggsLossModule`, the training loss module.
Settings: LoRA (r 16 on text_attn/text_mlp/audio_mlp, via `model.lora.apply_finetuning`) and
full fine-tuning (AdamW), each with and without gradient checkpointing, at each sequence length.

What is counted (`flops_per_step`), per step of B x S real tokens:
- N_tok: weights every token multiplies through: per layer q/k/v/o plus ONE FFN (each position
  takes the text FFN or the audio FFN of DualFFN; both are 3 x hidden x intermediate). At the
  real shapes N_tok = 2.82B of the 5.8B parameters: embeddings are lookups (no FLOPs), the
  second FFN is idle for any given token, and the heads run only where a label is.
- heads: the audio head (hidden x 8 x 1026) at positions with an audio label, the text head
  (hidden x 128256) at positions with a text label — what the loss module computes.
- attention scores: QK^T and PV, 2 x 2 x S^2/2 x (heads x head_dim) per layer and sequence
  forward (causal: half the square).
- Full fine-tuning: forward 2 + backward 4 FLOPs per weight and token: 6 x N_tok x tokens +
  6 x head FLOPs + 3 x attention. LoRA: the backward still runs through every frozen weight to
  reach earlier adapters (input gradients, 2 per weight and token) but skips their weight
  gradients: 4 x N_tok x tokens + 6 x N_lora x tokens + 4 x heads + 3 x attention. The
  customary "6 x N x tokens" would overstate LoRA's work by ~1.5x; `mfu_6n` gives that figure
  too, for comparison with reports that use it.
- Gradient checkpointing recomputes the forward (2 x N_tok x tokens more hardware FLOPs); MFU
  counts model FLOPs only, so recomputation shows as lower MFU, as it should.
MFU = counted FLOPs / step time / peak. Peak: H100/H200 SXM dense bf16 989 TFLOP/s (pass
`--peak-tflops` for another card); none on CPU. Memory: `torch.cuda.max_memory_allocated` over
the measured steps (weights + gradients + AdamW state + activations). Weights, gradients and
AdamW state are all bf16 (no fp32 master copy), as `model.dtype: bfloat16` trains.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class ArchSpec:
    hidden_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 8192
    vocab_size: int = 128256
    num_codebooks: int = 8
    codebook_size: int = 1026  # 1024 codes + stream BOS + EOS

    def n_tok(self) -> int:
        """Weights one token multiplies through in the decoder (attention + one FFN), no heads."""
        d, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size
        return self.num_hidden_layers * per_layer


REAL = ArchSpec()
CPU_SMOKE = ArchSpec(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=344,
)


def build_model(spec: ArchSpec, tokens, dtype: torch.dtype, device: str):
    """Random-weight HiggsAudioV2ForConditionalGeneration at `spec`, special ids from `tokens`."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    config = HiggsAudioV2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=8192,
        num_codebooks=spec.num_codebooks,
        codebook_size=spec.codebook_size,
        audio_stream_bos_id=tokens.stream_bos,
        audio_stream_eos_id=tokens.stream_eos,
        audio_token_id=tokens.audio_out,
        audio_bos_token_id=tokens.audio_out_bos,
        audio_delay_token_id=tokens.audio_delay,
        pad_token_id=tokens.pad,
        bos_token_id=tokens.begin_of_text,
        eos_token_id=tokens.eot,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def make_batch(seq_len: int, batch_size: int, tokens, tokenizer, seed: int = 0, text_share: float = 0.2) -> dict:
    """Collated voice-cloning samples of exactly `seq_len` tokens, ~`text_share` of them text.

    The transcripts grow word by word until the text part reaches the share; the frames of the
    reference (1/3) and the target (2/3) then fill the rest exactly.
    """
    from benchmarks import synthetic_text
    from higgs_tune.data.collate import Collator
    from higgs_tune.data.layout import Conversation, build_sample, sample_lengths

    rng = random.Random(seed)
    k = tokens.num_codebooks
    fixed_cols = 2 * (k + 1)  # two segments: num_columns(T) = T + K + 1
    samples = []
    for i in range(batch_size):
        seconds = 0.5
        while True:
            conv = Conversation.voice_clone(synthetic_text(2 * seconds, rng), synthetic_text(seconds, rng))
            text_len = (
                sample_lengths([conv], tokenizer, tokens, [0], [0])[0] - fixed_cols
            )  # tokens without audio columns
            if text_len >= text_share * seq_len:
                break
            seconds *= 1.25
        frames = seq_len - text_len - fixed_cols
        if frames < 2:
            raise ValueError(f"sequence length {seq_len} leaves no room for audio after {text_len} text tokens")
        ref_t = max(1, frames // 3)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        ref = torch.randint(0, tokens.stream_bos, (k, ref_t), generator=gen)
        tgt = torch.randint(0, tokens.stream_bos, (k, frames - ref_t), generator=gen)
        s = build_sample(conv, tokenizer, tokens, target_codes=tgt, ref_codes=ref, sample_id=f"synthetic_{i}")
        if s["input_ids"].shape[0] != seq_len:
            raise AssertionError(f"built {s['input_ids'].shape[0]} tokens, wanted {seq_len}")
        samples.append(s)
    return Collator(tokens)(samples)


def flops_per_step(spec: ArchSpec, batch: dict, mode: str, n_lora: int) -> tuple[float, float]:
    """(counted model FLOPs, 6 x N_tok x tokens convention) of one training step; see module docstring."""
    tokens = int(batch["attention_mask"].sum())
    audio_head_pos = int((batch["audio_labels"] != -100).any(-1).sum())
    text_head_pos = int((batch["labels"] != -100).sum())
    d = spec.hidden_size
    heads = 2 * d * (spec.num_codebooks * spec.codebook_size * audio_head_pos + spec.vocab_size * text_head_pos)
    lengths = batch["attention_mask"].sum(1).tolist()
    attn_fwd = (
        sum(2 * 2 * (s * s / 2) * spec.num_attention_heads * spec.head_dim for s in lengths) * spec.num_hidden_layers
    )
    dense = 2 * spec.n_tok() * tokens
    if mode == "full":
        counted = 3 * dense + 3 * heads + 3 * attn_fwd
    else:
        counted = 2 * dense + 6 * n_lora * tokens + 2 * heads + 3 * attn_fwd
    return counted, 3 * dense


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    spec: ArchSpec,
    mode: str,
    grad_ckpt: bool,
    seqs: list[int],
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    dtype: torch.dtype,
    peak: float | None,
) -> list[dict]:
    """Build one model for (mode, grad_ckpt) and time `steps` optimizer steps at each length."""
    from benchmarks import tiny_text_stack
    from higgs_tune.config import FinetuneConfig, LossConfig
    from higgs_tune.model.lora import apply_finetuning
    from higgs_tune.train.loss import HiggsLossModule

    tokenizer, tokens = tiny_text_stack()
    torch.manual_seed(0)
    model = build_model(spec, tokens, dtype, device)
    if grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ft = FinetuneConfig(mode=mode, lora_dropout=0.0) if mode == "lora" else FinetuneConfig(mode="full", pathways=[])
    model = apply_finetuning(model, ft)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    n_lora = n_train if mode == "lora" else 0
    # fused AdamW on CUDA: no foreach temporaries (a second copy of 5.8B parameters in full mode)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    loss_module = HiggsLossModule(model, LossConfig())
    out = []
    for seq in seqs:
        batch = make_batch(seq, batch_size, tokens, tokenizer)
        dev_batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        counted, six_n = flops_per_step(spec, batch, mode, n_lora)
        result = {
            "mode": mode,
            "grad_ckpt": grad_ckpt,
            "seq": seq,
            "batch_size": batch_size,
            "params": n_all,
            "trainable": n_train,
            "n_tok": spec.n_tok(),
            "flops_per_step": counted,
            "oom": False,
        }
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(warmup + steps):
                _sync(device)
                t0 = time.perf_counter()
                loss = loss_module(**dev_batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            result.update(
                {
                    "step_s": step_s,
                    "tokens_per_s": int(batch["attention_mask"].sum()) / step_s,
                    "mfu": counted / step_s / peak if peak else None,
                    "mfu_6n": six_n / step_s / peak if peak else None,
                    "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                    "loss": float(loss.detach()),
                }
            )
        except torch.OutOfMemoryError:
            # reported as a measurement ("does not fit"), never hidden
            result.update(
                {"oom": True, "step_s": None, "tokens_per_s": None, "mfu": None, "mfu_6n": None, "peak_mem_gb": None}
            )
            opt.zero_grad(set_to_none=True)
        out.append(result)
        del dev_batch
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    del model, loss_module, opt, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def benchmark(
    cpu_smoke: bool,
    seqs: list[int] | None = None,
    steps: int | None = None,
    batch_size: int = 1,
    peak_tflops: float | None = None,
    log=print,
) -> list[dict]:
    device = "cpu" if cpu_smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not cpu_smoke:
        raise SystemExit("no CUDA device: run with --cpu-smoke (reduced size) or on a GPU machine")
    spec = CPU_SMOKE if cpu_smoke else REAL
    dtype = torch.float32 if cpu_smoke else torch.bfloat16
    seqs = seqs or ([256] if cpu_smoke else [1024, 2048, 4096])
    steps = steps or (3 if cpu_smoke else 5)
    warmup = 1 if cpu_smoke else 2
    peak = peak_flops(device, peak_tflops)
    results = []
    for mode in ("lora", "full"):
        for ckpt in (False, True):
            got = measure(spec, mode, ckpt, seqs, batch_size, steps, warmup, device, dtype, peak)
            for r in got:
                log(format_result(r))
            results += got
    return results


def format_result(r: dict) -> str:
    if r["oom"]:
        return f"{r['mode']:<4} ckpt={str(r['grad_ckpt']):<5} seq {r['seq']:>5} x {r['batch_size']}: out of memory"
    mfu = (
        f"MFU {100 * r['mfu']:.1f}% (6N: {100 * r['mfu_6n']:.1f}%)"
        if r["mfu"] is not None
        else "MFU n/a (no peak for this device)"
    )
    mem = f"peak {r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else "peak memory n/a on CPU"
    return (
        f"{r['mode']:<4} ckpt={str(r['grad_ckpt']):<5} seq {r['seq']:>5} x {r['batch_size']}: "
        f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_s']:.3f} s, {mfu}, {mem}, trainable {r['trainable']:,} "
        f"of {r['params']:,}"
    )


def to_rows(results: list[dict], device_note: str) -> list[dict]:
    """Ratio rows for `python -m benchmarks`: grad ckpt vs none, LoRA vs full, per length."""
    from benchmarks import row

    def get(mode, ckpt, seq):
        return next(r for r in results if r["mode"] == mode and r["grad_ckpt"] == ckpt and r["seq"] == seq)

    def detail(r):
        if r["oom"]:
            return "OOM"
        bits = [f"{r['tokens_per_s']:,.0f} tok/s"]
        if r["mfu"] is not None:
            bits.append(f"MFU {100 * r['mfu']:.1f}%")
        if r["peak_mem_gb"] is not None:
            bits.append(f"{r['peak_mem_gb']:.1f} GiB")
        return " ".join(bits)

    rows = []
    for seq in sorted({r["seq"] for r in results}):
        for mode in ("lora", "full"):
            a, b = get(mode, False, seq), get(mode, True, seq)
            if a["oom"] or b["oom"]:
                rows.append(
                    {
                        "benchmark": "gpu",
                        "metric": f"tokens/s, {mode}, seq {seq}",
                        "baseline": "no grad ckpt",
                        "candidate": "grad ckpt",
                        "note": f"{device_note}; no ckpt: {detail(a)}; ckpt: {detail(b)}",
                    }
                )
                continue
            rows.append(
                row(
                    "gpu",
                    f"tokens/s, {mode}, seq {seq}",
                    "no grad ckpt",
                    "grad ckpt",
                    a["tokens_per_s"],
                    b["tokens_per_s"],
                    note=f"{device_note}; no ckpt: {detail(a)}; ckpt: {detail(b)}",
                )
            )
            if a["peak_mem_gb"] is not None:
                rows.append(
                    row(
                        "gpu",
                        f"peak memory GiB, {mode}, seq {seq}",
                        "no grad ckpt",
                        "grad ckpt",
                        a["peak_mem_gb"],
                        b["peak_mem_gb"],
                        note=device_note,
                    )
                )
        f, lo = get("full", False, seq), get("lora", False, seq)
        if not (f["oom"] or lo["oom"]):
            rows.append(
                row(
                    "gpu",
                    f"tokens/s, seq {seq}, no ckpt",
                    "full",
                    "LoRA",
                    f["tokens_per_s"],
                    lo["tokens_per_s"],
                    note=f"{device_note}; trainable LoRA {lo['trainable']:,} / full {f['trainable']:,}",
                )
            )
    return rows


def run(quick: bool = False) -> list[dict]:
    """For `python -m benchmarks`: the real shapes on CUDA, the reduced CPU smoke size otherwise."""
    cpu = not torch.cuda.is_available()
    if cpu:
        results = benchmark(cpu_smoke=True, log=lambda s: None)
        note = "CPU smoke size (hidden 128, 2 layers, seq 256, fp32): validates the path, not GPU figures"
    else:
        results = benchmark(
            cpu_smoke=False, seqs=[1024, 2048] if quick else None, steps=3 if quick else None, log=lambda s: None
        )
        note = f"{torch.cuda.get_device_name(0)}, real shapes, bf16"
    return to_rows(results, note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_real_arch", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="reduced size on CPU: hidden 128, 2 layers, seq 256, fp32")
    ap.add_argument(
        "--seq", type=int, nargs="+", help="sequence lengths (default 1024 2048 4096; 256 with --cpu-smoke)"
    )
    ap.add_argument("--steps", type=int, help="measured steps per setting (median); default 5 (3 with --cpu-smoke)")
    ap.add_argument("--batch-size", type=int, default=1, help="samples per step, each of --seq tokens")
    ap.add_argument(
        "--peak-tflops", type=float, help="peak dense TFLOP/s of the device for MFU (default: by name, H100/H200 989)"
    )
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = ap.parse_args(argv)
    results = benchmark(args.cpu_smoke, args.seq, args.steps, args.batch_size, args.peak_tflops)
    spec = CPU_SMOKE if args.cpu_smoke else REAL
    print(f"spec: {asdict(spec)}; N_tok (attention + one FFN per layer) = {spec.n_tok():,}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"spec": asdict(spec), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
