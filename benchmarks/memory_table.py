"""Predicted training memory per component (model/memory.py), and its check against real tensors.

    python benchmarks/memory_table.py                    # table: v2 and v3, LoRA and full, seq 1024/2048/4096
    python benchmarks/memory_table.py --markdown         # the same as a markdown table
    python benchmarks/memory_table.py --validate         # CPU: real width 3072, 1-3 layers, fp32, LoRA + full
    python benchmarks/memory_table.py --validate --layers 1 2 --seq 256 512 --json out.json

The table is a prediction (no GPU figure exists yet: benchmarks/gpu_check.py measures it).
`--validate` builds `HiggsAudioV2ForConditionalGeneration` at the real width (hidden 3072, 24/8
heads, MLP 8192, 8 x 1026 audio codes; a 2048-token text vocabulary to keep the embedding small;
1-3 decoder layers), runs real-layout batches of exactly `seq` tokens through the training loss
module, and measures (a) the bytes autograd saves for the backward (`SavedTensorBytes`), against the
model's activations + loss-head terms, and (b) the peak of live tensors over forward +
backward (torch's MemTracker on CPU; full mode only: it hooks every parameter's gradient), against
the model's weights + max(activations + heads, gradients). It then fits
saved bytes = c0 + c1 x layers x tokens + c2 x tokens per mode and prints c1 beside the model's
per-layer figure, with the residuals: the activations grow linearly with depth.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higgs_tune.model.memory import GIB, HIGGS_V2, HIGGS_V3, MemoryPlan, estimate_memory  # noqa: E402

SEQS = (1024, 2048, 4096)


def settings() -> list[tuple[str, MemoryPlan]]:
    """(label, plan) rows of the table: what a user would choose between."""
    v2_lora = MemoryPlan(arch=HIGGS_V2, mode="lora", weight_dtype="bfloat16")
    v2_full = MemoryPlan(arch=HIGGS_V2, mode="full", weight_dtype="bfloat16", pathways=())
    v3_lora = MemoryPlan(
        arch=HIGGS_V3, mode="lora", weight_dtype="bfloat16", pathways=("text_attn", "text_mlp"), use_text_head=False
    )
    v3_full = MemoryPlan(arch=HIGGS_V3, mode="full", weight_dtype="bfloat16", pathways=(), use_text_head=False)
    return [
        ("v2 LoRA r16, bf16", v2_lora),
        ("v2 LoRA r16, bf16, dropout 0.05", MemoryPlan(**{**v2_lora.__dict__, "lora_dropout": 0.05})),
        ("v2 LoRA r16, bf16, no text head", MemoryPlan(**{**v2_lora.__dict__, "use_text_head": False})),
        ("v2 full, bf16 weights + AdamW (lossy)", v2_full),
        (
            "v2 full, fp32 master + bf16 autocast",
            MemoryPlan(**{**v2_full.__dict__, "weight_dtype": "float32", "autocast_bf16": True}),
        ),
        (
            "v2 full, bf16 + AdamW bf16 stoch. rounding",
            MemoryPlan(**{**v2_full.__dict__, "optimizer": "adamw_bf16_sr"}),
        ),
        ("v2 full, bf16 + AdamW 8-bit states", MemoryPlan(**{**v2_full.__dict__, "optimizer": "adamw_8bit"})),
        ("v3 LoRA r16, bf16", v3_lora),
        (
            "v3 full, fp32 master + bf16 autocast",
            MemoryPlan(**{**v3_full.__dict__, "weight_dtype": "float32", "autocast_bf16": True}),
        ),
    ]


def table(seqs=SEQS) -> list[dict]:
    rows = []
    for label, base in settings():
        for ckpt in (False, True):
            for seq in seqs:
                est = estimate_memory(MemoryPlan(**{**base.__dict__, "seq_len": seq, "gradient_checkpointing": ckpt}))
                rows.append(
                    {
                        "setting": label,
                        "grad_ckpt": ckpt,
                        "seq": seq,
                        "trainable": est.trainable,
                        **{name: b / GIB for name, b in est.rows()},
                    }
                )
    return rows


def format_table(rows: list[dict], markdown: bool) -> str:
    cols = ["weights", "gradients", "optimizer states", "activations (saved)", "peak"]
    short = {
        "weights": "weights",
        "gradients": "grads",
        "optimizer states": "optim",
        "activations (saved)": "activations",
        "peak": "PEAK",
    }
    if markdown:
        out = [
            "| setting | ckpt | seq | " + " | ".join(short[c] + " GiB" for c in cols) + " |",
            "|---|---|---:|" + "---:|" * len(cols),
        ]
        for r in rows:
            out.append(
                f"| {r['setting']} | {'on' if r['grad_ckpt'] else 'off'} | {r['seq']} | "
                + " | ".join(f"{r[c]:.1f}" for c in cols)
                + " |"
            )
        return "\n".join(out)
    out = [f"{'setting':<44} {'ckpt':<4} {'seq':>5} " + " ".join(f"{short[c]:>11}" for c in cols)]
    for r in rows:
        out.append(
            f"{r['setting']:<44} {'on' if r['grad_ckpt'] else 'off':<4} {r['seq']:>5} "
            + " ".join(f"{r[c]:>11.2f}" for c in cols)
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- CPU validation
def validate(layers=(1, 2, 3), seqs=(256, 512, 1024), modes=("lora", "full"), log=print) -> list[dict]:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from benchmarks import tiny_text_stack
    from benchmarks.gpu_real_arch import ArchSpec, build_model, make_batch
    from higgs_tune.config import FinetuneConfig, LossConfig
    from higgs_tune.model.lora import apply_finetuning
    from higgs_tune.model.memory import Architecture, SavedTensorBytes
    from higgs_tune.train.loss import HiggsLossModule

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer, tokens = tiny_text_stack()
    results = []
    for mode in modes:
        for n_layers in layers:
            spec = ArchSpec(num_hidden_layers=n_layers, vocab_size=2048)
            torch.manual_seed(0)
            model = build_model(spec, tokens, torch.float32, "cpu")
            ft = (
                FinetuneConfig(mode="lora", lora_dropout=0.0)
                if mode == "lora"
                else FinetuneConfig(mode="full", pathways=[])
            )
            model = apply_finetuning(model, ft).train()
            arch = Architecture.from_hf_config(model.config, name=f"v2 width, {n_layers} layer(s)")
            loss_module = HiggsLossModule(model, LossConfig())
            for seq in seqs:
                batch = make_batch(seq, 1, tokens, tokenizer)
                t0 = time.perf_counter()
                with SavedTensorBytes(model.parameters()) as saved:
                    out = loss_module(**batch)
                del out
                gc.collect()
                n_audio_rows = int((batch["audio_labels"] != -100).any(-1).sum())
                n_text_rows = int((batch["labels"] != -100).sum())
                t_tokens = int(batch["attention_mask"].sum())
                plan = MemoryPlan(
                    arch=arch,
                    mode=mode,
                    weight_dtype="float32",
                    pathways=ft.pathways if mode == "lora" else (),
                    seq_len=seq,
                    audio_label_share=n_audio_rows / t_tokens,
                    audio_share=int(batch["audio_input_ids_mask"].sum()) / t_tokens,
                    text_labels_per_sample=n_text_rows,
                    device="cpu",
                )
                est = estimate_memory(plan)
                r = {
                    "mode": mode,
                    "layers": n_layers,
                    "seq": seq,
                    "tokens": t_tokens,
                    "saved_measured": saved.bytes,
                    "saved_predicted": est.activations + est.loss_heads_saved,
                    "weights_predicted": est.weights,
                    "per_token_layer_predicted": est.activations_per_token_layer,
                }
                if mode == "full":
                    # MemTracker hooks every parameter's gradient, so it needs all of them trainable: full mode.
                    # Forward + backward only (the optimizer terms are checked byte for byte in the tests).
                    tracker = MemTracker()
                    tracker.track_external(loss_module)
                    with tracker:
                        loss_module(**batch).loss.backward()
                    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
                    model.zero_grad(set_to_none=True)
                    r["peak_measured"] = peak["Total"]
                    r["peak_parts_measured"] = {str(k.value if hasattr(k, "value") else k): v for k, v in peak.items()}
                    r["static_measured"] = peak[next(k for k in peak if getattr(k, "value", None) == "Parameter")]
                    r["peak_minus_static_measured"] = r["peak_measured"] - r["static_measured"]
                    # the same phases predicted: weights + max(activations + heads, grads)
                    during = est.activations + est.recompute + est.loss_heads
                    r["peak_predicted"] = est.weights + max(during, est.grads)
                    r["peak_minus_static_predicted"] = r["peak_predicted"] - est.weights
                r["seconds"] = time.perf_counter() - t0
                results.append(r)
                line = (
                    f"{mode:<4} layers {n_layers} seq {seq:>5}: saved {saved.bytes / 2**20:8.1f} MiB (predicted "
                    f"{r['saved_predicted'] / 2**20:8.1f}, {100 * (r['saved_predicted'] / saved.bytes - 1):+.2f}%)"
                )
                if "peak_measured" in r:
                    line += (
                        f", fwd+bwd peak above weights {r['peak_minus_static_measured'] / 2**20:8.1f} MiB (predicted "
                        f"{r['peak_minus_static_predicted'] / 2**20:8.1f}, "
                        f"{100 * (r['peak_minus_static_predicted'] / r['peak_minus_static_measured'] - 1):+.1f}%)"
                    )
                log(line + f", {r['seconds']:.0f} s")
                del batch
                gc.collect()
            del model, loss_module
            gc.collect()
    for mode in modes:
        fit = fit_linear([r for r in results if r["mode"] == mode])
        if fit:
            log(fit)
    return results


def fit_linear(results: list[dict]) -> str:
    """Least squares over the points of one mode: saved bytes = c0 + c1 x layers x tokens + c2 x tokens.
    c1 is the measured activation bytes per decoder layer and token; it is printed beside the model's
    figure, with each point's residual (how linear the growth with depth is)."""
    import numpy as np

    if len({r["layers"] for r in results}) < 2 or len(results) < 4:
        return ""
    x = np.array([[1.0, r["layers"] * r["tokens"], r["tokens"]] for r in results])
    y = np.array([float(r["saved_measured"]) for r in results])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    lines = [
        f"fit ({results[0]['mode']}): saved = {coef[0] / 2**20:.2f} MiB + {coef[1]:,.0f} B x layers x tokens "
        f"+ {coef[2]:,.0f} B x tokens; model: {results[0]['per_token_layer_predicted']:,} B per layer and token"
    ]
    for r, p in zip(results, pred, strict=True):
        lines.append(
            f"  layers {r['layers']} seq {r['seq']:>5}: measured {r['saved_measured'] / 2**20:8.1f} MiB, "
            f"fit {p / 2**20:8.1f}, residual {100 * (r['saved_measured'] - p) / r['saved_measured']:+.3f}%"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--validate", action="store_true", help="measure on CPU at the real width (fp32, few layers)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument(
        "--seq", type=int, nargs="+", help="sequence lengths (table: 1024 2048 4096; validate: 256 512 1024)"
    )
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.validate:
        results = validate(args.layers, args.seq or (256, 512, 1024), args.modes)
    else:
        results = table(args.seq or SEQS)
        print(format_table(results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
