"""The first real-size check on one GPU, offline, in under 8 minutes: one JSON + one markdown table.

    python benchmarks/gpu_check.py --out gpu-check               # one CUDA GPU, no network
    python benchmarks/gpu_check.py --out /tmp/gc --cpu-smoke     # any machine: reduced size, proves the code path
    bash benchmarks/gpu_check.sh [OUT]                           # the same as the first line

Part 1, training steps at the released v2 shapes (hidden 3072, 28 layers, DualFFN, 8 x 1026 audio
codes, 128,256-token text head; random weights; real-layout voice-cloning batches of exactly
`seq` tokens through the training loss module; see benchmarks/gpu_real_arch.py for the FLOP
count): LoRA r16 (bf16 weights) and full fine-tuning (bf16 weights + fused AdamW, and float32
master weights under bf16 autocast: the precision the full preset uses), each with and without
gradient checkpointing, at seq 1024 and 2048, batch 1. Per setting: tokens/s, MFU,
`torch.cuda.max_memory_allocated` over the measured steps, and the memory model's prediction
(model/memory.py) beside it. An out-of-memory step is a result ("OOM"), never a crash.

Part 2, the real entry point: `python -m higgs_tune train` for 20 steps (LoRA, the lora-24gb
preset's settings) on a real-size random-weight checkpoint written in the Hub layout
(benchmarks/real_size.py) and a code cache of the bundled demo clips made with the tiny codec
(synthetic codes: the point is the code path and the speed at real size, not the loss).
Wall time, return code, the last logged metrics and the checkpoint sizes are recorded.

Output folder: gpu_check.json (everything), gpu_check.md (the tables), train/ (the run), and the
stack and cache it built (delete them after: ~12 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (label, mode, weight dtype, bf16 autocast, gradient checkpointing)
SETTINGS = [
    ("LoRA r16, bf16", "lora", torch.bfloat16, False, False),
    ("LoRA r16, bf16", "lora", torch.bfloat16, False, True),
    ("full, bf16 + AdamW (fused on CUDA)", "full", torch.bfloat16, False, False),
    ("full, bf16 + AdamW (fused on CUDA)", "full", torch.bfloat16, False, True),
    ("full, fp32 master + bf16 autocast", "full", torch.float32, True, True),
]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_setting(
    spec, label, mode, dtype, autocast, ckpt, seqs, steps, warmup, device, peak_flops, log
) -> list[dict]:
    """Build one model for the setting, time `steps` optimizer steps per length; OOM is a result."""
    from benchmarks import tiny_text_stack
    from benchmarks.gpu_real_arch import build_model, flops_per_step, make_batch
    from higgs_tune.config import FinetuneConfig, LossConfig
    from higgs_tune.model.lora import apply_finetuning
    from higgs_tune.model.memory import Architecture, MemoryPlan, estimate_memory
    from higgs_tune.train.loss import HiggsLossModule

    tokenizer, tokens = tiny_text_stack()
    rows = []
    base = {
        "setting": label,
        "mode": mode,
        "dtype": str(dtype).replace("torch.", ""),
        "autocast_bf16": autocast,
        "grad_ckpt": ckpt,
    }
    try:
        torch.manual_seed(0)
        model = build_model(spec, tokens, dtype, device)
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ft = (
            FinetuneConfig(mode="lora", lora_dropout=0.0)
            if mode == "lora"
            else FinetuneConfig(mode="full", pathways=[])
        )
        model = apply_finetuning(model, ft).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
        loss_module = HiggsLossModule(model, LossConfig())
    except torch.OutOfMemoryError:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        for seq in seqs:
            rows.append({**base, "seq": seq, "oom": True, "oom_at": "building the model and optimizer"})
            log(f"{label:<34} ckpt={'on ' if ckpt else 'off'} seq {seq:>5}: OOM while building")
        return rows
    n_train = sum(p.numel() for p in params)
    arch = Architecture.from_hf_config(model.config if mode == "full" else model.get_base_model().config, name="v2")
    for seq in seqs:
        batch = make_batch(seq, 1, tokens, tokenizer)
        dev = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        t_tokens = int(batch["attention_mask"].sum())
        plan = MemoryPlan(
            arch=arch,
            mode=mode,
            weight_dtype=base["dtype"],
            autocast_bf16=autocast,
            foreach_optimizer=False,
            gradient_checkpointing=ckpt,
            seq_len=seq,
            audio_share=int(batch["audio_input_ids_mask"].sum()) / t_tokens,
            audio_label_share=int((batch["audio_labels"] != -100).any(-1).sum()) / t_tokens,
            text_labels_per_sample=int((batch["labels"] != -100).sum()),
            pathways=ft.pathways if mode == "lora" else (),
        )
        est = estimate_memory(plan)
        counted, six_n = flops_per_step(spec, batch, mode, n_train if mode == "lora" else 0)
        row = {
            **base,
            "seq": seq,
            "tokens": t_tokens,
            "trainable": n_train,
            "predicted_peak_gib": est.peak / 2**30,
            "predicted": {name: b / 2**30 for name, b in est.rows()},
            "oom": False,
        }
        try:
            times = []
            for i in range(warmup + steps):
                if i == warmup and device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_module(**dev).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            step_s = sorted(times)[len(times) // 2]
            measured = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            row.update(
                {
                    "step_s": step_s,
                    "tokens_per_s": t_tokens / step_s,
                    "loss": float(loss.detach()),
                    "mfu": counted / step_s / peak_flops if peak_flops else None,
                    "mfu_6n": six_n / step_s / peak_flops if peak_flops else None,
                    "peak_gib": measured,
                    "peak_over_predicted": measured / row["predicted_peak_gib"] if measured else None,
                }
            )
        except torch.OutOfMemoryError:
            row.update({"oom": True, "oom_at": "training step"})
            opt.zero_grad(set_to_none=True)
        rows.append(row)
        log(format_row(row))
        del dev
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    del model, loss_module, opt, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    head = f"{r['setting']:<34} ckpt={'on ' if r['grad_ckpt'] else 'off'} seq {r['seq']:>5}: "
    if r["oom"]:
        return head + f"OOM ({r.get('oom_at')}); predicted peak {r.get('predicted_peak_gib', float('nan')):.1f} GiB"
    mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
    mem = f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "peak n/a (CPU)"
    return head + (
        f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_s']:.3f} s, {mfu}, {mem} "
        f"(predicted {r['predicted_peak_gib']:.1f} GiB)"
    )


# ----------------------------------------------------------------------------- part 2
def train_check(out: Path, cpu_smoke: bool, steps: int, timeout_s: int, log) -> dict:
    """`python -m higgs_tune train` at real size (or smoke size) for `steps` steps."""
    import yaml

    from benchmarks.real_size import REAL, SMOKE, make_real_size_stack
    from higgs_tune.app.demo import demo_data_dir
    from higgs_tune.data.prepare import prepare_manifest

    result: dict = {"steps": steps}
    t0 = time.perf_counter()
    stack = out / "stack"
    if not (stack / "config.json").is_file():
        make_real_size_stack(stack, dtype="float32" if cpu_smoke else "bfloat16", shapes=SMOKE if cpu_smoke else REAL)
    result["stack_s"] = time.perf_counter() - t0
    result["stack_bytes"] = sum(p.stat().st_size for p in stack.rglob("*") if p.is_file())
    t1 = time.perf_counter()
    prepare_manifest(demo_data_dir() / "manifest.jsonl", stack, out / "cache", progress=False)
    result["prepare_s"] = time.perf_counter() - t1
    preset = yaml.safe_load((REPO / "configs" / "lora-24gb.yaml").read_text(encoding="utf-8"))
    preset["model"].update({"name_or_path": str(stack), "dtype": "float32" if cpu_smoke else "bfloat16"})
    preset["data"].update(
        {
            "train_cache": str(out / "cache"),
            "eval_fraction": 0.0,
            "num_workers": 0,
            "max_tokens_per_batch": 2048,
            "max_sequence_length": 1024,
        }
    )
    preset["train"].update(
        {
            "max_steps": steps,
            "warmup_steps": 2,
            "gradient_accumulation_steps": 1,
            "log_steps": 5,
            "eval_steps": None,
            "sample_steps": None,
        }
    )
    preset["checkpoint"].update(
        {"output_dir": str(out / "train"), "save_steps": max(1, steps // 2), "keep_best": False, "min_free_gb": 0.1}
    )
    preset["logging"] = {"report_to": ["none"]}
    cfg_path = out / "train-config.yaml"
    cfg_path.write_text(yaml.safe_dump(preset, sort_keys=False), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "higgs_tune", "train", str(cfg_path), "--overwrite"]
    log("running: " + " ".join(cmd))
    t2 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout_s)
        result.update({"returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-4000:]})
    except subprocess.TimeoutExpired as e:
        result.update({"returncode": None, "timed_out": True, "output_tail": str(e.stdout or "")[-4000:]})
    result["train_s"] = time.perf_counter() - t2
    metrics = out / "train" / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
        steps_logged = [x for x in lines if "loss" in x]
        if steps_logged:
            last = steps_logged[-1]
            result["last_metrics"] = {
                k: last.get(k) for k in ("step", "loss", "audio_loss", "text_loss", "tokens_per_s", "grad_norm")
            }
    result["checkpoints"] = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in sorted((out / "train").glob("*"))
        if p.is_dir() and (p / "manifest.json").is_file()
    }
    log(
        f"train: rc {result.get('returncode')}, {result['train_s']:.0f} s, last {result.get('last_metrics')}, "
        f"checkpoints {result['checkpoints']}"
    )
    return result


def to_markdown(report: dict) -> str:
    lines = [
        f"# GPU check ({report['device']}, {report['date']})",
        "",
        "| setting | ckpt | seq | tokens/s | MFU | peak GiB | predicted GiB | measured / predicted |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["steps"]:
        if r["oom"]:
            lines.append(
                f"| {r['setting']} | {'on' if r['grad_ckpt'] else 'off'} | {r['seq']} | OOM | | | "
                f"{r.get('predicted_peak_gib', float('nan')):.1f} | |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        ratio = f"{r['peak_over_predicted']:.2f}" if r.get("peak_over_predicted") else "n/a"
        lines.append(
            f"| {r['setting']} | {'on' if r['grad_ckpt'] else 'off'} | {r['seq']} | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{peak} | {r['predicted_peak_gib']:.1f} | {ratio} |"
        )
    t = report.get("train")
    if t:
        lines += [
            "",
            f"`higgs-tune train`, {t['steps']} steps: return code {t.get('returncode')}, {t.get('train_s', 0):.0f} s "
            f"(stack written in {t.get('stack_s', 0):.0f} s, {t.get('stack_bytes', 0) / 1e9:.1f} GB; prepare "
            f"{t.get('prepare_s', 0):.0f} s); last metrics {t.get('last_metrics')}; "
            f"checkpoints (bytes) {t.get('checkpoints')}",
        ]
    lines += ["", f"total wall time {report['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.gpu_real_arch import CPU_SMOKE, REAL, peak_flops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="hidden 128, 2 layers, seq 128/256, fp32 weights, 3 train steps"
    )
    ap.add_argument("--seq", type=int, nargs="+", help="default 1024 2048 (128 256 with --cpu-smoke)")
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps per setting (after warm-up)")
    ap.add_argument(
        "--train-steps", type=int, help="steps of the higgs-tune train run (default 20; 3 with --cpu-smoke)"
    )
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=420, help="skip the remaining step settings after this many seconds"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = _device()
    if device == "cpu" and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run with --cpu-smoke (reduced size) or on a GPU machine")
    spec = CPU_SMOKE if args.cpu_smoke else REAL
    seqs = args.seq or ([128, 256] if args.cpu_smoke else [1024, 2048])
    settings = [(lbl, m, torch.float32 if args.cpu_smoke else dt, ac, ck) for lbl, m, dt, ac, ck in SETTINGS]
    if args.cpu_smoke:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        # bf16 matmuls are ~360x slower than fp32 on these CPUs: the smoke run keeps fp32 weights
        settings = [(lbl.replace("bf16", "fp32") if not ac else lbl, m, dt, ac, ck) for lbl, m, dt, ac, ck in settings]
    peak = peak_flops(device, None)
    log_file = (out / "gpu_check.log").open("w", encoding="utf-8")

    def log(s: str) -> None:
        print(s, flush=True)
        log_file.write(s + "\n")
        log_file.flush()

    device_name = (
        torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    )
    log(f"device: {device_name}; torch {torch.__version__}; shapes {spec}")
    rows = []
    for label, mode, dtype, autocast, ckpt in settings:
        if time.perf_counter() - t0 > args.budget_s:
            rows += [
                {"setting": label, "mode": mode, "grad_ckpt": ckpt, "seq": s, "oom": False, "skipped": "time budget"}
                for s in seqs
            ]
            log(f"{label} ckpt={ckpt}: skipped (time budget {args.budget_s:.0f} s spent)")
            continue
        rows += measure_setting(
            spec, label, mode, dtype, autocast, ckpt, seqs, args.steps, 1 if args.cpu_smoke else 2, device, peak, log
        )
    report = {
        "device": device_name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "cpu_smoke": args.cpu_smoke,
        "spec": spec.__dict__,
        "steps": [r for r in rows if "skipped" not in r],
        "skipped": [r for r in rows if "skipped" in r],
    }
    if not args.skip_train:
        report["train"] = train_check(
            out,
            args.cpu_smoke,
            args.train_steps or (3 if args.cpu_smoke else 20),
            timeout_s=240 if not args.cpu_smoke else 600,
            log=log,
        )
    report["wall_s"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out / "gpu_check.md").write_text(to_markdown(report), encoding="utf-8")
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['wall_s']:.0f} s)")
    return 0 if report.get("train", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
