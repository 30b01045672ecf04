"""`higgs-tune verify MODEL`: does this checkpoint load and behave like a Higgs Audio model?

For users with real weights (v2 or v3, family detected from config.json), one short run on the
machine they train on:

1. strict load (every weight of the checkpoint maps onto the model; nothing missing or extra),
   plus an adapter/checkpoint folder when given;
2. one teacher-forced forward on a bundled clip (examples/data/demo), encoded with the model's
   own codec and laid out by the family's training layout: audio loss and accuracy per
   codebook, and how often the end-of-audio label (v2 stream EOS, v3 EOC) is predicted;
3. a short greedy generation of the clip's text: did it stop by itself, how many frames;
4. peak memory (CUDA allocator, else the process's peak RSS).

It prints a block of plain text a user can paste into an issue, ending in a one-line verdict.
A model at chance level (loss near ln of the codebook size) is random or mis-loaded.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from higgs_tune.app.demo import demo_data_dir
from higgs_tune.config import DataConfig, LossConfig
from higgs_tune.data.prepare import encode_batch
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, generate_speech, load_codec_audio
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.train.loss import make_loss_module

CHANCE_SHARE = 0.8  # an audio loss above 80% of ln(codebook size) counts as "at chance"


@dataclass
class VerifyResult:
    model: str
    adapter: str | None
    family: str
    device: str
    dtype: str
    num_parameters: int
    load_seconds: float
    clip: str
    clip_frames: int
    audio_loss: float
    chance_loss: float
    per_codebook_loss: list[float]
    per_codebook_acc: list[float]
    end_correct: int
    end_total: int
    end_correct_per_codebook: list[int]
    end_total_per_codebook: list[int]
    stopped: bool
    generated_frames: int
    generated_seconds: float
    max_frames: int
    peak_memory: str
    notes: list[str] = field(default_factory=list)

    @property
    def at_chance(self) -> bool:
        return self.audio_loss >= CHANCE_SHARE * self.chance_loss

    @property
    def verdict(self) -> str:
        problems = []
        if self.at_chance:
            problems.append(
                f"audio loss {self.audio_loss:.2f} is at chance (ln {round(math.exp(self.chance_loss))} = "
                f"{self.chance_loss:.2f}): random or mis-loaded weights, or a codec that is not the model's"
            )
        if not self.stopped:
            problems.append(f"generation did not stop within {self.max_frames} frames")
        if not problems:
            return "OK: the model loads strictly, predicts the bundled clip far below chance and stops by itself."
        return "PROBLEM: " + "; ".join(problems) + "."

    def render(self) -> str:
        cb = lambda xs, f: "[" + ", ".join(f.format(x) for x in xs) + "]"  # noqa: E731
        end = f"{self.end_correct}/{self.end_total}" if self.end_total else "n/a"
        lines = [
            "higgs-tune verify",
            f"model:       {self.model}" + (f" + {self.adapter}" if self.adapter else ""),
            f"family:      {self.family} · {self.num_parameters / 1e6:.1f} M parameters · "
            f"{self.dtype} on {self.device}",
            f"environment: torch {torch.__version__} · python {platform.python_version()}",
            f"load:        strict, {self.load_seconds:.1f} s",
            f"forward:     bundled clip {self.clip} ({self.clip_frames} frames), teacher-forced",
            f"  audio loss {self.audio_loss:.3f} (chance {self.chance_loss:.2f})",
            f"  loss per codebook     {cb(self.per_codebook_loss, '{:.2f}')}",
            f"  accuracy per codebook {cb(self.per_codebook_acc, '{:.2f}')}",
            f"  end-of-audio labels predicted: {end}; per codebook "
            + ", ".join(
                f"{c}/{t}" for c, t in zip(self.end_correct_per_codebook, self.end_total_per_codebook, strict=True)
            ),
            f"generation:  greedy, at most {self.max_frames} frames: "
            + (f"stopped after {self.generated_frames} frames" if self.stopped else "did NOT stop")
            + f" ({self.generated_seconds:.2f} s of audio)",
            f"peak memory: {self.peak_memory}",
            *[f"note:        {n}" for n in self.notes],
            f"verdict:     {self.verdict}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**self.__dict__, "verdict": self.verdict}


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocator)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{kib / 2**20:.2f} GiB (process peak RSS)"


def bundled_clip() -> tuple[str, str, Path]:
    """(id, text, audio path) of the first clip of the bundled demo manifest."""
    folder = demo_data_dir()
    row = json.loads((folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return row["id"], row["text"], folder / row["audio"]


@torch.no_grad()
def verify_model(
    model: str,
    adapter: str | None = None,
    *,
    family: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_frames: int = 250,
) -> VerifyResult:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    stack = load_inference_stack(model, adapter, device=device, dtype=dtype, family=family)
    load_seconds = time.perf_counter() - tic
    fam, processor, tokens = stack.family, stack.processor, stack.tokens

    clip_id, text, audio = bundled_clip()
    codec = processor.audio_tokenizer
    wave = load_codec_audio(audio, codec.config.sample_rate, what="bundled clip")
    codes = torch.from_numpy(encode_batch(codec, [wave])[0].astype(np.int64))
    entry = SimpleNamespace(id=clip_id, text=text, scene=None, num_frames=int(codes.shape[1]))
    sample = fam.sample_layout(DataConfig()).build(
        entry, processor.tokenizer, tokens, target_codes=codes, ref_codes=None, ref_text=None, reference=None
    )
    batch = fam.collator(tokens, processor)([sample])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss_module = make_loss_module(fam, stack.model, LossConfig(text_weight=0.0, audio_weight=1.0))
    out = loss_module(**batch)
    p = out.predictions
    end = p.audio_target == tokens.stream_eos
    spec = fam.health_spec(
        (stack.model.get_base_model() if hasattr(stack.model, "get_base_model") else stack.model).config
    )

    options = SamplingOptions(temperature=0.0, ras_win_len=None, max_new_tokens=max_frames, seed=0)
    [gen] = generate_speech(
        stack.model, processor, tokens, [GenerationRequest(text=text, id="verify")], options, family=fam
    )
    param = next(stack.model.parameters())
    return VerifyResult(
        model=str(model),
        adapter=str(adapter) if adapter else None,
        family=fam.name,
        device=str(device),
        dtype=str(param.dtype).replace("torch.", ""),
        num_parameters=sum(x.numel() for x in stack.model.parameters()),
        load_seconds=load_seconds,
        clip=clip_id,
        clip_frames=int(codes.shape[1]),
        audio_loss=float(out.audio_loss),
        chance_loss=spec.audio_chance_loss,
        per_codebook_loss=[float(x) for x in out.per_codebook_loss],
        per_codebook_acc=[float(x) for x in out.per_codebook_acc],
        end_correct=int(((p.audio_pred == p.audio_target) & end).sum()),
        end_total=int(end.sum()),
        end_correct_per_codebook=((p.audio_pred == p.audio_target) & end).sum(0).tolist(),
        end_total_per_codebook=end.sum(0).tolist(),
        stopped=gen.stopped,
        generated_frames=gen.num_frames,
        generated_seconds=gen.duration_s,
        max_frames=max_frames,
        peak_memory=_peak_memory(device),
        notes=list(stack.notes),
    )
