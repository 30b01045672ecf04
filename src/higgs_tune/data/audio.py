"""Reading clips and turning them into what the codec expects: mono float32 at its sample rate.

One code path serves validation and encoding, so what `prepare` checks is what it encodes:

    read_audio(path)            -> (samples (N, C) float32, sample_rate)   raises AudioReadError
    inspect_audio(path, ...)    -> AudioInfo (duration, peak, content hash, 24 kHz length) + problems
    to_codec_input(x, sr, ...)  -> (N',) float32 at the codec's rate

Sample rates and channel counts are converted, never rejected: channels are averaged
(mono mix), then soxr resamples (quality "HQ") to the codec rate (24 kHz for Higgs).

Loudness normalisation (`normalize_loudness`, off by default) is deliberately simple:
scale the clip so its RMS over the whole clip is -20 dBFS, then, if that pushes the peak
above -1 dBFS, scale down so the peak sits at -1 dBFS (no limiter, no compression, no
K-weighting). It evens out recordings made at very different levels; it does not make
clips with long pauses sound equally loud (pauses lower the RMS).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

DEFAULT_MIN_SECONDS = 0.3
DEFAULT_MAX_SECONDS = 30.0
# Peak below this (after the mono mix) counts as silence: -60 dBFS = 0.001 of full scale.
SILENCE_DBFS = -60.0
LOUDNESS_RMS_DBFS = -20.0
LOUDNESS_PEAK_DBFS = -1.0
RESAMPLER = "soxr-HQ"


class AudioReadError(Exception):
    """A file that cannot be decoded; the message says why (not found, not audio, truncated)."""


def dbfs(amplitude: float) -> float:
    """Amplitude (1.0 = full scale) in dBFS; -inf for 0."""
    return 20.0 * math.log10(amplitude) if amplitude > 0 else -math.inf


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a whole file with soundfile -> (samples (N, C) float32, sample_rate).

    Raises AudioReadError with a one-line reason for a missing, unreadable or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise AudioReadError("file not found")
    if not path.is_file():
        raise AudioReadError("not a file")
    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        # libsndfile's own words ("Format not recognised", "flac decoder lost sync"), minus the path.
        reason = str(e).replace(f"Error opening {str(path)!r}: ", "").strip()
        raise AudioReadError(f"cannot decode ({reason})") from e
    except OSError as e:
        raise AudioReadError(f"cannot read ({e.strerror or e})") from e
    return samples, int(sample_rate)


def content_sha256(samples: np.ndarray, sample_rate: int) -> str:
    """sha256 of the decoded audio: rate, shape and float32 samples (N, C).

    Decoded content, not file bytes: the same recording saved as WAV and FLAC hashes the same,
    which is what "reference equal to target" and the cache's incremental re-runs need.
    """
    h = hashlib.sha256()
    h.update(f"{sample_rate}:{samples.shape[0]}x{samples.shape[1]}:".encode())
    h.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return h.hexdigest()


def mono(samples: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) float32 by averaging channels."""
    return samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]


def normalize_loudness(x: np.ndarray) -> np.ndarray:
    """RMS to -20 dBFS, then down to a -1 dBFS peak if needed (see module docstring). x: (N,)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms == 0.0:
        return x
    gain = 10 ** (LOUDNESS_RMS_DBFS / 20) / rms
    peak = float(np.max(np.abs(x))) * gain
    ceiling = 10 ** (LOUDNESS_PEAK_DBFS / 20)
    if peak > ceiling:
        gain *= ceiling / peak
    return (x * gain).astype(np.float32)


def to_codec_input(samples: np.ndarray, sample_rate: int, target_rate: int, loudness: bool = False) -> np.ndarray:
    """(N, C) at sample_rate -> (N',) float32 at target_rate: mono mix, soxr resample, optional loudness."""
    x = mono(samples)
    if sample_rate != target_rate:
        x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    if loudness:
        x = normalize_loudness(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocessing_signature(target_rate: int, loudness: bool) -> dict:
    """What turns a decoded file into codec input; part of each clip's cache key."""
    return {
        "mono": "mean",
        "resampler": RESAMPLER,
        "sample_rate": target_rate,
        "loudness": f"rms{LOUDNESS_RMS_DBFS:g}dBFS-peak{LOUDNESS_PEAK_DBFS:g}dBFS" if loudness else None,
    }


@dataclass(frozen=True)
class AudioInfo:
    """What validation learned about one decoded file."""

    path: Path
    sample_rate: int
    channels: int
    num_samples: int  # at the file's own rate
    duration_s: float
    peak_dbfs: float  # after the mono mix
    sha256: str  # content_sha256 of the decoded samples
    codec_samples: int  # length after mono mix + resampling to the codec rate


def inspect_audio(
    path: str | Path,
    *,
    target_rate: int,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> tuple[AudioInfo | None, list[tuple[str, str]]]:
    """Decode `path` and check it. Returns (info or None, [(problem, fix), ...]).

    Checks, in order: decodable; not empty; finite samples (no NaN/Inf); duration within
    [min_seconds, max_seconds]; not silence-only (peak of the mono mix below -60 dBFS).
    """
    try:
        samples, sr = read_audio(path)
    except AudioReadError as e:
        fix = (
            "correct the path or remove the row"
            if str(e) == "file not found"
            else "re-export the file (WAV or FLAC) or remove the row"
        )
        return None, [(str(e), fix)]
    n = samples.shape[0]
    if n == 0:
        return None, [("has no samples (empty audio)", "re-export the file or remove the row")]
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int(samples.size - finite.sum())
        return None, [(f"has {bad} NaN/Inf sample(s)", "re-export the file from its source or remove the row")]
    problems: list[tuple[str, str]] = []
    duration = n / sr
    if duration < min_seconds:
        problems.append(
            (
                f"is too short: {duration:.3f} s < {min_seconds:g} s",
                f"use clips of at least {min_seconds:g} s, lower --min-seconds, or remove the row",
            )
        )
    elif duration > max_seconds:
        problems.append(
            (
                f"is too long: {duration:.2f} s > {max_seconds:g} s",
                f"split it into clips of at most {max_seconds:g} s, raise --max-seconds, or remove the row",
            )
        )
    x = mono(samples)
    peak = dbfs(float(np.max(np.abs(x))))
    if peak < SILENCE_DBFS:
        problems.append(
            (
                f"is silence only: peak {peak:.1f} dBFS < {SILENCE_DBFS:g} dBFS",
                "check the recording (wrong channel, muted input) or remove the row",
            )
        )
    codec_samples = len(to_codec_input(samples, sr, target_rate)) if sr != target_rate else n
    info = AudioInfo(
        path=Path(path),
        sample_rate=sr,
        channels=samples.shape[1],
        num_samples=n,
        duration_s=duration,
        peak_dbfs=peak,
        sha256=content_sha256(samples, sr),
        codec_samples=codec_samples,
    )
    return info, problems
