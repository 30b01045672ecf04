"""Full fine-tuning in bf16: how many weight updates survive rounding, side by side.

    python benchmarks/bf16_precision.py                      # lr 2e-5, 40 steps, 3 settings
    python benchmarks/bf16_precision.py --steps 20 --lr 2e-5 1e-4 --json out.json

A small model of the real layout (HiggsAudioV2ForConditionalGeneration, hidden 64, 2 layers,
8 x 1026 audio codes, init std 0.02 as transformers initialises), the training loss module, one
fixed real-layout batch, full fine-tuning with AdamW at the same learning rate, three settings:

- `bf16`: bf16 weights, torch AdamW (states bf16, no master copy): `model.dtype: bfloat16`.
- `fp32-master`: float32 weights under bf16 autocast (the forward runs in bf16, the update is
  applied to float32 weights): `model.dtype: float32` + `train.mixed_precision: bf16`.
- `bf16-sr`: bf16 weights, torchao `_AdamW(bf16_stochastic_round=True)` (float32 maths, the new
  weight rounded up or down at random in proportion: unbiased): `train.optimizer: adamw_bf16_sr`.

Per step (median over the steps): the fraction of trainable weight elements whose value changed,
counted on the bf16 value the forward uses (for fp32-master also on the float32 weights), among
the weights this step's gradient reaches (unused embedding rows get none) and among all; the share
of weights whose bf16 value differs from the start after all steps; the loss. An AdamW step moves
each weight by about lr; a bf16 weight of magnitude |w| has a spacing of |w| x 2^-7, so at lr 2e-5
every weight above ~0.005 in magnitude (and every norm weight, 1.0) rounds back to itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SETTINGS = ("bf16", "fp32-master", "bf16-sr")


def build(setting: str, seed: int = 0):
    from benchmarks import tiny_text_stack
    from benchmarks.gpu_real_arch import ArchSpec, build_model, make_batch
    from higgs_tune.config import LossConfig
    from higgs_tune.train.loss import HiggsLossModule

    tokenizer, tokens = tiny_text_stack()
    spec = ArchSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=2048,
    )
    torch.manual_seed(seed)
    model = build_model(spec, tokens, torch.float32, "cpu")  # same initial values for every setting
    if setting in ("bf16", "bf16-sr"):
        model = model.to(torch.bfloat16)
    batch = make_batch(128, 2, tokens, tokenizer, seed=seed)
    return model, HiggsLossModule(model, LossConfig(text_weight=1.0)), batch


def make_optimizer(setting: str, params, lr: float):
    if setting == "bf16-sr":
        from torchao.optim import _AdamW

        return _AdamW(params, lr=lr, weight_decay=0.0, bf16_stochastic_round=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def run_setting(setting: str, steps: int, lr: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model, loss_module, batch = build(setting, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(setting, params, lr)
    n = sum(p.numel() for p in params)
    autocast = setting == "fp32-master"
    losses, changed_bf16, changed_fp32, changed_of_graded = [], [], [], []
    start_bf16 = [p.detach().to(torch.bfloat16).clone() for p in params]
    t0 = time.perf_counter()
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_module(**batch).loss
        loss.backward()
        graded = [p.grad != 0 for p in params]  # weights this step's gradient reaches (unused embedding rows get none)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        changed_bf16.append(
            sum(
                int((b.to(torch.bfloat16) != p.detach().to(torch.bfloat16)).sum())
                for b, p in zip(before, params, strict=True)
            )
            / n
        )
        changed_fp32.append(sum(int((b != p.detach()).sum()) for b, p in zip(before, params, strict=True)) / n)
        n_graded = sum(int(g.sum()) for g in graded)
        changed_of_graded.append(
            sum(
                int(((b.to(torch.bfloat16) != p.detach().to(torch.bfloat16)) & g).sum())
                for b, p, g in zip(before, params, graded, strict=True)
            )
            / max(1, n_graded)
        )
    moved = sum(int((s != p.detach().to(torch.bfloat16)).sum()) for s, p in zip(start_bf16, params, strict=True)) / n
    return {
        "setting": setting,
        "lr": lr,
        "steps": steps,
        "trainable": n,
        "losses": losses,
        "changed_per_step_bf16": changed_bf16,
        "changed_per_step_weights": changed_fp32,
        "changed_of_graded_bf16": changed_of_graded,
        "median_changed_of_graded_bf16": statistics.median(changed_of_graded),
        "median_changed_bf16": statistics.median(changed_bf16),
        "median_changed_weights": statistics.median(changed_fp32),
        "changed_since_start_bf16": moved,
        "seconds": time.perf_counter() - t0,
    }


def format_results(results: list[dict]) -> str:
    lines = []
    for lr in sorted({r["lr"] for r in results}):
        rs = [r for r in results if r["lr"] == lr]
        lines.append(f"lr {lr:g}, {rs[0]['steps']} steps, {rs[0]['trainable']:,} trainable weights")
        lines.append(
            f"  {'setting':<12} {'of weights with a gradient':>27} {'changed/step (bf16 value)':>26} "
            f"{'changed/step (weights)':>23} "
            f"{'changed since start':>20} {'loss first -> last':>22}"
        )
        for r in rs:
            lines.append(
                f"  {r['setting']:<12} {100 * r['median_changed_of_graded_bf16']:>26.2f}% "
                f"{100 * r['median_changed_bf16']:>25.2f}% {100 * r['median_changed_weights']:>22.2f}% "
                f"{100 * r['changed_since_start_bf16']:>19.2f}% {r['losses'][0]:>10.5f} -> {r['losses'][-1]:.5f}"
            )
        lines.append("  loss per step: " + "  ".join(r["setting"] for r in rs))
        for i in range(0, rs[0]["steps"], max(1, rs[0]["steps"] // 8)):
            lines.append(f"    step {i + 1:>3}: " + "  ".join(f"{r['losses'][i]:.5f}" for r in rs))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-5])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [run_setting(s, args.steps, lr) for lr in args.lr for s in args.settings]
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
