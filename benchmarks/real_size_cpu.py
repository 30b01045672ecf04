"""Real-size runs on CPU through the real entry points, wall time and peak RSS per phase.

    python benchmarks/real_size_cpu.py width --out /tmp/rs-width  # (b) real width, 2 layers, fp32: train, resume, merge
    python benchmarks/real_size_cpu.py depth --out /tmp/rs-depth  # (a) 28 layers, bf16: load, LoRA, save, merge
    python benchmarks/real_size_cpu.py width --out /tmp/x --smoke    # hidden 128: proves the script in a minute

Every phase runs in its own process (`python -m higgs_tune ...` or a short snippet), so its peak
RSS is its own (os.wait4). CPU facts (shared HIGGS_FACTS.md): fp32 matmul ~108 GFLOP/s, bf16
~0.3 GFLOP/s, so the full-depth bf16 run never computes a training step: it loads, wraps, saves,
verifies and merges. The checkpoint-size estimates of train/outdir.py are compared with the bytes
written. Results: OUT/real_size.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_phase(name: str, cmd: list[str], log, cwd: Path, timeout_s: int = 3000) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    log(f"[{name}] {' '.join(cmd)}")
    t0 = time.perf_counter()
    out_path = cwd / f"{name}.log"
    with out_path.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    rc = os.waitstatus_to_exitcode(status)
    r = {
        "phase": name,
        "returncode": rc,
        "wall_s": time.perf_counter() - t0,
        "max_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "log": str(out_path),
    }
    tail = out_path.read_text(encoding="utf-8", errors="replace").splitlines()[-6:]
    log(
        f"[{name}] rc {rc}, {r['wall_s']:.0f} s, peak RSS {r['max_rss_gb']:.2f} GB"
        + ("" if rc == 0 else "\n  " + "\n  ".join(tail))
    )
    return r


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def snippet(code: str) -> list[str]:
    return [PY, "-c", code]


def width(out: Path, smoke: bool, log, text_head: bool = True) -> list[dict]:
    """(b) real width, 2 layers, fp32: prepare, train (LoRA + grad ckpt), resume, export."""
    import yaml

    stack, cache = out / "stack", out / "cache"
    run = out / ("run-text-head" if text_head else "run-no-text-head")
    merged = out / ("merged-text-head" if text_head else "merged-no-text-head")
    phases = []
    shape = "--smoke" if smoke else "--layers 2"
    if not (stack / "config.json").is_file():  # a second run (the other text-head setting) reuses stack and cache
        phases.append(
            run_phase(
                "write-stack",
                [PY, str(REPO / "benchmarks" / "real_size.py"), str(stack), *shape.split(), "--dtype", "float32"],
                log,
                out,
            )
        )
    demo = REPO / "examples" / "data" / "demo" / "manifest.jsonl"
    if not (cache / "index.json").is_file() and not cache.is_dir():
        phases.append(
            run_phase(
                "prepare",
                [PY, "-m", "higgs_tune", "prepare", str(demo), "--model", str(stack), "--out", str(cache)],
                log,
                out,
            )
        )
    preset = yaml.safe_load((REPO / "configs" / "lora-24gb.yaml").read_text(encoding="utf-8"))
    preset["model"].update({"name_or_path": str(stack), "dtype": "float32", "use_text_head": text_head})
    if not text_head:  # the checkpoint still holds text_lm_head; the model is built without it
        preset.setdefault("loss", {})["text_weight"] = 0.0
    preset["data"].update(
        {
            "train_cache": str(cache),
            "eval_fraction": 0.0,
            "num_workers": 0,
            "max_tokens_per_batch": 1024,
            "max_sequence_length": 1024,
            "max_batch_size": 4,
        }
    )
    preset["train"].update(
        {
            "max_steps": 4,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
            "gradient_accumulation_steps": 1,
            "log_steps": 1,
            "eval_steps": None,
            "sample_steps": None,
        }
    )
    preset["checkpoint"].update(
        {"output_dir": str(run), "save_steps": 2, "save_total_limit": 2, "keep_best": False, "min_free_gb": 0.1}
    )
    preset["logging"] = {"report_to": ["none"]}
    cfg = out / f"config-{run.name}.yaml"
    cfg.write_text(yaml.safe_dump(preset, sort_keys=False), encoding="utf-8")
    phases.append(run_phase("train-4-steps", [PY, "-m", "higgs_tune", "train", str(cfg)], log, out))
    phases.append(
        run_phase(
            "resume-to-6",
            [PY, "-m", "higgs_tune", "train", str(cfg), "train.max_steps=6", "--resume", "auto"],
            log,
            out,
        )
    )
    phases.append(
        run_phase(
            "export",
            [PY, "-m", "higgs_tune", "export", str(merged), "--adapter", str(run / "final"), "--overwrite"],
            log,
            out,
        )
    )
    phases.append(checkpoint_sizes(cfg, run, out, log))
    return phases


def checkpoint_sizes(cfg_path: Path, run: Path, out: Path, log) -> dict:
    """train/outdir.py's estimate before loading (rough_checkpoint_bytes) vs the bytes of each checkpoint."""
    from higgs_tune.config import load_config
    from higgs_tune.train.outdir import rough_checkpoint_bytes

    cfg = load_config(cfg_path)
    rough = rough_checkpoint_bytes(cfg)
    actual = {p.name: tree_bytes(p) for p in sorted(run.glob("*")) if p.is_dir() and (p / "manifest.json").is_file()}
    log(f"[checkpoint-size] estimate before loading {rough:,} B; written: {actual}")
    return {"phase": "checkpoint-size", "estimate_bytes": rough, "actual_bytes": actual}


DEPTH_CODE = r"""
import json, sys, time, torch
from pathlib import Path
from higgs_tune.config import FinetuneConfig, ModelConfig, config_from_dict
from higgs_tune.model.load import load_model
from higgs_tune.model.lora import apply_finetuning, parameter_report, save_trainable, verify_trainable
from higgs_tune.train.outdir import estimate_checkpoint_bytes, rough_checkpoint_bytes
stack, ckpt, attn = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
t = {}
t0 = time.perf_counter()
model = load_model(
    ModelConfig(name_or_path=str(stack), dtype="bfloat16", audio_self_attention=attn, gradient_checkpointing=True)
)
t["load_s"] = time.perf_counter() - t0
pathways = ["text_attn", "text_mlp", "audio_mlp"] + (["audio_attn"] if attn else [])
t0 = time.perf_counter()
model = apply_finetuning(model, FinetuneConfig(mode="lora", pathways=pathways, lora_dropout=0.0))
t["lora_s"] = time.perf_counter() - t0
report = parameter_report(model)
print(report.format())
cfg = config_from_dict({"model": {"name_or_path": str(stack), "audio_self_attention": attn},
                        "finetune": {"pathways": pathways, "lora_dropout": 0.0}, "data": {"train_cache": "c"},
                        "train": {"max_steps": 1}, "checkpoint": {"output_dir": str(ckpt)}})
# AdamW state of the real size (no bf16 step is computed on CPU: zero gradients, one step)
params = [p for p in model.parameters() if p.requires_grad]
for p in params:
    p.grad = torch.zeros_like(p)
opt = torch.optim.AdamW(params, lr=1e-4)
opt.step()
from higgs_tune.train.checkpoint import CheckpointManager
manager = CheckpointManager(ckpt, None, cfg.checkpoint,
                            save_weights=lambda d, state_dict=None: save_trainable(model, d, state_dict),
                            verify_weights=lambda d, state_dict=None: verify_trainable(model, d, state_dict),
                            estimate_bytes=estimate_checkpoint_bytes(model, "lora"))
t0 = time.perf_counter()
saved_at = manager.save(1, optimizer=opt, scheduler=None, sampler_state={"epoch": 0, "batches_consumed": 1}, epoch=0,
                        metrics={}, config=cfg)  # the trainer's save: fsync, sha256, read-back verification, rename
t["save_verify_s"] = time.perf_counter() - t0
t["checkpoint"] = str(saved_at)
t["files"] = {p.name: p.stat().st_size for p in saved_at.iterdir() if p.is_file()}
t["params"] = report.total
t["trainable"] = report.trainable
t["estimate_loaded_bytes"] = estimate_checkpoint_bytes(model, "lora")
t["estimate_rough_bytes"] = rough_checkpoint_bytes(cfg)
t["checkpoint_bytes"] = sum(p.stat().st_size for p in saved_at.rglob("*") if p.is_file())
print("RESULT " + json.dumps(t))
"""


def depth(out: Path, smoke: bool, attn: bool, log) -> list[dict]:
    """(a) full depth bf16: write the checkpoint, load it through load_model, LoRA on every pathway,
    save + verify the adapter, merge it with `higgs-tune export`."""
    stack, ckpt = out / "stack", out / "run"
    phases = []
    shape = ["--smoke", "--dtype", "bfloat16"] if smoke else ["--dtype", "bfloat16"]
    if not (stack / "config.json").is_file():  # written earlier (it needs little memory: one shard at a time)
        phases.append(
            run_phase("write-stack", [PY, str(REPO / "benchmarks" / "real_size.py"), str(stack), *shape], log, out)
        )
    phases.append(
        run_phase(
            "load-lora-save-verify", snippet(DEPTH_CODE) + [str(stack), str(ckpt), "1" if attn else "0"], log, out
        )
    )
    text = Path(phases[-1]["log"]).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("RESULT "):
            phases[-1]["result"] = json.loads(line[7:])
            log(f"[load-lora-save-verify] {phases[-1]['result']}")
    adapter = Path(phases[-1].get("result", {}).get("checkpoint", ckpt / "checkpoint-1"))
    phases.append(
        run_phase(
            "export-merge",
            [
                PY,
                "-m",
                "higgs_tune",
                "export",
                str(out / "merged"),
                "--adapter",
                str(adapter),
                "--model",
                str(stack),
                "--dtype",
                "bfloat16",
                "--overwrite",
            ],
            log,
            out,
        )
    )
    phases[-1]["merged_bytes"] = tree_bytes(out / "merged")
    phases[-1]["stack_bytes"] = tree_bytes(stack)
    return phases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["width", "depth"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--audio-attn", action="store_true", help="depth: also add the audio self-attention (+0.7B) and its LoRA"
    )
    ap.add_argument(
        "--no-text-head", action="store_true", help="width: train without the 128k text head (1.6 GB less RSS in fp32)"
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, flush=True)

    t0 = time.perf_counter()
    phases = (
        width(out, args.smoke, log, text_head=not args.no_text_head)
        if args.what == "width"
        else depth(out, args.smoke, args.audio_attn, log)
    )
    report = {
        "what": args.what,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
        "phases": phases,
    }
    (out / f"real_size-{args.what}{'-no-text-head' if args.no_text_head else ''}.json").write_text(
        json.dumps(report, indent=2), encoding="utf-8"
    )
    print("\n| phase | rc | wall s | peak RSS GB |\n|---|---:|---:|---:|")
    for p in phases:
        if "wall_s" in p:
            print(f"| {p['phase']} | {p['returncode']} | {p['wall_s']:.0f} | {p['max_rss_gb']:.2f} |")
    return 0 if all(p.get("returncode", 0) == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
