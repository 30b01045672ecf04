"""`python -m benchmarks [--quick] [--only NAME[,NAME]] [--json PATH]`: one table of ratios.

Runs each benchmark module's `run(quick)` in this process, one after the other, and prints
every row in one table (see `benchmarks/__init__.py` for the row format). The audio-attention
ablation trains two models and is slow: it runs only when named (`--only ablation`).
A benchmark that raises is reported after the table and makes the exit status 1; the
others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
import warnings

from benchmarks import ROW_KEYS

# short name -> module; the order is the order of the table
BENCHMARKS = {
    "data": "benchmarks.data_pipeline",
    "padding": "benchmarks.padding",
    "loss": "benchmarks.loss_memory",
    "train_step": "benchmarks.train_step",
    "checkpoint": "benchmarks.checkpoint_speed",
    "gpu": "benchmarks.gpu_real_arch",
    "ablation": "benchmarks.ablation_audio_attention",
}
ONLY_WHEN_NAMED = {"ablation"}
# module file names work as well as the short names
ALIASES = {m.rsplit(".", 1)[1]: name for name, m in BENCHMARKS.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line() -> str:
    import torch

    cpu = f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host CPU {cpu}"
    return f"CPU only: {cpu}"


def _fmt_value(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """All rows as one aligned text table; unknown keys are appended to the note."""
    header = ["benchmark", "metric", "baseline", "candidate", "base", "cand", "ratio", "target", "met", "note"]
    lines = []
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ROW_KEYS}
        note = r.get("note", "") or ""
        if extra:
            note = (note + "; " if note else "") + ", ".join(f"{k}={_fmt_value(v)}" for k, v in extra.items())
        ratio = r.get("ratio")
        lines.append(
            [
                str(r.get("benchmark", "")),
                str(r.get("metric", "")),
                str(r.get("baseline", "")),
                str(r.get("candidate", "")),
                _fmt_value(r.get("base_value")),
                _fmt_value(r.get("cand_value")),
                f"{ratio:.2f}x"
                if isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
                else _fmt_value(ratio),
                str(r.get("target", "") or ""),
                {True: "yes", False: "NO", None: ""}.get(r.get("met"), str(r.get("met"))),
                note,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the note column is not padded
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


def resolve(only: list[str] | None) -> list[str]:
    if not only:
        return [n for n in BENCHMARKS if n not in ONLY_WHEN_NAMED]
    names = []
    for item in only:
        for name in filter(None, (s.strip() for s in item.split(","))):
            name = ALIASES.get(name, name)
            if name not in BENCHMARKS:
                known = ", ".join(BENCHMARKS)
                raise SystemExit(f"unknown benchmark {name!r}; known: {known}")
            if name not in names:
                names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (~2 min on 2 CPU cores)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (comma-separated or repeated): {', '.join(BENCHMARKS)}",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the rows and run details as JSON")
    args = ap.parse_args(argv)
    names = resolve(args.only)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # transformers 5.x deprecation notices (gradient_checkpointing_enable, ...) are not results
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    if not torch.cuda.is_available():
        # ratios on a shared CPU are steadier with one thread; every setting runs with the same one
        torch.set_num_threads(1)
    started = datetime.datetime.now().astimezone()
    command = (
        "python -m benchmarks" + (" --quick" if args.quick else "") + "".join(f" --only {n}" for n in (args.only or []))
    )
    print(f"# {command}", flush=True)
    print(f"# device: {device_line()}", flush=True)
    print(f"# date: {started.isoformat(timespec='seconds')}", flush=True)

    rows: list[dict] = []
    failures: list[tuple[str, str]] = []
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"# running {name} ...", flush=True)
        try:
            module = importlib.import_module(BENCHMARKS[name])
            got = module.run(quick=args.quick)
        except Exception:  # a broken benchmark is reported, the others still run
            failures.append((name, traceback.format_exc()))
            got = []
        seconds[name] = time.perf_counter() - t0
        for r in got:
            r.setdefault("benchmark", name)
        rows += got
        print(f"# {name}: {len(got)} row(s) in {seconds[name]:.1f} s", flush=True)

    print()
    print(format_table(rows))
    total = sum(seconds.values())
    print(f"\n# total {total:.1f} s ({', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())})")
    for name, tb in failures:
        print(f"\n# FAILED: {name}\n{tb}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "command": command,
                    "device": device_line(),
                    "date": started.isoformat(timespec="seconds"),
                    "seconds": seconds,
                    "rows": rows,
                    "failed": [n for n, _ in failures],
                },
                f,
                indent=2,
                default=str,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
