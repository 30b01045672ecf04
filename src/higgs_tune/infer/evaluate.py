"""`higgs-tune evaluate`: voice-cloning quality on a held-out manifest -> results.json + results.csv.

For every clip of the manifest the model speaks the clip's text in the voice of a reference
clip of the same speaker; then:

- WER / CER: an ASR model (Whisper-style, loaded with transformers: `--asr-model`, default
  `openai/whisper-large-v3`) transcribes the output in the clip's language; transcript and
  text are normalised per language (`metrics.normalize_text`: Arabic letters unified,
  diacritics/tatweel/punctuation removed; English lower-cased, punctuation removed) and
  aligned word by word / character by character. Summary rates are corpus-level (all edits
  over all reference words), per clip and per language.
- speaker similarity: cosine of speaker embeddings (`WavLMForXVector`, `--speaker-model`,
  default `microsoft/wavlm-base-plus-sv`) of the reference clip (the voice prompt) and the
  output, as in Seed-TTS-eval; also against the ground-truth recording (`speaker_similarity_gt`).
  An output shorter than the x-vector model accepts (0.325 s for WavLM) has none (null, with a
  note in the clip's `notes`); `speaker_similarity_clips` counts the clips that have one.
- duration ratio: output duration / ground-truth duration.
- stop rate: the share of outputs that ended with the model's own end of audio.

The reference of a clip: its own `ref_audio`/`ref_text` when the manifest gives one, else
another clip of the same speaker from `--ref-manifest` (default: the evaluated manifest),
the next one in id order (cyclic), never a recording with the same content. A speaker with
no other clip is evaluated as plain TTS (no reference: `speaker_similarity` is null there).

Output folder: wavs/<id>.wav (the generated audio), results.json, results.csv. For the run
report, evaluate into `RUN_DIR/eval/` (the default when --adapter is a run's checkpoint).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector, AutoModelForSpeechSeq2Seq, AutoProcessor

from higgs_tune.data.audio import to_codec_input
from higgs_tune.data.manifest import validate_manifest
from higgs_tune.errors import DataError, ModelLoadError, OutputDirError
from higgs_tune.infer import metrics as M
from higgs_tune.infer.generate import (
    GenerationRequest,
    SamplingOptions,
    encode_reference,
    generate_speech,
    load_codec_audio,
    write_wav,
)
from higgs_tune.infer.loading import InferenceStack
from higgs_tune.model.hub import check_hub_source, hub_cache_dir
from higgs_tune.progress import Progress
from higgs_tune.runfs import (
    EVAL_DIR,
    METRICS_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    WAVS_DIR,
    atomic_write_bytes,
    claim,
    safe_file_stem,
)

DEFAULT_ASR_MODEL = "openai/whisper-large-v3"
DEFAULT_SPEAKER_MODEL = "microsoft/wavlm-base-plus-sv"
FORMAT = "higgs-tune-eval"
FORMAT_VERSION = 1
CSV_COLUMNS = (
    "id",
    "speaker",
    "language",
    "reference_id",
    "text",
    "transcript",
    "wer",
    "cer",
    "word_errors",
    "ref_words",
    "char_errors",
    "ref_chars",
    "speaker_similarity",
    "speaker_similarity_gt",
    "duration_s",
    "gt_duration_s",
    "duration_ratio",
    "stopped",
    "num_frames",
    "wav",
)
EVAL_SKIP_HINT = "pass --skip-invalid to evaluate the valid rows (the others are listed in results.json)"
# Whisper's encoder sees 30 s windows; longer outputs are transcribed with its long-form mode.
WHISPER_WINDOW_S = 30.0


def _resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """(N,) float32 at `rate` -> at `target`, with the toolkit's resampler (data.audio)."""
    return to_codec_input(np.asarray(wav, dtype=np.float32)[:, None], rate, target)


def _load_error(kind: str, name: str, option: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {kind} model {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        f"Fix: pass {option} with a local folder or a Hub id you can download (offline tests use "
        "`higgs_tune.tiny.eval_models.make_tiny_eval_models`)."
    )


# ----------------------------------------------------------------------------- ASR
class AsrModel:
    """A speech-to-text model loaded through transformers (WhisperForConditionalGeneration and
    other `AutoModelForSpeechSeq2Seq` models) with its processor."""

    def __init__(self, model, processor, name: str):
        self.model = model
        self.processor = processor
        self.name = name
        self.sample_rate = int(processor.feature_extractor.sampling_rate)
        self.is_whisper = model.config.model_type == "whisper"
        self.languages = set((getattr(model.generation_config, "lang_to_id", None) or {}).keys())

    @classmethod
    def load(cls, name: str | Path, device: str | torch.device = "cpu", *, option: str = "--asr-model") -> AsrModel:
        """`option`: the setting that named the model, for the error message."""
        local = check_hub_source(name, what="ASR model", option=option)  # offline: fail at once
        try:
            kw = {"local_files_only": True, "cache_dir": str(hub_cache_dir())} if local else {}
            processor = AutoProcessor.from_pretrained(str(name), **kw)
            model = AutoModelForSpeechSeq2Seq.from_pretrained(str(name), **kw).eval().to(device)
        except (OSError, ValueError) as e:
            raise _load_error("ASR", str(name), option, e) from e
        return cls(model, processor, str(name))

    def language_token(self, language: str | None) -> str | None:
        """Whisper's language code for a manifest language ("en", "ar", "ar-EG" -> "ar"); None for
        a model without language tokens (English-only Whisper, other ASR models)."""
        if not self.is_whisper or not self.languages or language is None:
            return None
        code = language.lower().replace("_", "-").split("-")[0]
        if f"<|{code}|>" not in self.languages:
            raise ModelLoadError(
                f"the ASR model {self.name} has no language token for {language!r} (<|{code}|>). Fix: use a "
                "multilingual Whisper model (--asr-model), or correct the manifest's language codes (ISO 639-1)."
            )
        return code

    @torch.inference_mode()
    def transcribe(
        self, wavs: Sequence[np.ndarray], language: str | None, *, batch_size: int = 8, max_new_tokens: int = 128
    ) -> list[str]:
        """Transcripts of mono float32 clips at `self.sample_rate`, all in one language."""
        code = self.language_token(language)
        device = self.model.device
        limit = getattr(self.model.config, "max_target_positions", None)
        if limit is not None:
            # Whisper's decoder holds max_target_positions tokens, its prompt included (~4)
            max_new_tokens = min(max_new_tokens, limit - 4)
        gen_config = copy.deepcopy(self.model.generation_config)
        gen_config.max_new_tokens = max_new_tokens
        gen_config.max_length = None
        out: list[str] = []
        for start in range(0, len(wavs), batch_size):
            chunk = [np.asarray(w, dtype=np.float32) for w in wavs[start : start + batch_size]]
            long_form = any(len(w) > WHISPER_WINDOW_S * self.sample_rate for w in chunk)
            kwargs = {"truncation": False, "padding": "longest"} if long_form else {}
            features = self.processor(
                chunk, sampling_rate=self.sample_rate, return_tensors="pt", return_attention_mask=True, **kwargs
            )
            inputs = {
                k: v.to(device)
                for k, v in features.items()
                if k in ("input_features", "attention_mask", "input_values")
            }
            if "input_features" in inputs:
                inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
            gen_kwargs = {}
            if code is not None:
                gen_kwargs.update(language=code, task="transcribe")
            if long_form:
                gen_kwargs["return_timestamps"] = True
            ids = self.model.generate(**inputs, generation_config=gen_config, **gen_kwargs)
            ids = ids["sequences"] if isinstance(ids, dict) else ids
            out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


# ----------------------------------------------------------------------------- speaker embeddings
class SpeakerModel:
    """`WavLMForXVector` (or any `AutoModelForAudioXVector`) + its feature extractor."""

    def __init__(self, model, feature_extractor, name: str):
        self.model = model
        self.feature_extractor = feature_extractor
        self.name = name
        self.sample_rate = int(feature_extractor.sampling_rate)

    @classmethod
    def load(
        cls, name: str | Path, device: str | torch.device = "cpu", *, option: str = "--speaker-model"
    ) -> SpeakerModel:
        """`option`: the setting that named the model, for the error message."""
        local = check_hub_source(name, what="speaker model", option=option)  # offline: fail at once
        try:
            kw = {"local_files_only": True, "cache_dir": str(hub_cache_dir())} if local else {}
            fe = AutoFeatureExtractor.from_pretrained(str(name), **kw)
            model = AutoModelForAudioXVector.from_pretrained(str(name), **kw).eval().to(device)
        except (OSError, ValueError) as e:
            raise _load_error("speaker", str(name), option, e) from e
        return cls(model, fe, str(name))

    @property
    def min_samples(self) -> int:
        """The shortest clip (samples at `sample_rate`) the model embeds: its conv front end and
        the x-vector TDNN's context (~0.3 s for WavLM) must fit, with two output frames left for
        the statistics pooling's standard deviation. Shorter clips have no embedding."""
        cfg = self.model.config
        context = sum((k - 1) * d for k, d in zip(cfg.tdnn_kernel, cfg.tdnn_dilation, strict=True))

        def frames(n: int) -> int:
            for k, stride in zip(cfg.conv_kernel, cfg.conv_stride, strict=True):
                n = (n - k) // stride + 1
            return n

        n = 1
        while frames(n) - context < 2:
            n += 1 if frames(n) < 1 else int(np.prod(cfg.conv_stride))
        while n > 1 and frames(n - 1) - context >= 2:  # the exact minimum below the last stride step
            n -= 1
        return n

    @torch.inference_mode()
    def embed(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """One embedding (D,) per mono float32 clip at `self.sample_rate`, computed clip by clip
        (padding would change the statistics pooling of a shorter clip); None for a clip shorter
        than `min_samples`."""
        out: list[np.ndarray | None] = []
        shortest = self.min_samples
        for w in wavs:
            if len(w) < shortest:
                out.append(None)
                continue
            x = self.feature_extractor(
                np.asarray(w, dtype=np.float32), sampling_rate=self.sample_rate, return_tensors="pt"
            )
            x = {k: v.to(self.model.device) for k, v in x.items()}
            out.append(self.model(**x).embeddings[0].float().cpu().numpy())
        return out


# ----------------------------------------------------------------------------- references
@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str
    speaker: str
    language: str
    audio_path: Path  # ground truth
    gt_duration_s: float
    scene: str | None
    ref_id: str | None  # None: plain TTS (no other clip of the speaker)
    ref_path: Path | None
    ref_text: str | None


def plan_items(rows, infos, pool_rows, pool_infos) -> list[EvalItem]:
    """Choose each row's reference (see the module docstring)."""
    by_speaker: dict[str, list] = {}
    for r in sorted(pool_rows, key=lambda r: r.id):
        by_speaker.setdefault(r.speaker, []).append(r)
    items = []
    for row in rows:
        gt = infos[row.audio_path]
        if row.ref_audio_path is not None:
            ref_id, ref_path, ref_text = Path(row.ref_audio).stem, row.ref_audio_path, row.ref_text
        else:
            candidates = [
                c
                for c in by_speaker.get(row.speaker, [])
                if c.audio_path != row.audio_path and pool_infos[c.audio_path].sha256 != gt.sha256
            ]
            if candidates:
                after = [c for c in candidates if c.id > row.id]
                chosen = after[0] if after else candidates[0]
                ref_id, ref_path, ref_text = chosen.id, chosen.audio_path, chosen.text
            else:
                ref_id = ref_path = ref_text = None
        items.append(
            EvalItem(
                row.id,
                row.text,
                row.speaker,
                row.language,
                row.audio_path,
                gt.duration_s,
                row.scene,
                ref_id,
                ref_path,
                ref_text,
            )
        )
    return items


def default_eval_dir(adapter: str | Path | None) -> Path | None:
    """RUN_DIR/eval when the adapter is a run's checkpoint folder (RUN_DIR has metrics.jsonl)."""
    if adapter is None:
        return None

    run_dir = Path(adapter).resolve().parent
    return run_dir / EVAL_DIR if (run_dir / METRICS_FILE).is_file() else None


def check_eval_out(out: str | Path) -> None:
    """evaluate writes results.json, results.csv and wavs/ into `out`: an earlier evaluation there
    is replaced; a results.json of another kind, or a results.csv / wavs/ without evaluate's
    results.json beside them, is refused (OutputDirError) before anything is generated."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file. Fix: give --out a folder for results.json, results.csv and wavs/.")
    if (out / RESULTS_JSON).is_file():
        try:
            read_results(out / RESULTS_JSON)
            return
        except DataError:
            raise OutputDirError(
                f"{out / RESULTS_JSON} exists and was not written by `higgs-tune evaluate`; it is left as it is. "
                "Fix: pass another --out folder."
            ) from None
    theirs = [name for name in (RESULTS_CSV, WAVS_DIR) if (out / name).exists()]
    if theirs:
        raise OutputDirError(
            f"{out} already has {' and '.join(theirs)} but no results.json of `higgs-tune evaluate`: evaluate would "
            "write over them. Fix: pass another --out folder."
        )


def _claim_run_eval_dir(out: Path) -> None:
    """RUN_DIR/eval created by evaluate is the run's: listed so that `train --overwrite` may remove it."""
    if out.name == EVAL_DIR and (out.parent / METRICS_FILE).is_file() and not out.exists():
        out.mkdir()
        claim(out.parent, EVAL_DIR)


# ----------------------------------------------------------------------------- the evaluation
def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def summarize_clips(clips: list[dict], word_counts: list, char_counts: list) -> dict:
    sims = [c["speaker_similarity"] for c in clips if c["speaker_similarity"] is not None]
    sims_gt = [c["speaker_similarity_gt"] for c in clips if c["speaker_similarity_gt"] is not None]
    ratios = [c["duration_ratio"] for c in clips]
    return {
        "num_clips": len(clips),
        "wer": _finite(M.corpus_rate(word_counts)),
        "cer": _finite(M.corpus_rate(char_counts)),
        "speaker_similarity": M.mean(sims),
        "speaker_similarity_clips": len(sims),  # clips with a voice prompt and an output long enough to embed
        "speaker_similarity_gt": M.mean(sims_gt),
        "duration_ratio": M.mean(ratios),
        "stop_rate": sum(c["stopped"] for c in clips) / len(clips) if clips else None,
    }


NO_REFERENCE_NOTE = "no other clip of this speaker: generated without a voice prompt (plain TTS)"


def too_short_note(duration_s: float, speaker: SpeakerModel) -> str:
    return (
        f"output of {duration_s:.2f} s is shorter than the speaker model's minimum "
        f"{speaker.min_samples / speaker.sample_rate:.2f} s: no speaker similarity"
    )


def transcribe_outputs(
    asr: AsrModel,
    languages: Sequence[str],
    wavs: Sequence[np.ndarray],
    rate: int,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
) -> list[str]:
    """One transcript per output (mono float32 at `rate`), one ASR pass per language (Whisper is
    told the language: no detection errors); an empty output has the empty transcript."""
    out = [""] * len(wavs)
    for language in dict.fromkeys(languages):
        idx = [k for k, lang in enumerate(languages) if lang == language and len(wavs[k])]
        texts = asr.transcribe(
            [_resample(wavs[k], rate, asr.sample_rate) for k in idx],
            language,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        for k, t in zip(idx, texts, strict=True):
            out[k] = t
    return out


def clip_record(
    clip_id: str,
    speaker: str,
    language: str,
    reference_id: str | None,
    text: str,
    transcript: str,
    res,
    gt_duration_s: float,
    *,
    sim: float | None,
    sim_gt: float | None,
    wav: str,
    notes: list,
) -> tuple[dict, M.EditCounts, M.EditCounts]:
    """(the clip's row of results.json, its word edits, its character edits); `res` a GenerationResult."""
    words = M.word_edits(text, transcript, language)
    chars = M.char_edits(text, transcript, language)
    record = {
        "id": clip_id,
        "speaker": speaker,
        "language": language,
        "reference_id": reference_id,
        "text": text,
        "transcript": transcript,
        "normalized_text": M.normalize_text(text, language),
        "normalized_transcript": M.normalize_text(transcript, language),
        "wer": _finite(words.rate()),
        "cer": _finite(chars.rate()),
        "word_errors": words.errors,
        "ref_words": words.ref_length,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "char_errors": chars.errors,
        "ref_chars": chars.ref_length,
        "speaker_similarity": sim,
        "speaker_similarity_gt": sim_gt,
        "duration_s": res.duration_s,
        "gt_duration_s": gt_duration_s,
        "duration_ratio": M.duration_ratio(res.duration_s, gt_duration_s),
        "stopped": res.stopped,
        "num_frames": res.num_frames,
        "wav": wav,
        "notes": notes,
    }
    return record, words, chars


def evaluate_manifest(
    stack: InferenceStack,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    asr: AsrModel,
    speaker: SpeakerModel,
    options: SamplingOptions | None = None,
    ref_manifest: str | Path | None = None,
    asr_batch_size: int = 8,
    asr_max_new_tokens: int = 128,
    limit: int | None = None,
    skip_invalid: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Generate every clip of `manifest`, score it, write results.json / results.csv / wavs; return the results dict.

    `limit`: the first N valid clips (N >= 1). `skip_invalid`: evaluate the valid rows of a
    manifest with bad rows (the results' `skipped` lists the others) instead of refusing it.
    `progress` (higgs_tune.progress) follows the generation, clip by clip."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 (the number of clips to evaluate), got {limit}. Fix: omit it for all.")
    options = (options or SamplingOptions()).validate()
    out = Path(out_dir)
    check_eval_out(out)
    rate = stack.sample_rate
    validation = validate_manifest(manifest, target_rate=rate)
    validation.raise_if_invalid(skip_invalid=skip_invalid, skip_hint=EVAL_SKIP_HINT)
    rows = validation.rows[:limit] if limit is not None else validation.rows
    if ref_manifest is not None:
        pool = validate_manifest(ref_manifest, target_rate=rate)
        pool.raise_if_invalid(skip_invalid=skip_invalid, skip_hint=EVAL_SKIP_HINT)
        pool_rows, pool_infos = pool.rows, pool.audio
    else:
        pool_rows, pool_infos = validation.rows, validation.audio
    items = plan_items(rows, validation.audio, pool_rows, pool_infos)

    t0 = time.monotonic()
    ref_codes: dict[Path, torch.Tensor] = {}
    requests = []
    for item in items:
        if item.ref_path is not None and item.ref_path not in ref_codes:
            ref_codes[item.ref_path] = encode_reference(stack.processor, item.ref_path)
        requests.append(
            GenerationRequest(
                text=item.text,
                ref_text=item.ref_text,
                ref_codes=ref_codes[item.ref_path] if item.ref_path is not None else None,
                scene=item.scene,
                id=item.id,
            )
        )
    results = generate_speech(
        stack.model, stack.processor, stack.tokens, requests, options, family=stack.family, progress=progress
    )
    gen_seconds = time.monotonic() - t0
    _claim_run_eval_dir(out)
    # file names from ids: escaped, so that no id (`../x`, `a/b`) names a file outside OUT/wavs
    wavs_dir = out / WAVS_DIR
    wav_paths = [
        write_wav(wavs_dir / f"{safe_file_stem(item.id)}.wav", res.wav, rate)
        for item, res in zip(items, results, strict=True)
    ]

    # ASR, one language at a time (Whisper is told the language: no detection errors).
    texts = transcribe_outputs(
        asr,
        [i.language for i in items],
        [r.wav for r in results],
        rate,
        batch_size=asr_batch_size,
        max_new_tokens=asr_max_new_tokens,
    )
    transcripts = {i.id: t for i, t in zip(items, texts, strict=True)}

    # Speaker embeddings of outputs, references and ground truths (each file once).
    file_embeddings: dict[Path, np.ndarray | None] = {}

    def file_embedding(path: Path) -> np.ndarray | None:
        if path not in file_embeddings:
            file_embeddings[path] = speaker.embed([load_codec_audio(path, speaker.sample_rate, "evaluation audio")])[0]
        return file_embeddings[path]

    clips, word_counts, char_counts = [], [], []
    for item, res, wav_path in zip(items, results, wav_paths, strict=True):
        sim = sim_gt = None
        notes = []
        emb = speaker.embed([_resample(res.wav, rate, speaker.sample_rate)])[0] if len(res.wav) else None
        if emb is None:
            notes.append(too_short_note(res.duration_s, speaker))
        else:
            gt_emb = file_embedding(item.audio_path)
            sim_gt = M.cosine_similarity(emb, gt_emb) if gt_emb is not None else None
            ref_emb = file_embedding(item.ref_path) if item.ref_path is not None else None
            sim = M.cosine_similarity(emb, ref_emb) if ref_emb is not None else None
        if item.ref_path is None:
            notes.append(NO_REFERENCE_NOTE)
        clip, words, chars = clip_record(
            item.id,
            item.speaker,
            item.language,
            item.ref_id,
            item.text,
            transcripts[item.id],
            res,
            item.gt_duration_s,
            sim=sim,
            sim_gt=sim_gt,
            wav=str(wav_path.relative_to(out)),
            notes=notes,
        )
        clips.append(clip)
        word_counts.append(words)
        char_counts.append(chars)

    per_language = {}
    for language in dict.fromkeys(c["language"] for c in clips):
        idx = [k for k, c in enumerate(clips) if c["language"] == language]
        per_language[language] = summarize_clips(
            [clips[k] for k in idx], [word_counts[k] for k in idx], [char_counts[k] for k in idx]
        )
    results_doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "summary": summarize_clips(clips, word_counts, char_counts),
        "per_language": per_language,
        "settings": {
            "manifest": str(Path(manifest)),
            "ref_manifest": str(ref_manifest) if ref_manifest is not None else None,
            "model": stack.base,
            "adapter": stack.adapter,
            "asr_model": asr.name,
            "speaker_model": speaker.name,
            "sampling": options.to_dict(),
            "generation_seconds": round(gen_seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "clips": clips,
    }
    if skip_invalid:
        results_doc["settings"]["skipped_rows"] = validation.rejects
    write_results(out, results_doc)
    return results_doc


def write_results(out: Path, doc: dict) -> tuple[Path, Path]:
    """results.json (everything) and results.csv (one row per clip, CSV_COLUMNS), UTF-8."""

    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / RESULTS_JSON, out / RESULTS_CSV
    atomic_write_bytes(json_path, (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for clip in doc["clips"]:
        writer.writerow({k: ("" if clip[k] is None else clip[k]) for k in CSV_COLUMNS})
    atomic_write_bytes(csv_path, buf.getvalue().encode("utf-8"))
    return json_path, csv_path


def read_results(path: str | Path) -> dict:
    """A results.json written by `evaluate`; DataError naming the file otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found. Fix: run `higgs-tune evaluate` with --out {path.parent}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}). Fix: re-run `higgs-tune evaluate`.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(
            f"{path} is not a higgs-tune evaluation result (format "
            f"{doc.get('format') if isinstance(doc, dict) else None!r}). Fix: re-run `higgs-tune evaluate`."
        )
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {doc['format_version']}; this higgs-tune reads up to {FORMAT_VERSION}. "
            "Fix: upgrade higgs-tune."
        )
    return doc
