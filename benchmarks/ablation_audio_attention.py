"""Ablation: the tiny model trained with and without the audio-only self-attention block.

Both runs start from the same tiny stack (`make_tiny`, seed 0) and see the same batches in the
same order; the block starts as an exact no-op, so at step 0 both models are identical and any
difference comes from the block's training. Full fine-tuning (a random tiny model barely
learns with LoRA alone), AdamW, constant LR, fp32 on CPU.

Data: synthetic audio codes, not the demo data (the prepare/cache pipeline is not in this
benchmark's dependencies). Each clip repeats a random motif of 3-6 frames drawn from a fixed
32-code alphabet per codebook: the alphabet is learnable (ln 32 = 3.47), and below that a frame
is predictable only from earlier audio frames of the same clip — the kind of structure an
audio-only attention could pick up faster. Samples follow the training layout of docs/CONTRACTS.md: text
tokens, then one target audio segment with the delay pattern, stream EOS trained.

Metric: audio cross-entropy per codebook (the model's summed 8-codebook loss / 8; chance
ln(1026) = 6.93): mean of the last 10 training steps, and on 16 held-out clips at the end.

    python -m benchmarks --only ablation [--quick]
    python benchmarks/ablation_audio_attention.py [--steps N]     (also prints both curves)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS, QUICK_STEPS = 300, 100
BATCH, LR = 8, 3e-3
ALPHABET = torch.randperm(1024, generator=torch.Generator().manual_seed(123))[: 8 * 32].view(8, 32)  # (K, 32) codes


def synthetic_clip_batch(config, clips: int, generator: torch.Generator) -> dict:
    """`clips` samples: text tokens + one target audio segment of motif-repeating codes (right padding)."""
    k, bos, eos = config.num_codebooks, config.audio_stream_bos_id, config.audio_stream_eos_id
    audio_eos = config.audio_bos_token_id - 1  # <|audio_eos|> precedes <|audio_out_bos|> in the Llama-3 special block
    rows = []
    for _ in range(clips):
        frames = int(torch.randint(20, 41, (1,), generator=generator))
        period = int(torch.randint(3, 7, (1,), generator=generator))
        # motif codes come from a fixed 32-code alphabet per codebook (learnable unigram, ln 32 = 3.47);
        # below that, only copying from the clip's earlier frames helps
        motif = ALPHABET[
            torch.arange(k)[:, None], torch.randint(0, ALPHABET.shape[1], (k, period), generator=generator)
        ]
        codes = motif.repeat(1, frames // period + 1)[:, :frames]  # (K, T)
        cols = torch.full((k, frames + k + 1), eos)
        labels = torch.full((k, frames + k + 1), -100)
        for row in range(k):
            cols[row, : row + 1] = bos
            cols[row, row + 1 : row + 1 + frames] = codes[row]
            labels[row, row + 1 : row + 1 + frames] = codes[row]
            labels[row, row + 1 + frames] = eos  # each codebook's first EOS is trained
        text = torch.randint(
            0, 1700, (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator
        ).tolist()
        ids = [config.bos_token_id] + text + [config.audio_bos_token_id] + [config.audio_token_id] * (frames + 2)
        ids += [config.audio_delay_token_id] * (k - 1) + [audio_eos, config.eos_token_id]
        rows.append((ids, cols.T, labels.T))
    length, n = max(len(r[0]) for r in rows), max(r[1].shape[0] for r in rows)
    batch = {
        "input_ids": torch.full((clips, length), config.pad_token_id),
        "attention_mask": torch.zeros(clips, length, dtype=torch.long),
        "audio_input_ids": torch.full((clips, n, k), eos),
        "audio_input_ids_mask": torch.zeros(clips, n, dtype=torch.bool),
        "audio_labels": torch.full((clips, n, k), -100),
    }
    for i, (ids, cols, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["audio_input_ids"][i, : cols.shape[0]] = cols
        batch["audio_input_ids_mask"][i, : cols.shape[0]] = True
        batch["audio_labels"][i, : cols.shape[0]] = labels
    return batch


def train(stack: Path, audio_attention: bool, steps: int, seed: int = 0) -> dict:
    from higgs_tune.config import FinetuneConfig, ModelConfig
    from higgs_tune.model.load import load_model
    from higgs_tune.model.lora import apply_finetuning, parameter_report

    model = load_model(
        ModelConfig(name_or_path=str(stack), dtype="float32", use_text_head=False, audio_self_attention=audio_attention)
    )
    model = apply_finetuning(model, FinetuneConfig(mode="full", pathways=[]))
    k = model.config.num_codebooks
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    held_out = synthetic_clip_batch(model.config, 16, torch.Generator().manual_seed(seed + 1000))
    curve = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = model(**synthetic_clip_batch(model.config, BATCH, data)).loss / k  # mean CE per codebook
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        eval_loss = (model(**held_out).loss / k).item()
    return {
        "curve": curve,
        "final": statistics.mean(curve[-10:]),
        "eval": eval_loss,
        "seconds": seconds,
        "params": parameter_report(model).total,
    }


def compare(steps: int) -> tuple[dict, dict]:
    from higgs_tune.tiny import make_tiny

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        stack = make_tiny(Path(tmp) / "tiny", seed=0)
        without = train(stack, audio_attention=False, steps=steps)
        with_ = train(stack, audio_attention=True, steps=steps)
    return without, with_


def demo_compare(steps: int) -> tuple[dict, dict]:
    """The same question on the bundled demo data, through the real recipe (`higgs_tune.train`):
    the demo preset in full fine-tuning, with and without the block; final train and held-out
    audio CE per codebook from each run's metrics.jsonl."""
    import json
    from importlib.resources import files

    import yaml

    from higgs_tune.app.demo import demo_data_dir
    from higgs_tune.config import config_from_dict
    from higgs_tune.data.prepare import prepare_manifest
    from higgs_tune.tiny import make_tiny
    from higgs_tune.train.recipe import train as run_recipe

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stack = make_tiny(tmp / "tiny", seed=0)
        data = demo_data_dir()
        caches = {
            name: prepare_manifest(data / f"{name}.jsonl", stack, tmp / name, progress=False).cache_dir
            for name in ("manifest", "heldout")
        }
        text = files("higgs_tune.resources").joinpath("demo-tiny-cpu.yaml").read_text(encoding="utf-8")
        for key, value in {
            "TINY_MODEL": stack,
            "DEMO_CACHE": caches["manifest"],
            "DEMO_HELDOUT_CACHE": caches["heldout"],
            "OUTPUT_DIR": tmp / "run",
        }.items():
            text = text.replace("${" + key + "}", str(value))
        base = yaml.safe_load(text)
        base["finetune"] = {"mode": "full"}  # every weight trains; the block's too
        for attn in (False, True):
            out = tmp / f"run-{int(attn)}"
            overrides = [
                f"train.max_steps={steps}",
                f"train.eval_steps={steps}",
                f"checkpoint.save_steps={steps}",
                "train.sample_steps=null",
                "checkpoint.keep_best=false",
                "logging.report_to=[]",
                f"checkpoint.output_dir={out}",
                f"model.audio_self_attention={str(attn).lower()}",
                "train.learning_rate=1e-3",
                "train.log_steps=1",
            ]
            t0 = time.perf_counter()
            run_recipe(config_from_dict(base, overrides))
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            train_rows = [r for r in rows if r.get("event") == "metrics" and r["split"] == "train"]
            eval_rows = [r for r in rows if r.get("event") == "metrics" and r["split"] == "eval"]
            results.append(
                {
                    "final": statistics.mean(r["audio_loss"] for r in train_rows[-10:]),
                    "eval": eval_rows[-1]["audio_loss"],
                    "seconds": time.perf_counter() - t0,
                    "curve": [r["audio_loss"] for r in train_rows],
                }
            )
    return results[0], results[1]


def run(quick: bool = False) -> list[dict]:
    from benchmarks import row

    steps = QUICK_STEPS if quick else STEPS
    without, with_ = compare(steps)
    note = (
        f"tiny model, full fine-tuning, {steps} steps x {BATCH} synthetic motif clips, AdamW lr {LR}, CPU fp32; "
        f"{without['params']:,} vs {with_['params']:,} params; {without['seconds']:.0f} s vs {with_['seconds']:.0f} s"
    )
    return [
        row(
            "ablation",
            "train audio CE/codebook (last 10 steps)",
            "no audio attention",
            "audio self-attention",
            without["final"],
            with_["final"],
            note=note,
        ),
        row(
            "ablation",
            "held-out audio CE/codebook",
            "no audio attention",
            "audio self-attention",
            without["eval"],
            with_["eval"],
            note="16 held-out clips, same generator for both",
        ),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument(
        "--data",
        choices=("synthetic", "demo"),
        default="synthetic",
        help="synthetic motif clips (default) or the bundled demo data through the real recipe",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    without, with_ = demo_compare(args.steps) if args.data == "demo" else compare(args.steps)
    print(f"data: {args.data}; audio CE per codebook (chance ln(1026) = 6.93)")
    print(f"{'step':>6} {'no audio attn':>14} {'audio attn':>12}")
    for i in sorted(set(range(0, args.steps, max(1, args.steps // 10))) | {args.steps - 1}):
        print(f"{i + 1:>6} {without['curve'][i]:>14.4f} {with_['curve'][i]:>12.4f}")
    print(f"{'final (mean of last 10 steps)':<32} {without['final']:.4f} vs {with_['final']:.4f}")
    print(f"{'held-out':<32} {without['eval']:.4f} vs {with_['eval']:.4f}")
    print(f"{'seconds':<32} {without['seconds']:.1f} vs {with_['seconds']:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
