"""Voice-cloning generation with a base model + adapter (or a merged model): codes -> WAV.

Python API (also called by the training loop every `train.sample_steps`):

    stack = load_inference_stack("models/higgs", adapter="runs/x/final")   # infer/loading.py
    ref = encode_reference(stack.processor, "ref.wav")                       # (K, T) codes
    results = generate_speech(stack.model, stack.processor, stack.tokens,
                              [GenerationRequest(text="Hello.", ref_text="...", ref_codes=ref)],
                              SamplingOptions(temperature=0.7, seed=0))
    write_wav("out.wav", results[0].wav, stack.sample_rate)

Each prompt is built by the model family's layout function, the one that builds the training
samples (v2: `higgs_tune.data.layout.build_prompt`; v3: `families.v3.layout.build_v3_sample`),
so inference sees exactly the layout training used. Requests run one at a
time (a batch of one: no padding between prompts of different lengths can change a result),
each under its own seed (`seed + index`) inside a forked RNG, so a request's output does not
depend on the others and the caller's RNG streams (training!) are left untouched
(`seed=None`: the global RNG is used and advances, as with any sampling code).

What one generate step is: one audio *column* of the delay pattern (all K codebooks). A clip
of T frames takes T + K + 1 columns (a BOS column, the T frames spread over the K-step
delay, and the closing EOS column), so `max_new_tokens` counts columns. A generation that
used them all without producing the all-EOS column did not stop by itself:
`GenerationResult.stopped` is False and the CLI says so for that output.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from higgs_tune.data.audio import AudioReadError, read_audio, to_codec_input
from higgs_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Conversation
from higgs_tune.data.prepare import encode_batch
from higgs_tune.errors import DataError
from higgs_tune.families.base import GenerationError, ModelFamily
from higgs_tune.families.v2.generate import generate_v2_codes  # not families.v2: `--help` loads this module
from higgs_tune.progress import Progress

__all__ = ["GenerationError", "GenerationRequest", "GenerationResult", "SamplingOptions", "generate_speech"]


# ----------------------------------------------------------------------------- options and results
@dataclass
class SamplingOptions:
    """How tokens are drawn. temperature 0 = greedy (argmax per codebook)."""

    temperature: float = 0.7
    top_p: float | None = 0.95  # nucleus sampling; None or 1.0 = off
    top_k: int | None = 50  # None or 0 = off
    # Repetition-aware sampling (set on generation_config; the model's generate reads it there):
    # when a code was drawn >= ras_win_max_num_repeat times in the last ras_win_len columns,
    # it is re-drawn from the untempered distribution. None or 0 = off.
    ras_win_len: int | None = 7
    ras_win_max_num_repeat: int = 2
    max_new_tokens: int = 1024  # generated audio columns (T frames need T + K + 1); 25 per second at 25 fps
    seed: int | None = 0  # request i runs under seed + i; None = the global RNG as it is

    def validate(self) -> SamplingOptions:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.ras_win_len is not None and self.ras_win_len < 0:
            problems.append(f"ras_win_len must be >= 0 (0 = off), got {self.ras_win_len}")
        if self.ras_win_max_num_repeat < 1:
            problems.append(f"ras_win_max_num_repeat must be >= 1, got {self.ras_win_max_num_repeat}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise GenerationError("bad sampling options: " + "; ".join(problems) + ".")
        return self

    def generation_config(self, base, max_new_tokens: int):
        """A copy of the model's GenerationConfig with these options applied."""
        cfg = copy.deepcopy(base)
        greedy = self.temperature == 0
        cfg.do_sample = not greedy
        cfg.max_new_tokens = max_new_tokens
        cfg.max_length = None
        cfg.return_dict_in_generate = True  # audio_sequences come with the dict output only
        # Unset what does not apply, so transformers does not warn about ignored settings.
        cfg.temperature = None if greedy else self.temperature
        cfg.top_p = None if greedy or not self.top_p or self.top_p == 1.0 else self.top_p
        cfg.top_k = None if greedy or not self.top_k else self.top_k
        ras = bool(self.ras_win_len)
        cfg.ras_win_len = self.ras_win_len if ras else None
        cfg.ras_win_max_num_repeat = self.ras_win_max_num_repeat if ras else None
        return cfg

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationRequest:
    """One text to speak. Voice cloning when `ref_codes` (K, T) and `ref_text` are given, else plain TTS."""

    text: str
    ref_text: str | None = None
    ref_codes: torch.Tensor | None = None  # (K, T) long, values 0..codebook_size-1
    scene: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    id: str = ""

    def conversation(self) -> Conversation:
        if (self.ref_codes is None) != (self.ref_text is None):
            given = "ref_codes" if self.ref_codes is not None else "ref_text"
            raise GenerationError(
                f"request {self.id or self.text[:40]!r}: {given} without the other; voice cloning needs the "
                "reference codes and their transcript."
            )
        if self.ref_codes is None:
            return Conversation.tts(self.text, system_prompt=self.system_prompt, scene=self.scene)
        return Conversation.voice_clone(self.text, self.ref_text, system_prompt=self.system_prompt, scene=self.scene)


@dataclass
class GenerationResult:
    codes: torch.Tensor  # (K, T) long, the generated frames (delay pattern reverted, BOS/EOS removed)
    wav: np.ndarray  # (T * hop,) float32 at sample_rate
    stopped: bool  # True: the model closed the audio itself (all-EOS column) within the limit
    num_frames: int  # T
    sample_rate: int = 24000
    id: str = ""
    prompt_tokens: int = 0
    num_columns: int = 0  # audio columns generated (T + K + 1 when stopped)
    max_new_tokens: int = 0  # the limit applied (may be below the option: the context is finite)

    @property
    def duration_s(self) -> float:
        return len(self.wav) / self.sample_rate


# ----------------------------------------------------------------------------- generation
def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate_speech(
    model,
    processor,
    tokens,
    requests: Sequence[GenerationRequest],
    options: SamplingOptions | None = None,
    *,
    family: ModelFamily | None = None,
    progress: Progress | None = None,
    synced: bool = False,
) -> list[GenerationResult]:
    """Generate each request -> GenerationResult(codes (K, T), wav, stopped, num_frames).

    `model`: the family's model or a PeftModel around one (not a DDP wrapper: pass the
    unwrapped module). Its train/eval mode is restored afterwards. `processor`: text tokenizer +
    audio tokenizer (codec) for decoding. `family`: the model family (None: v2); its
    `generate_codes` builds the prompt and applies its stop rule. `progress` (higgs_tune.progress) is
    told after each request (the CLI's bar, a UI's callback).
    `synced`: `model` is sharded (FSDP) and every rank calls this with the same requests; the family's
    loop keeps the ranks' forward passes in step, and grad mode is plain `no_grad` (FSDP's gathered
    weights are not inference tensors). The caller gathers the root unit's weights (train.distributed).
    Raises GenerationError when a prompt does not fit the model's context with room for at
    least one frame.
    """
    generate_codes = family.generate_codes if family is not None else generate_v2_codes
    options = (options or SamplingOptions()).validate()
    device = _device(model)
    codec = processor.audio_tokenizer
    codec_device = next(codec.parameters()).device
    sample_rate = codec.config.sample_rate
    was_training = model.training
    model.eval()
    results = []
    progress = progress or Progress()
    progress.start(len(requests), "generating", "clips")
    try:
        for i, req in enumerate(requests):
            name = req.id or f"request {i + 1}"
            # A seeded request runs in a forked RNG (the caller's streams are untouched); without a
            # seed it draws from the global RNG like any other sampling code.
            seeded = options.seed is not None
            rng = (
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
                if seeded
                else contextlib.nullcontext()
            )
            with rng, torch.no_grad() if synced else torch.inference_mode():
                if seeded:
                    torch.manual_seed(options.seed + i)
                gen = generate_codes(model, processor, tokens, req, options, name, synced=synced)
            wav = decode_codes(codec, gen.codes, codec_device)
            results.append(
                GenerationResult(
                    codes=gen.codes,
                    wav=wav,
                    stopped=gen.stopped,
                    num_frames=int(gen.codes.shape[1]),
                    sample_rate=sample_rate,
                    id=req.id,
                    prompt_tokens=gen.prompt_tokens,
                    num_columns=gen.num_columns,
                    max_new_tokens=gen.max_new_tokens,
                )
            )
            progress.update(i + 1)
    finally:
        progress.close()
        model.train(was_training)
    return results


def decode_codes(codec, codes: torch.Tensor, device=None) -> np.ndarray:
    """(K, T) codes -> (T * hop,) float32 waveform with the audio tokenizer; T = 0 gives an empty array."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    device = device if device is not None else next(codec.parameters()).device
    with torch.inference_mode():
        audio = codec.decode(codes[None].to(device), return_dict=False)  # (1, 1, N)
    return audio.reshape(-1).float().cpu().numpy()


# ----------------------------------------------------------------------------- audio files
def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM mono WAV; samples are clipped to [-1, 1]. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    sf.write(str(path), data, int(sample_rate), subtype="PCM_16", format="WAV")
    return path


def load_codec_audio(path: str | Path, sample_rate: int, what: str = "reference audio") -> np.ndarray:
    """Read any soundfile-readable clip -> (N,) float32 mono at `sample_rate` (data.audio's path)."""
    path = Path(path)
    try:
        samples, sr = read_audio(path)
    except AudioReadError as e:
        fix = (
            "check the path (relative paths are relative to the current folder, or to the JSONL file in --batch)"
            if str(e) == "file not found"
            else "re-export it as WAV or FLAC"
        )
        raise DataError(f"{what} {path}: {e}. Fix: {fix}.") from None
    if samples.shape[0] == 0:
        raise DataError(f"{what} {path} has no samples. Fix: use a clip of speech (a few seconds).")
    finite = np.isfinite(samples)
    if not finite.all():
        raise DataError(
            f"{what} {path} has {int(samples.size - finite.sum())} NaN/Inf sample(s): the voice prompt would be noise. "
            "Fix: re-export the clip from its source."
        )
    return to_codec_input(samples, sr, sample_rate)


def encode_reference(processor, path: str | Path) -> torch.Tensor:
    """A reference clip -> (K, T) long codes, encoded alone (as the processor does at inference)."""
    codec = processor.audio_tokenizer
    wave = load_codec_audio(path, codec.config.sample_rate)
    return torch.from_numpy(encode_batch(codec, [wave])[0].astype(np.int64))
