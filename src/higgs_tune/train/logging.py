"""Metrics out of a run: a console line, `metrics.jsonl` (always), TensorBoard, wandb/trackio.

    logger = MetricsLogger(run_dir, cfg.logging.report_to, accelerator.is_main_process,
                           resume_step=resumed_step_or_None, config=cfg.to_dict())
    metrics = reduce_metrics(step_metrics.pop(), accelerator)   # EVERY rank (a collective)
    metrics.update(lr=..., grad_norm=..., tokens_per_s=...)
    logger.log(step, metrics)                                    # "train"; eval: split="eval"
    logger.log_warning(w)  /  logger.log_preview(preview)  /  logger.close()

metrics.jsonl: one JSON object per line, UTF-8 (Arabic stays readable), in append mode:
    {"event": "metrics", "step": 10, "split": "train", "time": 1767225600.123, "loss": ..., ...}
    {"event": "warning", "step": 3, "code": "no_eos", "count": 1, "last_step": 3, "message": ..., "details": {...}}
    {"event": "preview", "step": 0, "split": "train", "samples": [...]}
Non-finite floats are written as null (JSON has no NaN). On resume (`resume_step=S`) the lines
with step > S (written after the checkpoint that is resumed) and a torn last line are removed
first, so the continued file has each step once. A fresh run refuses a non-empty metrics.jsonl.

Only the main process writes anything; the others keep the same API as no-ops. A tracker that
is asked for but not installed is an error at construction, on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.markup import escape

from higgs_tune.config import ConfigError
from higgs_tune.errors import OutputDirError
from higgs_tune.runfs import METRICS_FILE, TENSORBOARD_DIR, atomic_write_text
from higgs_tune.train.loss import STAT_KEYS, WEIGHTS_KEY, finalize_metrics

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # name -> module to import
PROJECT = "higgs-tune"


# ---------------------------------------------------------------------- cross-rank reduction
def reduce_metrics(metrics: Mapping, accelerator=None) -> dict:
    """Step metrics over all ranks: token-weighted means, summed counts (one all-reduce).

    metrics: `StepMetrics.pop()` / `LossOutput.stats()` — the additive `STAT_KEYS` (sums of CE,
    correct predictions and token counts, on any device) and `loss_weights` — plus any other
    scalar (e.g. a local timing), which is averaged over ranks. The sums are all-reduced with
    `accelerator.reduce(..., "sum")` and only then divided, so a rank with 3 audio tokens weighs
    3/103 next to a rank with 100, not 1/2. Returns `finalize_metrics` keys + the averaged extras,
    identical on every rank. Every rank must call it at the same step. accelerator=None or a
    single process: no communication.
    """
    weights = metrics[WEIGHTS_KEY]
    extras = {k: v for k, v in metrics.items() if k not in STAT_KEYS and k != WEIGHTS_KEY}
    for key, value in extras.items():
        if isinstance(value, (list, tuple, dict)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
            raise TypeError(
                f"reduce_metrics: extra metric {key!r} must be a scalar (it is averaged over ranks), got "
                f"{type(value).__name__}."
            )
    multi = accelerator is not None and accelerator.num_processes > 1
    device = accelerator.device if multi else torch.device("cpu")
    parts = [torch.as_tensor(metrics[k]).detach().to(device=device, dtype=torch.float64).reshape(-1) for k in STAT_KEYS]
    parts.append(torch.tensor([float(v) for v in extras.values()], dtype=torch.float64, device=device))
    packed = torch.cat(parts)  # (n_stats + n_extras,)
    if multi:
        packed = accelerator.reduce(packed, reduction="sum")
    packed = packed.cpu()
    sums, offset = {}, 0
    # strict=False: parts ends with the extras block, which is read after the loop
    for key, part in zip(STAT_KEYS, parts, strict=False):
        sums[key] = packed[offset : offset + part.numel()]
        offset += part.numel()
    sums[WEIGHTS_KEY] = weights
    out = finalize_metrics(sums)
    world = accelerator.num_processes if multi else 1
    out.update({k: float(v) / world for k, v in zip(extras, packed[offset:].tolist(), strict=True)})
    return out


# ---------------------------------------------------------------------- helpers
def _clean(value):
    """JSON-able Python values: tensors -> numbers/lists, non-finite floats -> None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _scalars(metrics: Mapping, prefix: str):
    """(tag, float) pairs for trackers: lists become tag/0, tag/1, ...; None and strings skipped."""
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{prefix}/{key}/{i}", float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


def truncate_after(path: Path, step: int) -> tuple[int, int]:
    """Keep the records of `path` with step <= `step` (and those without a step); drop the rest
    and any line that does not parse (a write torn by a crash). Atomic. Returns (kept, dropped)."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept), dropped


def format_line(step: int, metrics: Mapping, split: str = "train") -> str:
    """The compact console line: step, loss, text, audio, mean codebook accuracy, tok/s, lr, grad norm."""
    parts = [f"{split} step {step:>6d}"]

    def add(key, label, fmt):
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {fmt.format(value)}")

    add("loss", "loss", "{:.4f}")
    add("text_loss", "text", "{:.3f}")
    add("audio_loss", "audio", "{:.3f}")
    acc = metrics.get("per_codebook_acc")
    if acc:
        parts.append(f"cb acc {sum(acc) / len(acc):.3f}")
    add("tokens_per_s", "tok/s", "{:,.0f}")
    add("lr", "lr", "{:.2e}")
    add("grad_norm", "gnorm", "{:.3f}")
    return " | ".join(parts)


def _check_report_to(report_to: Sequence[str]) -> list[str]:
    names = [n for n in report_to if n != "none"]
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"logging.report_to: {name!r} is not one of {', '.join(TRACKERS)}, none.")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(
                f"logging.report_to names {name} but the `{TRACKERS[name]}` package is not installed: "
                f"`pip install {TRACKERS[name]}`, or remove {name} from logging.report_to."
            )
    if problems:
        raise ConfigError(problems)
    return names


# ---------------------------------------------------------------------- the logger
class MetricsLogger:
    """Console + metrics.jsonl + trackers for one run folder; no-ops off the main process."""

    def __init__(
        self,
        run_dir: str | Path,
        report_to: Sequence[str] = ("tensorboard",),
        is_main_process: bool = True,
        *,
        resume_step: int | None = None,
        run_name: str | None = None,
        config: dict | None = None,
        console=None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.is_main_process = is_main_process
        self.trackers = _check_report_to(report_to)
        self._file = None
        self._tb = None
        self._wandb = None
        self._trackio = None
        if not is_main_process:
            return
        from rich.console import Console

        # soft_wrap: one log event stays one line, whatever the terminal width
        self.console = console or Console(highlight=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            if resume_step is None:
                raise OutputDirError(
                    f"{self.path} already holds metrics of an earlier run. Resume that run (its records "
                    "after the resumed step are then removed), or use a new checkpoint.output_dir."
                )
            kept, dropped = truncate_after(self.path, resume_step)
            if dropped:
                self.console.print(
                    f"metrics.jsonl: resumed at step {resume_step}, removed {dropped} record(s) written after it",
                    markup=False,
                    soft_wrap=True,
                )
        self._file = open(self.path, "a", encoding="utf-8")
        name = run_name or self.run_dir.name
        if "tensorboard" in self.trackers:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events after the resumed step, like the JSONL truncation
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        if "wandb" in self.trackers:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                name=name,
                dir=str(self.run_dir),
                config=config,
                resume="allow",
            )
        if "trackio" in self.trackers:
            import trackio

            trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=config, resume="allow")
            self._trackio = trackio

    # ------------------------------------------------------------------ writing
    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
        self._file.flush()  # a crash loses at most the line being written (truncate_after drops it)

    def log(self, step: int, metrics: Mapping, split: str = "train") -> None:
        """One log event: console line, a metrics.jsonl record, tracker scalars under `split/`."""
        if not self.is_main_process:
            return
        metrics = _clean(dict(metrics))
        self._write({"event": "metrics", "step": step, "split": split, "time": round(time.time(), 3), **metrics})
        self.console.print(format_line(step, metrics, split), markup=False, soft_wrap=True)
        scalars = list(_scalars(metrics, split))
        if self._tb is not None:
            for tag, value in scalars:
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(scalars), step=step)
        if self._trackio is not None:
            self._trackio.log(dict(scalars), step=step)

    def log_warning(self, warning) -> None:
        """A `HealthWarning`: console (yellow) + {"event": "warning", ...} record (+ TensorBoard text)."""
        if not self.is_main_process:
            return
        self._write(warning.record())
        self.console.print(
            f"[yellow]warning {warning.code}[/yellow] (step {warning.step}): {escape(warning.message)}", soft_wrap=True
        )
        if self._tb is not None:
            self._tb.add_text(f"warnings/{warning.code}", warning.message, warning.step)

    def log_preview(self, preview) -> None:
        """A `Preview`: its text on the console, its record in metrics.jsonl (+ TensorBoard text)."""
        if not self.is_main_process:
            return
        self._write(preview.record)
        self.console.print(preview.text, markup=False, soft_wrap=True)
        if self._tb is not None:
            # four leading spaces: a Markdown code block keeps the table aligned
            self._tb.add_text(
                f"{preview.record.get('split', 'train')}/preview",
                "\n".join("    " + line for line in preview.text.splitlines()),
                preview.record["step"],
            )

    def log_audio(self, step: int, name: str, wav, sample_rate: int) -> None:
        """A generated sample to the trackers that take audio (TensorBoard, wandb); the WAV file
        itself is written by the caller and listed in a "samples" record of metrics.jsonl."""
        if not self.is_main_process:
            return
        if self._tb is not None:
            self._tb.add_audio(f"samples/{name}", torch.as_tensor(wav).reshape(1, -1), step, sample_rate=sample_rate)
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"samples/{name}": wandb.Audio(wav, sample_rate=sample_rate)}, step=step)

    def log_event(self, event: str, step: int, **fields) -> None:
        """Any other record (e.g. "checkpoint", "resume"), metrics.jsonl only."""
        if self.is_main_process:
            self._write({"event": event, "step": step, "time": round(time.time(), 3), **fields})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._trackio is not None:
            self._trackio.finish()
            self._trackio = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
