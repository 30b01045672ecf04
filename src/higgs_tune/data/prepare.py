"""`prepare`: manifest -> validated clips -> audio codes in a cache folder, encoded once.

    result = prepare_manifest("data/manifest.jsonl", "models/higgs", "cache/train")

Order of work (cheap checks first, nothing written before the data is known to be good):
  1. the cache folder: foreign files, damaged index, or a cache of another codec -> refuse
     (another codec only with overwrite);
  2. load the audio tokenizer, fingerprint it (config + weights);
  3. validate the manifest: every row, every audio file (`manifest.validate_manifest`);
     strict mode raises one error listing all problems and writes nothing;
  4. encode the clips whose content key is not in the cache yet, in batches, writing a
     shard (and the index) every `shard_size` clips; finally the entries and rejects.jsonl.

Batching and the codec's missing padding mask
---------------------------------------------
`HiggsAudioV2TokenizerModel.encode` takes no padding mask. Zero-padding a clip in a batch
changes its codes: the semantic branch (HuBERT) normalises over time (GroupNorm in its first
conv) and attends globally, so the padding leaks into every frame; and the acoustic branch
pads its input by half a hop or not depending on the (padded) length, which shifts all
acoustic frames of a clip whose own length would take the other path. So `plan_batches`:
  - batches only clips with the same frame count and the same acoustic path, so no clip
    gains frames from padding and none is shifted;
  - pads at most `pad_tolerance_s` (default 0.04 s = one codec frame) beyond the shortest
    clip of a batch; clips of equal length always batch exactly (padding 0);
  - `batch_seconds` caps the padded audio per codec call (memory); 0 encodes one by one.
Each clip's codes are then cut to its own frame count (`codec_num_frames`, the codec's
exact length rule, checked against the codec's output on every call).
Measured on the bundled demo data (26 clips, tiny codec; test_batched_vs_single_encoding_agreement):
with the default tolerance 8 of 11,280 codes (0.07 %) differ from one-by-one encoding;
padding freely to the longest clip of sorted batches of 8 changes 261 (2.3 %).
`--pad-tolerance 0` gives codes identical to one-by-one encoding (what the processor
computes for a reference clip at inference time), batching only clips of equal length.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from higgs_tune.data.audio import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_MIN_SECONDS,
    AudioReadError,
    preprocessing_signature,
    read_audio,
    to_codec_input,
)
from higgs_tune.data.cache import CacheWriter, now_iso, own_file, read_index
from higgs_tune.data.manifest import validate_manifest
from higgs_tune.errors import DataError, ModelLoadError
from higgs_tune.progress import Progress, as_progress

DEFAULT_BATCH_SECONDS = 60.0
DEFAULT_PAD_TOLERANCE_S = 0.04
DEFAULT_SHARD_SIZE = 256
# The codec pads its 16 kHz input by 160 samples on each side before HuBERT
# (HiggsAudioV2TokenizerModel._extract_semantic_features, transformers 5.24).
SEMANTIC_PAD = 160


# ---------------------------------------------------------------------------- the codec


def load_audio_tokenizer(model: str | Path, device: str | torch.device = "cpu"):
    """HiggsAudioV2TokenizerModel from `<model>/audio_tokenizer/`, or `<model>` if it is one.

    Local folders; anything else is tried as a Hub id of an audio tokenizer. Eval mode, float32.
    """
    from transformers import HiggsAudioV2TokenizerModel  # lazy: `higgs-tune --help` imports this module

    path = Path(model)
    if (path / "audio_tokenizer" / "config.json").is_file():
        source = path / "audio_tokenizer"
    elif (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(
                f"{path / 'config.json'} is not valid JSON ({e}). Fix: restore the model folder."
            ) from None
        if model_type != "higgs_audio_v2_tokenizer":
            raise ModelLoadError(
                f"{path} has no audio_tokenizer/ folder and is not an audio tokenizer (model_type {model_type!r}). "
                "Fix: pass the model folder that contains audio_tokenizer/, or the audio tokenizer folder itself."
            )
        source = path
    elif path.exists():
        raise ModelLoadError(
            f"{path} has no config.json. Fix: pass a Higgs Audio v2 model folder (with audio_tokenizer/) or an "
            "audio tokenizer folder."
        )
    else:
        source = str(model)
    try:
        codec = HiggsAudioV2TokenizerModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the audio tokenizer from {source}: {e}. Fix: pass a local model folder with "
            "audio_tokenizer/ (see `higgs-tune make-tiny`)."
        ) from None
    return codec.eval().to(device)


def codec_num_frames(config, num_samples: int) -> int:
    """Frames the codec outputs for `num_samples` samples at its rate: its semantic branch decides.

    HiggsAudioV2TokenizerModel.encode resamples to 16 kHz (torchaudio: ceil(n * 16/24)),
    pads 160 samples each side, runs HuBERT's conv stack (no padding) and keeps every
    `semantic_downsample_factor`-th frame. For Higgs (hop 960, 25 fps) this is ceil(n / 960)
    except up to 118 samples (5 ms) past a multiple of 960, where it is one frame less:
    9600 -> 10, 9601 -> 10, 9718 -> 10, 9719 -> 11.
    """
    sr, ssr = config.sample_rate, config.semantic_sample_rate
    n = num_samples
    if sr != ssr:
        g = math.gcd(sr, ssr)
        n = -(-n * (ssr // g) // (sr // g))  # ceil, in integers
    n += 2 * SEMANTIC_PAD
    sem = config.semantic_model_config
    for kernel, stride in zip(sem.conv_kernel, sem.conv_stride, strict=True):
        n = (n - kernel) // stride + 1
    return -(-n // config.semantic_downsample_factor)


def acoustic_pads(codec, num_samples: int) -> bool:
    """True if the codec pads this length by half a hop before its acoustic encoder."""
    return codec._get_conv1d_output_lengths(num_samples, codec.acoustic_encoder) != codec_num_frames(
        codec.config, num_samples
    )


# Config keys that say how a codec was saved or loaded, not what it computes: a codec read from a
# folder has `architectures` and `dtype` set, the same weights built from a config dict (v3's
# bundled codec) have None. The weights' dtypes are hashed with the weights.
_CODEC_METADATA_KEYS = (
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_commit_hash",
)
_LEGACY_METADATA_KEYS = ("_name_or_path", "transformers_version")  # caches written before 2026-12-03


def codec_fingerprints(codec) -> tuple[str, str]:
    """The fingerprints a cache made by this codec may record: today's (`codec_fingerprint`) first,
    then that of caches prepared before the metadata keys were left out (they stay usable with the
    codec that made them). One pass over the weights, two config normalisations."""

    def clean(obj, drop):
        if isinstance(obj, dict):
            return {k: clean(v, drop) for k, v in obj.items() if k not in drop}
        return obj

    config = codec.config.to_dict()
    hashes = [
        hashlib.sha256(json.dumps(clean(config, drop), sort_keys=True, default=str).encode())
        for drop in (_CODEC_METADATA_KEYS, _LEGACY_METADATA_KEYS)
    ]
    for name, t in sorted(codec.state_dict().items()):
        t = t.detach().cpu().contiguous()
        head = f"{name}:{t.dtype}:{tuple(t.shape)}".encode()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        for h in hashes:
            h.update(head)
            h.update(data)
    return hashes[0].hexdigest(), hashes[1].hexdigest()


def codec_fingerprint(codec) -> str:
    """sha256 over what the codec computes: its config (minus names, versions, architectures and
    the config's dtype) and every weight and buffer (names, dtypes, shapes, bytes). Equal for the
    same codec however it was loaded (a v2 tokenizer folder, or v3's bundled copy)."""
    return codec_fingerprints(codec)[0]


def encode_batch(codec, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Encode clips (each (N_i,) float32 at the codec rate) in one call -> int16 (K, T_i) each.

    Clips are zero-padded on the right to the longest; each clip's codes are cut to
    codec_num_frames(N_i). The codec's output length is checked against that rule.
    """
    config = codec.config
    longest = max(len(w) for w in waves)
    x = torch.zeros(len(waves), 1, longest)  # (B, 1, N) the codec's input layout
    for i, w in enumerate(waves):
        x[i, 0, : len(w)] = torch.from_numpy(w)
    device = next(codec.parameters()).device
    with torch.inference_mode():
        codes = codec.encode(x.to(device), return_dict=False).cpu()  # (B, K, T)
    expected = codec_num_frames(config, longest)
    if codes.shape[-1] != expected or codes.shape[1] != config.num_quantizers:
        raise ModelLoadError(
            f"the audio tokenizer returned codes of shape {tuple(codes.shape)} for {longest} samples; higgs-tune "
            f"expects ({len(waves)}, {config.num_quantizers}, {expected}). This codec's length rule differs from "
            "HiggsAudioV2TokenizerModel's in transformers 5.24. Fix: use that transformers version, or a Higgs "
            "Audio v2 audio tokenizer."
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size):
        raise ModelLoadError(
            f"the audio tokenizer returned codes outside 0..{config.codebook_size - 1}. Fix: check the audio "
            "tokenizer's config (codebook_size)."
        )
    return [codes[i, :, : codec_num_frames(config, len(w))].numpy().astype(np.int16) for i, w in enumerate(waves)]


def plan_batches(
    lengths: list[int],
    group_of: Callable[[int], tuple],
    *,
    sample_rate: int,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    pad_tolerance_s: float = DEFAULT_PAD_TOLERANCE_S,
) -> list[list[int]]:
    """Split clip indices into codec calls (see the module docstring for why).

    lengths: samples per clip at the codec rate. group_of(length) -> clips may share a batch
    only if equal (frame count, acoustic padding path). Within a group clips are sorted by
    length; a batch closes when the next clip is more than pad_tolerance_s longer than its
    first clip, or when the padded audio (longest x count) would exceed batch_seconds.
    batch_seconds <= 0: one clip per call.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if batch_seconds <= 0:
        return [[i] for i in order]
    tolerance = round(pad_tolerance_s * sample_rate)
    budget = batch_seconds * sample_rate
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in order:
        groups[group_of(lengths[i])].append(i)
    batches = []
    for members in groups.values():
        batch: list[int] = []
        for i in members:
            if batch and (lengths[i] - lengths[batch[0]] > tolerance or lengths[i] * (len(batch) + 1) > budget):
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    return sorted(batches, key=lambda b: lengths[b[0]])


# ---------------------------------------------------------------------------- prepare


@dataclass
class PrepareResult:
    cache_dir: Path
    entries: int  # training clips in the cache
    rejected: int  # rows written to rejects.jsonl
    encoded: int  # distinct clips (targets and references) encoded in this run
    reused: int  # distinct clips whose codes were already in the cache
    codec_calls: int
    encode_seconds: float  # wall time of decoding + encoding the new clips
    audio_seconds: float  # duration of the newly encoded audio
    shards_written: list[str] = field(default_factory=list)
    shards_removed: list[str] = field(default_factory=list)  # no longer used by any entry
    shards_dropped: list[str] = field(default_factory=list)  # damaged/missing, re-encoded

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.entries} clips in {self.cache_dir}", f"{self.encoded} encoded", f"{self.reused} reused"]
        if self.encoded:
            parts.append(
                f"{self.clips_per_second:.1f} clips/s, {self.audio_seconds / self.encode_seconds:.1f}x real time"
            )
        if self.rejected:
            parts.append(f"{self.rejected} rejected -> {self.cache_dir / 'rejects.jsonl'}")
        return "prepared " + ", ".join(parts)


def _check_cache_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """Refuse a path that is a file or a folder holding files prepare did not write.

    Returns the folder's index (None if there is none). A damaged index is refused unless
    overwrite, which rebuilds the folder anyway.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file. Fix: give a folder for the code cache.")
    if not out_dir.is_dir():
        return None
    foreign = sorted(p.name for p in out_dir.iterdir() if not own_file(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DataError(
            f"{out_dir} holds files that `higgs-tune prepare` did not write ({shown}). Fix: choose an empty or new "
            "folder for the code cache."
        )
    try:
        return read_index(out_dir)
    except DataError:
        if overwrite:
            return None
        raise


def _command(manifest: Path, model: str | Path, out_dir: Path, opts: dict) -> str:
    """The CLI line that (re)builds this cache; error messages quote it."""
    flags = [f"higgs-tune prepare {manifest} --model {model} --out {out_dir}"]
    flags += [
        f"--{k.replace('_', '-')}" for k in ("skip_invalid", "normalize_loudness", "allow_outside_root") if opts[k]
    ]
    flags += [
        f"--{k.replace('_', '-')} {opts[k]:g}"
        for k, d in (("min_seconds", DEFAULT_MIN_SECONDS), ("max_seconds", DEFAULT_MAX_SECONDS))
        if opts[k] != d
    ]
    if opts.get("language"):
        flags.append(f"--language {opts['language']}")
    return " ".join(flags)


def prepare_manifest(
    manifest: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    skip_invalid: bool = False,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    pad_tolerance_s: float = DEFAULT_PAD_TOLERANCE_S,
    normalize_loudness: bool = False,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    allow_outside_root: bool = False,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | None = None,
    progress: Progress | bool = True,
    log: Callable[[str], None] = lambda msg: None,
    load_codec: Callable | None = None,
    language: str | None = None,
) -> PrepareResult:
    """Validate `manifest`, encode its clips with the audio tokenizer of `model_dir`, write `out_dir`.

    Strict by default: any bad row raises one ManifestError listing every problem, and
    nothing is written. skip_invalid: the valid rows are prepared and the others listed in
    rejects.jsonl. Re-running is incremental (only clips whose content key is new are
    encoded) and resumes an interrupted run. A cache written with another codec is refused
    unless overwrite (which rebuilds from scratch in any case). `log` receives notes
    (dropped shards, rebuilds) for the user. `load_codec(model_dir, device)`: the model family's
    codec loader (`families.select.load_codec_for`: a v3 checkpoint's bundled codec); default
    `load_audio_tokenizer`. `language` fills rows that name none (else they are recorded as
    manifest.UNKNOWN_LANGUAGE).
    """
    progress = as_progress(progress)  # True: a bar on a terminal, periodic lines otherwise
    manifest = Path(os.path.abspath(manifest))
    out_dir = Path(os.path.abspath(out_dir))
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}. Fix: use e.g. {DEFAULT_SHARD_SIZE}.")
    if pad_tolerance_s < 0:
        raise DataError(
            f"--pad-tolerance must be >= 0 seconds, got {pad_tolerance_s:g}. Fix: use 0 (exact) or e.g. "
            f"{DEFAULT_PAD_TOLERANCE_S:g}."
        )
    # 1. the cache folder, before anything slow
    previous = _check_cache_dir(out_dir, overwrite)

    # 2. the codec
    model_ref = os.path.abspath(model_dir) if Path(model_dir).exists() else str(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    codec = (load_codec or load_audio_tokenizer)(model_dir, device)
    config = codec.config
    sample_rate = config.sample_rate
    fingerprint, legacy_fingerprint = codec_fingerprints(codec)
    header = {
        "codec_fingerprint": fingerprint,
        "num_codebooks": config.num_quantizers,
        "codebook_size": config.codebook_size,
        "frame_rate": config.frame_rate,
        "sample_rate": sample_rate,
        "codec_source": model_ref,
        "preprocessing": preprocessing_signature(sample_rate, normalize_loudness),
        "manifest": str(manifest),
        "command": _command(
            manifest,
            model_ref,
            out_dir,
            dict(
                skip_invalid=skip_invalid,
                normalize_loudness=normalize_loudness,
                allow_outside_root=allow_outside_root,
                min_seconds=min_seconds,
                max_seconds=max_seconds,
                language=language,
            ),
        ),
        "created": now_iso(),
    }
    if previous is not None:
        old = previous["header"]
        differs = [k for k in ("num_codebooks", "codebook_size", "sample_rate") if old.get(k) != header[k]]
        if old.get("codec_fingerprint") == legacy_fingerprint:
            header["codec_fingerprint"] = legacy_fingerprint  # the same codec: keep what the cache records
        elif old.get("codec_fingerprint") != fingerprint:
            differs.insert(0, "codec_fingerprint")
        if differs and not overwrite:
            what = ", ".join(f"{k} {old.get(k)!r} vs {header[k]!r}" for k in differs)
            raise DataError(
                f"{out_dir} holds codes of another audio tokenizer ({what}; made from "
                f"{old.get('codec_source')!r}). Its codes cannot be mixed with those of {model_dir}. Fix: pass "
                "--overwrite to rebuild it, or choose another --out."
            )

    # 3. validation: all problems at once, nothing written in strict mode
    validation = validate_manifest(
        manifest,
        target_rate=sample_rate,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        allow_outside_root=allow_outside_root,
        progress=progress,
        default_language=language,
    )
    validation.raise_if_invalid(cache_dir=out_dir, skip_invalid=skip_invalid)
    for warning in validation.warnings:  # kept, but the user hears of it
        log(f"warning: {warning.format(validation.manifest.name)}")
    rows = validation.rows
    infos = validation.audio

    # A clip's key: its decoded content + how it is turned into codec input.
    signature = json.dumps(header["preprocessing"], sort_keys=True)

    def key_of(path: Path) -> str:
        return hashlib.sha256(f"{infos[path].sha256}|{signature}".encode()).hexdigest()[:32]

    needed: dict[str, Path] = {}  # key -> a file with that content; targets first, then references
    for row in rows:
        needed.setdefault(key_of(row.audio_path), row.audio_path)
    for row in rows:
        if row.ref_audio_path is not None:
            needed.setdefault(key_of(row.ref_audio_path), row.ref_audio_path)

    # 4. encode what the cache lacks
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        log(f"--overwrite: rebuilding {out_dir} from scratch")
        for p in out_dir.iterdir():
            p.unlink()  # only files prepare wrote: _check_cache_dir refused anything else
        previous = None
    writer = CacheWriter(out_dir, header, previous)
    for name in writer.dropped_shards:
        log(f"{out_dir / name} was missing or damaged; its clips are encoded again")
    todo = [(k, p) for k, p in needed.items() if k not in writer.known_keys]
    lengths = [infos[p].codec_samples for _, p in todo]
    batches = plan_batches(
        lengths,
        lambda n: (codec_num_frames(config, n), acoustic_pads(codec, n)),
        sample_rate=sample_rate,
        batch_seconds=batch_seconds,
        pad_tolerance_s=pad_tolerance_s,
    )
    shards_written: list[str] = []
    pending: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    progress.start(len(todo), "encoding", "clips")
    done = 0
    try:
        for batch in batches:
            waves = []
            for i in batch:
                key, path = todo[i]
                try:
                    samples, sr = read_audio(path)
                except AudioReadError as e:  # the file changed or vanished since validation
                    raise DataError(
                        f"{path} could not be read again after validation ({e}). Fix: do not modify the dataset "
                        "while prepare runs; run it again."
                    ) from e
                wave = to_codec_input(samples, sr, sample_rate, loudness=normalize_loudness)
                if len(wave) != lengths[i]:
                    raise DataError(
                        f"{path} changed while prepare was running ({len(wave)} samples, validated {lengths[i]}). "
                        "Fix: run prepare again."
                    )
                waves.append(wave)
            for i, codes in zip(batch, encode_batch(codec, waves), strict=True):
                pending[todo[i][0]] = codes
            done += len(batch)
            progress.update(done, clips_per_s=done / max(time.perf_counter() - start, 1e-9))
            if len(pending) >= shard_size:
                shards_written.append(writer.add_shard(pending))
                pending = {}
        if pending:
            shards_written.append(writer.add_shard(pending))
    finally:
        progress.close()
    encode_seconds = time.perf_counter() - start

    entries = []
    for row in rows:
        info = infos[row.audio_path]
        key = key_of(row.audio_path)
        entries.append(
            {
                "id": row.id,
                "key": key,
                "speaker": row.speaker,
                "text": row.text,
                "language": row.language,
                "scene": row.scene,
                "ref_key": key_of(row.ref_audio_path) if row.ref_audio_path is not None else None,
                "ref_text": row.ref_text,
                "duration_s": round(info.duration_s, 6),
                "num_frames": writer.num_frames(key),
                "audio": row.audio,
                "sha256": info.sha256,
                "ref_audio": row.ref_audio,
                "text_source": row.text_source,
                "row": row.row,
            }
        )
    removed = writer.finish(entries, validation.rejects)
    return PrepareResult(
        cache_dir=out_dir,
        entries=len(entries),
        rejected=len(validation.rejects),
        encoded=len(todo),
        reused=len(needed) - len(todo),
        codec_calls=len(batches),
        encode_seconds=encode_seconds,
        audio_seconds=sum(lengths) / sample_rate,
        shards_written=shards_written,
        shards_removed=removed,
        shards_dropped=writer.dropped_shards,
    )
