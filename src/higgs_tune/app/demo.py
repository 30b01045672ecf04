"""`higgs-tune demo`: the whole product on the tiny offline stack and the bundled data, on CPU.

    OUT/tiny-model/         make-tiny (random weights, nothing downloaded); v3: OUT/tiny-model-v3/
    OUT/cache/train|heldout prepare (validated, encoded once, incremental on a re-run); v3: OUT/cache-v3/
    OUT/eval-models/        tiny random-weight ASR and speaker models (real code path)
    OUT/run/                train (configs/demo-tiny-cpu.yaml + DEMO_QUALITY: the quality
                            evaluation at a low frequency), then eval/ and report.html
    OUT/cache/quality-baselines/   the base model's cached quality scores

The numbers of a random tiny model mean nothing for speech quality; what the demo shows
is that every stage runs and that the audio loss falls far below chance.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import yaml

from higgs_tune.app.report import build_report
from higgs_tune.config import config_from_dict, fill_placeholders
from higgs_tune.data.prepare import prepare_manifest
from higgs_tune.errors import DataError, OutputDirError
from higgs_tune.families.select import load_codec_for
from higgs_tune.infer.evaluate import AsrModel, SpeakerModel, evaluate_manifest
from higgs_tune.infer.generate import SamplingOptions
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.tiny import make_tiny
from higgs_tune.tiny.eval_models import make_tiny_eval_models
from higgs_tune.tiny.v3 import make_tiny_v3
from higgs_tune.train.logging import log_evaluation
from higgs_tune.train.recipe import train

log = logging.getLogger("higgs_tune.demo")

PRESET = "demo-tiny-cpu.yaml"
# The in-training quality evaluation, turned on at a low frequency: 2 held-out clips, the base
# model before training, every 60 steps and at the end, with the tiny evaluation models.
DEMO_QUALITY = ("train.quality_eval_steps=60", "train.quality_eval_clips=2")


def demo_data_dir() -> Path:
    """The bundled demo clips (examples/data/demo in the source tree)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "data" / "demo"
        if (candidate / "manifest.jsonl").is_file():
            return candidate
    raise DataError(
        "The bundled demo data (examples/data/demo/manifest.jsonl) was not found next to the package. "
        "Run the demo from a source checkout installed with ./setup.sh (pip install -e .)."
    )


# v3 on the tiny stack: no text head or text loss, no v2 module names; LoRA + the fused audio table
V3_OVERRIDES = ["finetune.train_modules=[]", "loss.text_weight=0", "model.use_text_head=false"]


def _stack_dirs(out: Path, family: str) -> tuple[Path, Path]:
    """(tiny model folder, cache folder) of `family` under OUT: v2 tiny-model/ cache/, v3 tiny-model-v3/ cache-v3/."""
    suffix = "" if family == "v2" else f"-{family}"
    return out / f"tiny-model{suffix}", out / f"cache{suffix}"


def demo_config(out: Path, max_steps: int | None = None, family: str = "v2"):
    """The embedded preset with its ${...} paths filled in for OUT (`family` v3: `V3_OVERRIDES`), and the quality
    evaluation on."""
    text = files("higgs_tune.resources").joinpath(PRESET).read_text(encoding="utf-8")
    tiny, cache = _stack_dirs(out, family)
    paths = {
        "TINY_MODEL": tiny,
        "DEMO_CACHE": cache / "train",
        "DEMO_HELDOUT_CACHE": cache / "heldout",
        "OUTPUT_DIR": out / "run",
    }
    text = fill_placeholders(text, PRESET, {k: str(v) for k, v in paths.items()})
    data = yaml.safe_load(text)
    overrides = []
    if max_steps:
        # a short demo run keeps the preset's warm-up share (10 of 120 steps), so warm-up never exceeds the run
        warmup = data["train"]["warmup_steps"]
        scaled = min(warmup, max_steps * warmup // data["train"]["max_steps"])
        overrides = [f"train.max_steps={max_steps}", f"train.warmup_steps={scaled}"]
    overrides += [
        *DEMO_QUALITY,
        f"train.quality_asr_model={out / 'eval-models' / 'asr'}",
        f"train.quality_speaker_model={out / 'eval-models' / 'speaker'}",
        f"train.quality_cache_dir={out / 'cache' / 'quality-baselines'}",
    ]
    if family == "v3":
        overrides += V3_OVERRIDES
    return config_from_dict(data, overrides, source=PRESET)


def run_demo(out: Path, *, max_steps: int | None = None, overwrite: bool = False, family: str = "v2") -> Path:
    """Build, prepare, train, evaluate, report (the tiny v2 stack, or v3 with family="v3");
    returns the report's path. v3 uses OUT/tiny-model-v3/ and OUT/cache-v3/ (its bundled codec)."""
    out = out.resolve()
    cfg = demo_config(out, max_steps, family)  # validated before anything is built
    data = demo_data_dir()
    run_dir = out / "run"
    if not overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        # before anything is built: the demo has no --resume, so train's own advice would not apply
        raise OutputDirError(
            f"{run_dir} is not empty (an earlier demo run): add --overwrite to train the demo again "
            "(the tiny stack and the code caches are reused), or choose another --out."
        )
    tiny, cache = _stack_dirs(out, family)
    if not (tiny / "config.json").is_file():
        log.info("building the tiny Higgs Audio %s stack in %s", family, tiny)
        if family == "v3":
            make_tiny_v3(tiny, seed=0, overwrite=True)
        else:
            make_tiny(tiny, seed=0, overwrite=True)
    for name, manifest in (("train", data / "manifest.jsonl"), ("heldout", data / "heldout.jsonl")):
        r = prepare_manifest(manifest, tiny, cache / name, progress=False, load_codec=load_codec_for)
        log.info(
            "prepared %s: %d clips (%d encoded, %d reused from the cache) in %s",
            name,
            r.entries,
            r.encoded,
            r.reused,
            r.cache_dir,
        )

    asr_dir, spk_dir = out / "eval-models" / "asr", out / "eval-models" / "speaker"
    if not (asr_dir / "config.json").is_file() or not (spk_dir / "config.json").is_file():
        make_tiny_eval_models(out / "eval-models")  # before training: the quality evaluation uses them
    run = train(cfg, overwrite=overwrite)
    log.info(
        "trained %d steps; audio loss %.3f (chance ln(1026) = 6.93)",
        run.steps,
        run.last_metrics.get("audio_loss", float("nan")),
    )

    stack = load_inference_stack(tiny, run.final_dir)
    doc = evaluate_manifest(
        stack,
        data / "heldout.jsonl",
        run.run_dir / "eval",
        asr=AsrModel.load(asr_dir),
        speaker=SpeakerModel.load(spk_dir),
        ref_manifest=data / "manifest.jsonl",
        options=SamplingOptions(temperature=0.0, ras_win_len=None, max_new_tokens=300, seed=0),
    )
    log_evaluation(run.run_dir, doc["summary"], run.steps)  # the scores beside the curves in TensorBoard
    return build_report(run.run_dir)
