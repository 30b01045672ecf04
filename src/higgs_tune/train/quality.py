"""Quality measured during training: does the fine-tuned model still *sound* right?

The loss can keep falling while the speech gets worse (boson-ai/higgs-audio #30: "the more I
train, the more the speech quality degrades"). Every `train.quality_eval_steps` optimizer steps
(and at the end of the run) the recipe calls `QualityEvaluator.run`, which

1. generates a fixed, small held-out set: `train.quality_eval_clips` held-out clips, chosen
   once with `train.quality_eval_seed` (one speaker after another), each voice-cloned from
   another clip of the same speaker (a training clip first, else another held-out clip; plain
   TTS when the speaker has no other clip), sampled as `evaluate` samples (temperature 0.7,
   top-p 0.95, top-k 50, repetition-aware sampling) with seed `quality_eval_seed + i` for
   clip i, at most QUALITY_LENGTH_FACTOR x the ground truth's frames;
2. scores it with the stack of `higgs-tune evaluate` (infer/evaluate.py): CER/WER from the
   ASR model (told each clip's language; transcripts normalised per language, so Arabic is
   compared without diacritics: CER is the number to read for Arabic), speaker similarity of
   the output to the voice prompt (`sim`) and to the ground truth (`sim_gt`), duration ratio,
   stop rate, and the signal-level check (`metrics.signal_shares`: silence and clipping share).
   The ground truth and the voice prompt are the codec's decoding of their cached codes (what
   the model is trained to produce), so no audio file needs to be reachable from the run.

It runs on the main process only, inside `preserved_rng` and with the model put back in
training mode, so how often it runs does not change the training run (the tests compare two
runs bit for bit); the other ranks wait for its scores (`broadcast_from_main`), so every rank
takes the same early-stop decision. Under FSDP every rank generates the set in step with the main
process (a sharded model needs every rank for each forward: `distributed.gathered_for_generation`,
`generate_speech(synced=True)`) and the main process alone scores it; the files equal those of one
process on the same weights (tests/test_train_fsdp.py). Its cost (seconds for generation, ASR,
speaker model) is logged with the scores.

Files, in the run folder:

    quality/step-<N>/wavs/<id>.wav, results.json, results.csv   each evaluation (evaluate's format)
    quality/history.json      {"baseline": scores of the base model or null, "evals": [scores per step]}
    metrics.jsonl             a record per evaluation with split "quality" (the scores)

Base-model baseline: before the first step the model (LoRA adapters at their identity start,
added audio attention an exact no-op) is the base model; its scores are the "before" of every
curve. They are cached per (base model, quality set, models, sampling) in
`train.quality_cache_dir` (default `$HIGGS_TUNE_CACHE/quality-baselines/`, else
~/.cache/higgs-tune/quality-baselines/) as <key>.json, so a re-run does not pay for them again.

Resume: quality/history.json is read back and the evaluations after the resumed step dropped
(as metrics.jsonl is truncated), so the alarm and the report see the whole history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from higgs_tune.config import Config, ConfigError
from higgs_tune.data.audio import to_codec_input
from higgs_tune.data.pipeline import TrainData
from higgs_tune.errors import DataError
from higgs_tune.infer import metrics as M
from higgs_tune.infer.evaluate import (
    FORMAT,
    FORMAT_VERSION,
    NO_REFERENCE_NOTE,
    AsrModel,
    SpeakerModel,
    clip_record,
    summarize_clips,
    too_short_note,
    transcribe_outputs,
    write_results,
)
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, decode_codes, generate_speech, write_wav
from higgs_tune.runfs import QUALITY_DIR, QUALITY_HISTORY_FILE, WAVS_DIR, claim, write_json_atomic
from higgs_tune.train import distributed as dist_utils

log = logging.getLogger("higgs_tune.train.quality")

QUALITY_SPLIT = "quality"  # the metrics.jsonl split of the scores
QUALITY_LENGTH_FACTOR = 2.0  # generation stops at 2x the ground truth's frames (a duration ratio of 2)
HISTORY_FORMAT = "higgs-tune-quality-history"
CACHE_ENV = "HIGGS_TUNE_CACHE"
BASELINE_CACHE_DIR = "quality-baselines"
CHECKPOINT_PREFIX = "quality_"  # the scores a checkpoint's manifest records: quality_cer, quality_sim, ...
# The scores of one evaluation, in the order of the report's table.
SCORE_KEYS = (
    "cer",
    "wer",
    "sim",
    "sim_gt",
    "cer_sim",
    "duration_ratio",
    "stop_rate",
    "silence_share",
    "clipped_share",
)


# ----------------------------------------------------------------------------- the fixed set
@dataclass(frozen=True)
class QualityClip:
    """One clip of the quality set: what to say, whose voice, and the ground truth's codes."""

    id: str
    text: str
    language: str
    speaker: str
    scene: str | None
    gt_codes: torch.Tensor  # (K, T) long, the held-out recording
    gt_duration_s: float
    ref_id: str | None  # None: plain TTS (the speaker has no other clip)
    ref_text: str | None
    ref_codes: torch.Tensor | None  # (K, T_ref) long

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            text=self.text, ref_text=self.ref_text, ref_codes=self.ref_codes, scene=self.scene, id=self.id
        )


def choose_quality_clips(data: TrainData, n: int, seed: int) -> list[QualityClip]:
    """The fixed quality set: n held-out clips (shuffled with `seed`, then one speaker after
    another in sorted speaker order), each with a voice prompt of the same speaker (a training
    clip first, else another held-out clip; never one with the same text)."""
    if data.eval_set is None:
        raise ConfigError(
            ["train.quality_eval_steps needs a held-out split: set data.eval_cache or data.eval_fraction."]
        )
    rng = np.random.default_rng(seed)
    held_out = list(data.eval_set.entries)
    order = rng.permutation(len(held_out))
    by_speaker: dict[str, list] = {}
    for k in order:
        by_speaker.setdefault(held_out[k].speaker, []).append(held_out[k])
    queues = [by_speaker[s] for s in sorted(by_speaker)]
    chosen = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)][:n]
    pool = [(e, data.train_set.cache) for e in sorted(data.train_set.entries, key=lambda e: e.id)]
    pool += [(e, data.eval_set.cache) for e in sorted(held_out, key=lambda e: e.id)]
    clips = []
    for entry in chosen:
        candidates = [
            (e, c) for e, c in pool if e.speaker == entry.speaker and e.id != entry.id and e.text != entry.text
        ]
        ref, ref_cache = candidates[int(rng.integers(len(candidates)))] if candidates else (None, None)
        clips.append(
            QualityClip(
                id=entry.id,
                text=entry.text,
                language=entry.language,
                speaker=entry.speaker,
                scene=entry.scene,
                gt_codes=data.eval_set.cache.codes(entry.key).long(),
                gt_duration_s=float(entry.duration_s),
                ref_id=ref.id if ref is not None else None,
                ref_text=ref.text if ref is not None else None,
                ref_codes=ref_cache.codes(ref.key).long() if ref is not None else None,
            )
        )
    return clips


# ----------------------------------------------------------------------------- history
def history_path(run_dir: Path) -> Path:
    return Path(run_dir) / QUALITY_DIR / QUALITY_HISTORY_FILE


def read_history(run_dir: Path) -> dict:
    """quality/history.json ({"baseline": ..., "evals": [...]}); empty when the run has none."""
    path = history_path(run_dir)
    if not path.is_file():
        return {"format": HISTORY_FORMAT, "baseline": None, "evals": []}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}). Fix: delete it (the quality history restarts) and resume again."
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT or not isinstance(doc.get("evals"), list):
        raise DataError(f"{path} is not a higgs-tune quality history. Fix: delete it and resume again.")
    return doc


def score(summary: dict, key: str) -> float | None:
    """One score of an evaluation's scores dict (None when it has none, e.g. no similarity)."""
    v = summary.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _scores(summary: dict, clips: list[dict]) -> dict:
    """The flat scores of one evaluation (SCORE_KEYS), from evaluate's summary and the clips."""
    silence = [c["silence_share"] for c in clips if c["silence_share"] is not None]
    clipped = [c["clipped_share"] for c in clips if c["clipped_share"] is not None]
    cer, sim = summary["cer"], summary["speaker_similarity"]
    return {
        "cer": cer,
        "wer": summary["wer"],
        "sim": sim,
        "sim_gt": summary["speaker_similarity_gt"],
        "cer_sim": cer + (1.0 - sim) if cer is not None and sim is not None else None,
        "duration_ratio": summary["duration_ratio"],
        "stop_rate": summary["stop_rate"],
        "silence_share": M.mean(silence),
        "clipped_share": M.mean(clipped),
        "num_clips": summary["num_clips"],
    }


# ----------------------------------------------------------------------------- the evaluator
class QualityEvaluator:
    """The fixed quality set, the ASR and speaker models (main process only) and the history.

    Build it with `QualityEvaluator.create` (after the datasets, before the loop); then
    `baseline(model)` once before the first step, `observe(loss)` every optimizer step,
    `run(model, step)` when `due(step, total)`. Every method is collective where it says so.
    """

    def __init__(
        self,
        cfg: Config,
        data: TrainData,
        processor,
        run_dir: Path,
        accelerator,
        logger,
        *,
        resume_step: int | None,
        family=None,
    ):
        t = cfg.train
        self.cfg, self.data, self.processor = cfg, data, processor
        self.family = family  # the model family's generation loop (None: v2)
        self.run_dir, self.accelerator, self.logger = Path(run_dir), accelerator, logger
        self.every = t.quality_eval_steps
        self.seed = t.quality_eval_seed
        self.clips = choose_quality_clips(data, t.quality_eval_clips, t.quality_eval_seed)
        self.options = SamplingOptions(seed=t.quality_eval_seed)
        self.is_main = accelerator.is_main_process
        self.asr = self.speaker = None
        self._truth: list[tuple[np.ndarray | None, np.ndarray | None]] | None = None  # (gt, ref) embeddings
        self._losses: list[float] = []
        self.history = {"format": HISTORY_FORMAT, "baseline": None, "evals": []}
        if self.is_main:
            if resume_step is not None:
                self.history = read_history(self.run_dir)
                self.history["evals"] = [e for e in self.history["evals"] if e["step"] <= resume_step]
            # loading initialises weights (random draws): the training streams must not move
            with dist_utils.preserved_rng():
                self.asr = AsrModel.load(t.quality_asr_model, accelerator.device, option="train.quality_asr_model")
                self.speaker = SpeakerModel.load(
                    t.quality_speaker_model, accelerator.device, option="train.quality_speaker_model"
                )
        # every rank holds the same history, so every rank takes the same alarm decision
        self.history = dist_utils.broadcast_from_main(self.history)

    @classmethod
    def create(
        cls, cfg: Config, data, processor, run_dir, accelerator, logger, *, resume_step, family=None
    ) -> QualityEvaluator:
        return cls(cfg, data, processor, run_dir, accelerator, logger, resume_step=resume_step, family=family)

    # ------------------------------------------------------------------ when
    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def observe(self, loss: float) -> None:
        """The training loss of one optimizer step (reduced over ranks): the alarm compares the
        mean training loss between two evaluations with the quality trend."""
        self._losses.append(float(loss))

    @property
    def evals(self) -> list[dict]:
        return self.history["evals"]

    def checkpoint_scores(self) -> dict:
        """The latest evaluation's scores as a checkpoint records them (quality_<key>, quality_step)."""
        if not self.evals:
            return {}
        last = self.evals[-1]
        out = {f"{CHECKPOINT_PREFIX}{k}": last[k] for k in SCORE_KEYS if last.get(k) is not None}
        out[f"{CHECKPOINT_PREFIX}step"] = last["step"]
        return out

    # ------------------------------------------------------------------ evaluations
    def baseline(self, model, *, sharded_root=None) -> dict | None:
        """Score the model before its first step (the base model), or take the cached scores.
        Collective. Does nothing on a resumed run that has its baseline already. `sharded_root`: an
        FSDP run's prepared module (every rank then generates in step with the main process, which
        alone scores)."""
        if self.history["baseline"] is not None:
            return self.history["baseline"]
        doc = None
        if self.is_main:
            key = self._baseline_key()
            cached = _baseline_cache_dir(self.cfg.train.quality_cache_dir) / f"{key}.json"
            if cached.is_file():
                doc = json.loads(cached.read_text(encoding="utf-8"))
                doc["cached"] = True
                self.logger.console.print(f"quality: base model scores from the cache {cached}", markup=False)
        generate = self.is_main and doc is None
        if sharded_root is not None:  # every rank generates with the main process, or none does
            generate = dist_utils.broadcast_from_main(generate)
        generated = self._generate(model, sharded_root) if generate else None
        if self.is_main:
            if doc is None:
                doc = self._score(generated, 0)
                doc["cached"] = False
                doc["cache_key"] = key
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(cached, doc)
                except OSError as e:  # a read-only home: the run goes on, the next one pays again
                    log.warning("quality: could not cache the base model's scores in %s: %s", cached, e)
            self.history["baseline"] = doc
            self._write_history()
            self.logger.log(0, {k: doc[k] for k in SCORE_KEYS if doc.get(k) is not None}, split=QUALITY_SPLIT)
        self.history["baseline"] = dist_utils.broadcast_from_main(doc)
        return self.history["baseline"]

    def run(self, model, step: int, *, sharded_root=None) -> dict:
        """Generate and score the quality set with the model as it is at `step`; log and record
        the scores. Collective: the main process works, the others wait for its scores (or, with
        `sharded_root`, generate with it, as in `baseline`)."""
        doc = None
        generated = self._generate(model, sharded_root) if self.is_main or sharded_root is not None else None
        if self.is_main:
            doc = self._score(generated, step)
            doc["train_loss"] = sum(self._losses) / len(self._losses) if self._losses else None
            self.history["evals"] = [e for e in self.evals if e["step"] < step] + [doc]
            self._write_history()
            self.logger.log(
                step,
                {k: doc[k] for k in (*SCORE_KEYS, "seconds") if doc.get(k) is not None},
                split=QUALITY_SPLIT,
            )
        doc = dist_utils.broadcast_from_main(doc)
        if not self.is_main:
            self.history["evals"] = [e for e in self.evals if e["step"] < step] + [doc]
        self._losses = []
        return doc

    def _generate(self, model, sharded_root) -> tuple[list, float]:
        """The quality set generated by the model as it is now -> (results, seconds). The main process,
        or every rank in step when the model is sharded (collective then; `sharded_root`: the module
        given to `accelerator.prepare`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        tokens = self.data.tokens
        t0 = time.monotonic()
        results = []
        # how often this runs must not change the training run
        with dist_utils.preserved_rng(), dist_utils.gathered_for_generation(sharded_root):
            for i, clip in enumerate(self.clips):
                limit = math.ceil(QUALITY_LENGTH_FACTOR * clip.gt_codes.shape[1]) + tokens.num_codebooks + 1
                options = dataclasses.replace(self.options, max_new_tokens=limit, seed=self.seed + i)
                results += generate_speech(
                    unwrapped,
                    self.processor,
                    tokens,
                    [clip.request()],
                    options,
                    family=self.family,
                    synced=sharded_root is not None,
                )
        return results, time.monotonic() - t0

    def _score(self, generated: tuple[list, float], step: int) -> dict:
        """Main process: score what `_generate` made, write quality/step-<step>/; returns the scores."""
        out = self.run_dir / QUALITY_DIR / f"step-{step}"
        claim(self.run_dir, QUALITY_DIR)  # ours: --overwrite may remove it
        results, generation_s = generated
        rate = self.processor.audio_tokenizer.config.sample_rate
        t1 = time.monotonic()
        t0 = t1 - generation_s
        with dist_utils.preserved_rng():  # ASR and speaker models must not move the training streams
            transcripts = transcribe_outputs(self.asr, [c.language for c in self.clips], [r.wav for r in results], rate)
            t2 = time.monotonic()
            truth = self._truth_embeddings(rate)
            outputs = [self._embed(r.wav, rate) if len(r.wav) else None for r in results]
        t3 = time.monotonic()
        clips, word_counts, char_counts = [], [], []
        scored = zip(self.clips, results, transcripts, outputs, truth, strict=True)
        for clip, res, text, emb, (gt_emb, ref_emb) in scored:
            wav = write_wav(out / WAVS_DIR / f"{clip.id}.wav", res.wav, rate)
            notes = [] if emb is not None else [too_short_note(res.duration_s, self.speaker)]
            if clip.ref_codes is None:
                notes.append(NO_REFERENCE_NOTE)
            record, words, chars = clip_record(
                clip.id,
                clip.speaker,
                clip.language,
                clip.ref_id,
                clip.text,
                text,
                res,
                clip.gt_duration_s,
                sim=M.cosine_similarity(emb, ref_emb) if emb is not None and ref_emb is not None else None,
                sim_gt=M.cosine_similarity(emb, gt_emb) if emb is not None and gt_emb is not None else None,
                wav=str(wav.relative_to(out)),
                notes=notes,
            )
            shares = M.signal_shares(res.wav, rate)
            record["silence_share"] = shares.silence if shares is not None else None
            record["clipped_share"] = shares.clipped if shares is not None else None
            clips.append(record)
            word_counts.append(words)
            char_counts.append(chars)
        summary = summarize_clips(clips, word_counts, char_counts)
        per_language = {}
        for language in dict.fromkeys(c["language"] for c in clips):
            idx = [k for k, c in enumerate(clips) if c["language"] == language]
            per_language[language] = summarize_clips(
                [clips[k] for k in idx], [word_counts[k] for k in idx], [char_counts[k] for k in idx]
            )
        seconds = {"generation": t1 - t0, "asr": t2 - t1, "speaker": t3 - t2}
        write_results(
            out,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "summary": summary,
                "per_language": per_language,
                "settings": {
                    "step": step,
                    "model": self.cfg.model.name_or_path,
                    "asr_model": self.asr.name,
                    "speaker_model": self.speaker.name,
                    "sampling": self.options.to_dict(),
                    "length_factor": QUALITY_LENGTH_FACTOR,
                    "seconds": {k: round(v, 3) for k, v in seconds.items()},
                },
                "clips": clips,
            },
        )
        doc = {"step": step, **_scores(summary, clips), "seconds": round(sum(seconds.values()), 3)}
        doc["per_language"] = {
            lang: {"cer": s["cer"], "wer": s["wer"], "num_clips": s["num_clips"]} for lang, s in per_language.items()
        }
        doc["cost_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        self.logger.console.print(
            f"quality step {step}: "
            + " ".join(f"{k} {doc[k]:.4f}" for k in ("cer", "wer", "sim", "stop_rate") if doc.get(k) is not None)
            + f" ({len(clips)} clips in {doc['seconds']:.1f} s: generation {seconds['generation']:.1f} s, "
            f"ASR {seconds['asr']:.1f} s, speaker {seconds['speaker']:.1f} s)",
            markup=False,
            soft_wrap=True,
        )
        return doc

    def _embed(self, wav: np.ndarray, rate: int) -> np.ndarray | None:
        x = to_codec_input(np.asarray(wav, dtype=np.float32)[:, None], rate, self.speaker.sample_rate)
        return self.speaker.embed([x])[0]

    def _truth_embeddings(self, rate: int) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """(ground truth, voice prompt) embedding per clip, of the codec's decoding; computed once."""
        if self._truth is None:
            codec = self.processor.audio_tokenizer
            self._truth = []
            for clip in self.clips:
                gt = self._embed(decode_codes(codec, clip.gt_codes), rate)
                ref = self._embed(decode_codes(codec, clip.ref_codes), rate) if clip.ref_codes is not None else None
                self._truth.append((gt, ref))
        return self._truth

    def _write_history(self) -> None:
        path = history_path(self.run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.history)

    def _baseline_key(self) -> str:
        """Names what the base model's scores depend on: the model (its files' sizes and dates
        for a local folder), the quality set (texts, codes), the scoring models, the sampling."""
        m = self.cfg.model
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {
                    "version": 1,
                    "model": m.name_or_path,
                    "model_files": _folder_fingerprint(m.name_or_path),
                    "audio_tokenizer": m.audio_tokenizer,
                    "dtype": m.dtype,
                    "asr": self.cfg.train.quality_asr_model,
                    "asr_files": _folder_fingerprint(self.cfg.train.quality_asr_model),
                    "speaker": self.cfg.train.quality_speaker_model,
                    "speaker_files": _folder_fingerprint(self.cfg.train.quality_speaker_model),
                    "sampling": self.options.to_dict(),
                    "length_factor": QUALITY_LENGTH_FACTOR,
                    "clips": [[c.id, c.text, c.language, c.ref_id, c.ref_text, c.scene] for c in self.clips],
                    "device": self.accelerator.device.type,
                },
                sort_keys=True,
            ).encode("utf-8")
        )
        for c in self.clips:
            h.update(c.gt_codes.numpy().tobytes())
            if c.ref_codes is not None:
                h.update(c.ref_codes.numpy().tobytes())
        return h.hexdigest()[:32]


def _folder_fingerprint(name: str) -> list | None:
    """(relative path, size, mtime_ns) of every file of a local model folder; None for a Hub id."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return None
    return sorted(
        [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in folder.rglob("*") if p.is_file()
    )


def _baseline_cache_dir(configured: str | None) -> Path:
    """train.quality_cache_dir, else $HIGGS_TUNE_CACHE/quality-baselines, else ~/.cache/higgs-tune/..."""
    if configured:
        return Path(configured).expanduser()
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "higgs-tune"
    return Path(root) / BASELINE_CACHE_DIR
