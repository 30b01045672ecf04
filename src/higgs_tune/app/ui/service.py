"""What the UI's buttons do, as plain functions over the library (the calls the CLI makes).

Every path comes in as text from the page and goes through `Roots.resolve` first. Long
work that the CLI runs as a command (prepare, train) runs as that command in a background
job (`jobs.py`); quick reads (inspect summary, run status) and generation run in-process.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from collections import OrderedDict
from importlib.resources import files
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from higgs_tune.app.charts import PALETTE, Series, svg_line_chart
from higgs_tune.app.report import collect_run, loss_charts
from higgs_tune.app.ui.paths import Roots
from higgs_tune.config import ConfigError, config_from_dict, config_keys
from higgs_tune.errors import DataError, HiggsTuneError
from higgs_tune.runfs import SAMPLES_DIR, TRAIN_LOG_FILE

PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
UI_DIR = ".higgs-tune-ui"  # under the first root: saved configs, job logs, locks, uploads, generated audio
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


class UiInputError(HiggsTuneError):
    """A form value the UI cannot use (the message names the field and the fix)."""


# ----------------------------------------------------------------------------- data sources
# kind -> how `higgs-tune prepare` takes it. A source the prepare command learns later (an
# LJSpeech csv, a Hugging Face dataset) is one more entry here; the page lists these kinds.
SOURCE_KINDS = {
    "manifest": {"label": "manifest (.jsonl)", "is_dir": False},
    "folder": {
        "label": "folder: LJSpeech (metadata.csv + wavs/), metadata.json, or <name>.wav + <name>.txt",
        "is_dir": True,
    },
    "hf": {"label": "Hugging Face dataset (save_to_disk folder; split train, columns audio/text)", "is_dir": True},
}


def prepare_args(roots: Roots, form: dict) -> tuple[Path, list[str]]:
    """(cache folder, `higgs-tune prepare` arguments) for the Data form."""
    kind = form.get("kind", "manifest")
    if kind not in SOURCE_KINDS:
        raise UiInputError(f"unknown data source kind {kind!r}: choose one of {', '.join(SOURCE_KINDS)}.")
    source = roots.resolve(form.get("source", ""), what="data source")
    model = resolve_model(roots, form.get("model", ""))
    out = roots.resolve(form.get("out", ""), write=True, what="cache folder")
    args = ["prepare"]
    if kind == "folder":
        if not source.is_dir():
            raise UiInputError(f"data source {source} is not a folder.")
        manifest_out = roots.resolve(
            form.get("manifest_out") or source.parent / f"{source.name}.jsonl", write=True, what="manifest to write"
        )
        args += ["--from-folder", str(source), "--manifest-out", str(manifest_out)]
        if form.get("language"):
            args += ["--language", str(form["language"])]
    elif kind == "hf":
        if not source.is_dir():
            raise UiInputError(f"data source {source} is not a folder: give a dataset saved with save_to_disk.")
        manifest_out = roots.resolve(
            form.get("manifest_out") or source.parent / f"{source.name}.jsonl", write=True, what="manifest to write"
        )
        args += ["--hf-dataset", str(source), "--manifest-out", str(manifest_out)]
        for key in ("split", "audio_column", "text_column", "speaker_column", "language"):
            if form.get(key):
                args += [f"--{key.replace('_', '-')}", str(form[key])]
    else:
        if not source.is_file():
            raise UiInputError(f"data source {source} is not a file: give a manifest (.jsonl).")
        args.append(str(source))
    args += ["--model", model, "--out", str(out)]
    if form.get("skip_invalid"):
        args.append("--skip-invalid")
    if form.get("overwrite"):
        args.append("--overwrite")
    return out, args


def resolve_model(roots: Roots, value: str) -> str:
    """A local model folder (confined) or a Hub id (owner/name, no such local folder)."""
    value = str(value or "").strip()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not (roots.home / value).exists():
        return value
    return str(roots.resolve(value, what="model folder"))


# ----------------------------------------------------------------------------- inspect
def inspect_cache(roots: Roots, cache_dir: str) -> dict:
    """`higgs-tune inspect CACHE_DIR`'s summary (data.inspect), plus the clips with their audio paths."""
    from higgs_tune.data.cache import CodeCache
    from higgs_tune.data.inspect import render_summary, summarize_cache

    cache = CodeCache.open(roots.resolve(cache_dir, what="cache folder"))
    summary = summarize_cache(cache)
    manifest = cache.header.get("manifest")
    base = Path(manifest).parent if manifest else cache.cache_dir
    clips = []
    for e in cache.entries:
        audio = Path(e.audio) if Path(e.audio).is_absolute() else base / e.audio
        clips.append(
            {
                "id": e.id,
                "speaker": e.speaker,
                "language": e.language,
                "text": e.text,
                "duration_s": round(e.duration_s, 3),
                "audio": str(audio),
            }
        )
    return {"summary": summary, "text": render_summary(summary), "clips": clips}


# ----------------------------------------------------------------------------- presets and config
def preset_dirs() -> list[Path]:
    """configs/ of the source checkout (when there is one), then the presets bundled with the package."""
    found = []
    for parent in Path(__file__).resolve().parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            found.append(parent / "configs")
            break
    found.append(Path(str(files("higgs_tune.resources"))))
    return found


def list_presets() -> list[dict]:
    presets: dict[str, dict] = {}
    for folder in preset_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.name in presets:
                continue
            text = path.read_text(encoding="utf-8")
            comment = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")]
            presets[path.name] = {
                "name": path.name,
                "path": str(path),
                "about": " ".join(comment[:2]),
                "placeholders": sorted(set(PLACEHOLDER.findall(text))),
                "values": _common_values(yaml.safe_load(text) or {}),
            }
    return list(presets.values())


def _preset_text(name: str) -> tuple[str, str]:
    for p in list_presets():
        if p["name"] == name:
            return p["path"], Path(p["path"]).read_text(encoding="utf-8")
    raise UiInputError(f"no preset {name!r}: choose one of {', '.join(p['name'] for p in list_presets())}.")


# The common fields of the Train form: form name -> config key (and whether it is a path).
COMMON_FIELDS = {
    "model": ("model.name_or_path", "model"),
    "output_dir": ("checkpoint.output_dir", "write"),
    "train_cache": ("data.train_cache", "read"),
    "eval_cache": ("data.eval_cache", "read"),
    "mode": ("finetune.mode", None),
    "max_steps": ("train.max_steps", None),
    "learning_rate": ("train.learning_rate", None),
    "lora_r": ("finetune.lora_r", None),
    "pathways": ("finetune.pathways", None),
    "family": ("model.family", None),  # v2 | v3 (empty: detected from the model's config.json)
}


OPTIONAL_KEYS = ("data.eval_cache",)  # a preset's placeholder here may stay empty (no held-out split)


def config_fields() -> dict:
    """What the Train form offers: the common fields this config knows, the pathway names."""
    from higgs_tune.config import PATHWAYS

    known = {k.name for k in config_keys()}
    return {
        "fields": [f for f, (key, _) in COMMON_FIELDS.items() if key in known],
        "pathways": list(PATHWAYS),
    }


def _common_values(data: dict) -> dict:
    out = {}
    for name, (key, _) in COMMON_FIELDS.items():
        section, _, leaf = key.partition(".")
        value = (data.get(section) or {}).get(leaf) if isinstance(data.get(section), dict) else None
        if value is not None:
            out[name] = value
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_config(roots: Roots, form: dict):
    """(Config or None, problems, overrides) for the Train form: the preset, the common fields and
    the extra `section.key=value` lines, validated by the library (every problem at once)."""
    source, text = _preset_text(form.get("preset", ""))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        return None, [f"{source} is not valid YAML: {e}"], []
    problems: list[str] = []
    overrides: list[str] = []
    known = {k.name for k in config_keys()}
    for name, (key, path_kind) in COMMON_FIELDS.items():
        value = form.get(name)
        if value in (None, "", []) or key not in known:
            continue
        if path_kind:
            try:
                value = (
                    resolve_model(roots, value)
                    if path_kind == "model"
                    else str(roots.resolve(value, write=path_kind == "write", what=key))
                )
            except HiggsTuneError as e:
                problems.append(str(e))
                continue
        if isinstance(value, list):
            overrides.append(f"{key}=[{', '.join(str(v) for v in value)}]")
        else:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    for line in str(form.get("extra") or "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            overrides.append(line.strip())
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    for key, value in _flatten(data).items():
        if not (isinstance(value, str) and PLACEHOLDER.search(value)) or key in overridden:
            continue
        if key in OPTIONAL_KEYS:
            overrides.insert(0, f"{key}=null")  # an optional path left empty in the form: none
        else:
            problems.append(f"{key} is the preset's placeholder {value}: fill it in the form.")
    try:
        cfg = config_from_dict(data, overrides, source=Path(source).name)
    except ConfigError as e:
        return None, problems + e.problems, overrides
    return (None if problems else cfg), problems, overrides


def save_config(roots: Roots, cfg) -> Path:
    """The validated config as a YAML file under HOME/.higgs-tune-ui/configs/ (what `train` reads)."""
    out = Path(cfg.checkpoint.output_dir)
    digest = hashlib.sha256(str(out).encode("utf-8")).hexdigest()[:8]
    path = roots.home / UI_DIR / "configs" / f"{out.name}-{digest}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.save(path)
    return path


def train_args(config_path: Path, action: str) -> list[str]:
    if action == "resume":
        return ["train", str(config_path), "--resume", "auto"]
    if action == "overwrite":
        return ["train", str(config_path), "--overwrite"]
    return ["train", str(config_path)]


# ----------------------------------------------------------------------------- run status
def accuracy_chart(records: list[dict], split: str) -> str | None:
    """Per-codebook top-1 accuracy over steps (metrics records' per_codebook_acc)."""
    lists = [r.get("per_codebook_acc") or [] for r in records]
    k = max((len(x) for x in lists), default=0)
    if not k:
        return None
    series = [
        Series(
            f"cb{i}",
            [(r["step"], float(x[i]) if i < len(x) else None) for r, x in zip(records, lists, strict=True)],
            PALETTE[i % len(PALETTE)],
        )
        for i in range(k)
    ]
    return svg_line_chart(f"Per-codebook accuracy ({split})", series, width=640)


def checkpoints(run_dir: Path) -> list[dict]:
    from higgs_tune.errors import CheckpointError
    from higgs_tune.train.checkpoint.format import checkpoint_folders, read_manifest

    out = []
    for step, path in checkpoint_folders(run_dir):
        try:
            read_manifest(path)
        except CheckpointError:
            continue  # being written, or damaged: not offered
        out.append({"name": path.name, "step": step, "path": str(path)})
    return out


def run_status(roots: Roots, run_dir: str) -> dict:
    """Charts, warnings, samples and checkpoints of a run folder (what `higgs-tune report` reads)."""
    run = roots.resolve(run_dir, what="run folder")
    status: dict = {"run_dir": str(run), "charts": [], "warnings": [], "samples": [], "checkpoints": [], "last": None}
    if not run.is_dir():
        return status
    status["checkpoints"] = checkpoints(run)
    try:
        data = collect_run(run)
    except DataError:
        return status  # no metrics yet
    status["charts"] = loss_charts(data) + [c for c in (accuracy_chart(data.train, "train"),) if c]
    status["warnings"] = data.warnings
    status["last"] = data.train[-1] if data.train else None
    status["samples"] = [
        {
            "step": step,
            "files": [
                {"name": w.name, "path": str(w), "status": data.sample_status.get(step, {}).get(w.name)} for w in wavs
            ],
        }
        for step, wavs in sorted(data.samples, reverse=True)
    ]
    log = run / TRAIN_LOG_FILE
    status["has_train_log"] = log.is_file()
    status["samples_dir"] = str(run / SAMPLES_DIR)
    return status


# ----------------------------------------------------------------------------- audio
def wav_bytes(path: Path) -> bytes:
    """A WAV file for the browser: .wav as it is, other formats decoded and written as 16-bit WAV."""
    if path.suffix.lower() == ".wav":
        return path.read_bytes()
    from higgs_tune.data.audio import read_audio

    samples, rate = read_audio(path)
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ----------------------------------------------------------------------------- generation
class Generator:
    """Loaded inference stacks (a few, newest kept) and one generation at a time."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._stacks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _stack(self, base: str, adapter: str | None):
        from higgs_tune.infer.loading import load_inference_stack

        key = (base, adapter)
        if key in self._stacks:
            self._stacks.move_to_end(key)
            return self._stacks[key]
        stack = load_inference_stack(base, adapter)
        self._stacks[key] = stack
        while len(self._stacks) > self.keep:
            self._stacks.popitem(last=False)
        return stack

    def generate(self, roots: Roots, form: dict) -> dict:
        """Speak `text` with each chosen checkpoint (and the base model), side by side; CER/SIM
        when an ASR / speaker model is given."""
        from higgs_tune.infer.generate import (
            GenerationRequest,
            SamplingOptions,
            encode_reference,
            generate_speech,
            write_wav,
        )
        from higgs_tune.infer.loading import adapter_base_from_checkpoint

        text = str(form.get("text") or "").strip()
        if not text:
            raise UiInputError("type a text to speak.")
        chosen = [roots.resolve(c, what="checkpoint") for c in form.get("checkpoints") or []]
        base = form.get("base_model") or None
        if base:
            base = resolve_model(roots, base)
        elif chosen:
            base = adapter_base_from_checkpoint(chosen[0])
        if not base:
            raise UiInputError("no base model: pick a checkpoint of a run (its config names the base) or give one.")
        targets = [(c.name, str(c)) for c in chosen]
        if form.get("with_base") or not targets:
            targets.append(("base model", None))
        ref = form.get("ref_audio") or None
        ref_text = str(form.get("ref_text") or "").strip() or None
        if ref and not ref_text:
            raise UiInputError("a reference clip needs its transcript (voice cloning uses both).")
        ref_path = roots.resolve(ref, what="reference clip") if ref else None
        options = SamplingOptions(
            temperature=float(form.get("temperature", 0.7)),
            max_new_tokens=int(form.get("max_new_tokens", 300)),
            seed=int(form.get("seed", 0)),
        )
        out_dir = roots.home / UI_DIR / "generated"
        out_dir.mkdir(parents=True, exist_ok=True)
        scorer = _Scorer(roots, form)
        results = []
        with self._lock:
            for label, adapter in targets:
                stack = self._stack(base, adapter)
                codes = encode_reference(stack.processor, ref_path) if ref_path else None
                req = GenerationRequest(text=text, ref_text=ref_text if codes is not None else None, ref_codes=codes)
                (r,) = generate_speech(stack.model, stack.processor, stack.tokens, [req], options)
                n = len(list(out_dir.glob("*.wav"))) + 1
                path = write_wav(
                    out_dir / f"{n:04d}-{re.sub(r'[^A-Za-z0-9_-]+', '-', label)}.wav", r.wav, r.sample_rate
                )
                item = {
                    "label": label,
                    "path": str(path),
                    "seconds": round(r.duration_s, 2),
                    "stopped": r.stopped,
                    "frames": r.num_frames,
                    "notes": stack.notes,
                }
                item.update(scorer.score(text, r.wav, r.sample_rate, ref_path, form.get("language") or None))
                results.append(item)
        return {"base_model": base, "results": results, "scored": scorer.enabled}


class _Scorer:
    """CER (ASR transcript vs the text) and SIM (speaker similarity to the reference), as
    `higgs-tune evaluate` computes them, when the evaluation models are given."""

    def __init__(self, roots: Roots, form: dict):
        self.asr = self.speaker = None
        asr, spk = form.get("asr_model"), form.get("speaker_model")
        if asr:
            from higgs_tune.infer.evaluate import AsrModel

            self.asr = AsrModel.load(resolve_model(roots, asr))
        if spk:
            from higgs_tune.infer.evaluate import SpeakerModel

            self.speaker = SpeakerModel.load(resolve_model(roots, spk))

    @property
    def enabled(self) -> bool:
        return self.asr is not None or self.speaker is not None

    def score(self, text: str, wav: np.ndarray, rate: int, ref: Path | None, language: str | None) -> dict:
        import soxr

        from higgs_tune.infer.metrics import cer, cosine_similarity

        out: dict = {}
        if self.asr is not None:
            (hyp,) = self.asr.transcribe([soxr.resample(wav, rate, self.asr.sample_rate)], language)
            out["transcript"], out["cer"] = hyp, cer(text, hyp, language)
        if self.speaker is not None and ref is not None:
            from higgs_tune.data.audio import read_audio

            ref_wav, ref_rate = read_audio(ref)
            target = self.speaker.sample_rate
            a, b = self.speaker.embed(
                [soxr.resample(ref_wav.mean(axis=1), ref_rate, target), soxr.resample(wav, rate, target)]
            )
            out["sim"] = cosine_similarity(a, b) if a is not None and b is not None else None
        return out


# ----------------------------------------------------------------------------- export
def export(roots: Roots, form: dict) -> dict:
    """`higgs-tune export`: merge a checkpoint into its base model; returns what it wrote."""
    from higgs_tune.infer.export import EXPORT_MARKER, export_merged

    ckpt = roots.resolve(form.get("checkpoint", ""), what="checkpoint")
    out = roots.resolve(form.get("out", ""), write=True, what="export folder")
    result = export_merged(None, ckpt, out, dtype=form.get("dtype") or "float32", overwrite=bool(form.get("overwrite")))
    card = {}  # the model card the checkpoint carries (README.md), then what the export wrote
    for title, path in (
        (f"model card ({ckpt.name}/README.md)", ckpt / "README.md"),
        ("README.md", result.out_dir / "README.md"),
        (EXPORT_MARKER, result.out_dir / EXPORT_MARKER),
    ):
        if path.is_file():
            card[title] = path.read_text(encoding="utf-8")
    return {
        "out_dir": str(result.out_dir),
        "merged_lora": result.merged_lora,
        "num_parameters": result.num_parameters,
        "notes": result.notes,
        "files": sorted(p.name for p in result.out_dir.iterdir()),
        "card": card,
    }
