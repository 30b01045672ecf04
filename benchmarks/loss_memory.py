"""Loss memory: heads applied at the scored positions only vs the full heads over B x L.

What is compared (forward + backward of the loss w.r.t. the hidden states, float32, CPU):
  baseline  "full heads": what `HiggsAudioV2ForConditionalGeneration.forward` does with labels:
            text_lm_head and audio_lm_head over every position, (B, L, 128256) and (B, L, 8 x 1026)
            logits, then the shifted CE with -100 masking.
  candidate "scored rows": `higgs_tune.train.loss.scored_head_losses`, the code the loss module
            runs: gather the P text rows and M audio rows whose next label is set, heads on them only.
Real head sizes (hidden 3072, text vocab 128,256, 8 codebooks x 1026) with random weights and
random hidden states (no model); one row of L = 512 and 2048 tokens laid out like a TTS sample:
35% prompt, then one target audio segment (delay pattern: codebook k scored on T codes + its
EOS), text labels on <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>. The heads are frozen (as in
LoRA); a trainable text head adds the same 1.6 GB weight gradient to both sides.

How memory is measured: each sequence length runs in its own subprocess, the two settings
interleaved. Before every call the process's peak RSS is reset (`/proc/self/clear_refs` = 5) and
the current RSS read; after the call, peak (VmHWM) minus that RSS is the call's peak extra memory
(weights and inputs excluded). The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so every
tensor of 64 KiB or more is its own mmap and goes back to the OS when freed: RSS then follows
live tensors and a later call cannot reuse pages cached by an earlier one. Linux only.
Both settings must give the same loss (checked, rel 1e-4), so the comparison is like for like.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import row

HIDDEN, VOCAB, K, CODEBOOK = 3072, 128_256, 8, 1026
IGNORE = -100
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- worker (subprocess)
def _layout(seq: int, generator):
    """labels (1, L), expanded audio labels (1, L, K) of one TTS-like row."""
    import torch

    labels = torch.full((1, seq), IGNORE, dtype=torch.long)
    audio = torch.full((1, seq, K), IGNORE, dtype=torch.long)
    start = int(0.35 * seq)  # first audio column; <|audio_out_bos|> sits just before it
    columns = seq - 3 - start  # then <|audio_eos|>, <|eot_id|>, one pad
    frames = columns - (K + 1)  # T + 2 + (K - 1) columns for T frames
    codes = torch.randint(0, 1024, (K, frames), generator=generator)
    for k in range(K):
        audio[0, start + k + 1 : start + k + 1 + frames, k] = codes[k]
        audio[0, start + k + 1 + frames, k] = CODEBOOK - 1  # the one EOS label per codebook
    labels[0, start - 1] = 128_013  # <|audio_out_bos|> (ids as in Llama-3 / Higgs; any in-range id works)
    labels[0, start + columns] = 128_012  # <|audio_eos|>
    labels[0, start + columns + 1] = 128_009  # <|eot_id|>
    return labels, audio


def _full_heads(hidden, labels, audio, text_head, audio_head):
    """The HF forward's way: logits at every position, shifted CE per row, -100 masked."""
    import torch.nn.functional as F

    B, L, _ = hidden.shape
    text_logits = text_head(hidden).float()  # (B, L, V)
    text = F.cross_entropy(text_logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    audio_logits = audio_head(hidden).float().view(B, L, K, CODEBOOK)  # (B, L, K, C)
    per_cb = [
        F.cross_entropy(audio_logits[:, :-1, k].reshape(-1, CODEBOOK), audio[:, 1:, k].reshape(-1), ignore_index=IGNORE)
        for k in range(K)
    ]
    return text + sum(per_cb) / K


def _scored_rows(hidden, labels, audio, text_head, audio_head):
    from higgs_tune.train.loss import scored_head_losses

    h = scored_head_losses(hidden, labels, audio, text_head, audio_head, K, CODEBOOK, shift=1)
    return h.text_ce_sum / h.n_text + (h.audio_ce_sum / h.n_audio).mean()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn) -> tuple[float, float, float]:
    """(peak extra MiB, seconds, loss) of one forward+backward."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") - before
    return peak / 1024, seconds, float(loss)


def worker(seq: int, repeats: int, warmup: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seq)
    text_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    audio_head = torch.nn.Linear(HIDDEN, K * CODEBOOK, bias=False).requires_grad_(False)
    with torch.no_grad():
        text_head.weight.normal_(0, HIDDEN**-0.5, generator=g)
        audio_head.weight.normal_(0, HIDDEN**-0.5, generator=g)
    hidden = torch.randn(1, seq, HIDDEN, generator=g).requires_grad_(True)
    labels, audio = _layout(seq, g)
    fns = {
        "full": lambda: _full_heads(hidden, labels, audio, text_head, audio_head),
        "scored": lambda: _scored_rows(hidden, labels, audio, text_head, audio_head),
    }
    results = {name: {"mib": [], "s": [], "loss": None} for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():  # interleaved: a slow phase of the machine hits both
            hidden.grad = None
            mib, s, loss = _measure(fn)
            if i >= warmup:
                results[name]["mib"].append(mib)
                results[name]["s"].append(s)
            results[name]["loss"] = loss
    n_audio = int((audio[:, 1:] != IGNORE).any(-1).sum())
    return {"seq": seq, "scored_audio_rows": n_audio, "threads": torch.get_num_threads(), **results}


# ---------------------------------------------------------------------- driver
def _run_case(seq: int, repeats: int, warmup: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.loss_memory", "--worker", str(seq), str(repeats), str(warmup)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loss_memory worker (seq {seq}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# seq -> (repeats, warmup). The full heads at L=2048 cost ~3 TFLOP per fwd+bwd (20-40 s on 2
# cores): quick mode runs L=512 only, and no warm-up call is spent at 2048 (its first call
# carries no measurable one-off cost next to that).
PLAN = {False: {512: (5, 1), 2048: (3, 0)}, True: {512: (1, 0)}}


def run(quick: bool = False) -> list[dict]:
    """Rows: peak extra memory and time of the loss (fwd+bwd), full heads vs scored rows; L = 512
    and 2048 (quick: 512 only)."""
    rows = []
    for seq, (repeats, warmup) in PLAN[quick].items():
        r = _run_case(seq, repeats, warmup)
        full, scored = r["full"], r["scored"]
        if abs(full["loss"] - scored["loss"]) > 1e-4 * abs(full["loss"]):
            raise RuntimeError(f"seq {seq}: full-head loss {full['loss']} != scored-rows loss {scored['loss']}")
        base_mib, cand_mib = statistics.median(full["mib"]), statistics.median(scored["mib"])
        note = (
            f"B=1, L={seq}, {r['scored_audio_rows']} scored audio rows + 3 text rows; fwd+bwd wrt hidden, fp32, "
            f"{r['threads']} threads; median of {repeats}; peak RSS above the pre-call RSS"
        )
        target = "<= 0.1x (>= 10x less)"
        rows.append(
            row(
                "loss",
                "loss peak MiB",
                "full heads B x L x V",
                "scored rows only",
                base_mib,
                cand_mib,
                target=target,
                met=cand_mib <= 0.1 * base_mib,
                note=note,
            )
        )
        rows.append(
            row(
                "loss",
                "loss fwd+bwd s",
                "full heads B x L x V",
                "scored rows only",
                statistics.median(full["s"]),
                statistics.median(scored["s"]),
                note=f"L={seq}, median of {repeats}",
            )
        )
    return rows


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        seq, repeats, warmup = (int(x) for x in argv[1:4])
        print(json.dumps(worker(seq, repeats, warmup)), flush=True)
        return 0
    from benchmarks.__main__ import format_table

    print(format_table(run(quick="--quick" in argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
