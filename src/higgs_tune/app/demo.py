"""`higgs-tune demo`: the whole product on the tiny offline stack and the bundled data, on CPU.

    OUT/tiny-model/         make-tiny (random weights, nothing downloaded)
    OUT/cache/train|heldout prepare (validated, encoded once, incremental on a re-run)
    OUT/eval-models/        tiny random-weight ASR and speaker models (real code path)
    OUT/run/                train (configs/demo-tiny-cpu.yaml), then eval/ and report.html

The numbers of a random tiny model mean nothing for speech quality; what the demo shows
is that every stage runs and that the audio loss falls far below chance.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import yaml

from higgs_tune.app.report import build_report
from higgs_tune.config import config_from_dict
from higgs_tune.data.prepare import prepare_manifest
from higgs_tune.errors import DataError, OutputDirError
from higgs_tune.infer.evaluate import AsrModel, SpeakerModel, evaluate_manifest
from higgs_tune.infer.generate import SamplingOptions
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.tiny import make_tiny
from higgs_tune.tiny.eval_models import make_tiny_eval_models
from higgs_tune.train.recipe import train

log = logging.getLogger("higgs_tune.demo")

PRESET = "demo-tiny-cpu.yaml"


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


def demo_config(out: Path, max_steps: int | None = None):
    """The embedded preset with its ${...} paths filled in for OUT."""
    text = files("higgs_tune.resources").joinpath(PRESET).read_text(encoding="utf-8")
    for key, value in {
        "TINY_MODEL": out / "tiny-model",
        "DEMO_CACHE": out / "cache" / "train",
        "DEMO_HELDOUT_CACHE": out / "cache" / "heldout",
        "OUTPUT_DIR": out / "run",
    }.items():
        text = text.replace("${" + key + "}", str(value))
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    return config_from_dict(yaml.safe_load(text), overrides, source=PRESET)


def run_demo(out: Path, *, max_steps: int | None = None, overwrite: bool = False) -> Path:
    """Build, prepare, train, evaluate, report; returns the report's path."""
    out = out.resolve()
    data = demo_data_dir()
    run_dir = out / "run"
    if not overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        # before anything is built: the demo has no --resume, so train's own advice would not apply
        raise OutputDirError(
            f"{run_dir} is not empty (an earlier demo run): add --overwrite to train the demo again "
            "(the tiny stack and the code caches are reused), or choose another --out."
        )
    tiny = out / "tiny-model"
    if not (tiny / "config.json").is_file():
        log.info("building the tiny Higgs Audio v2 stack in %s", tiny)
        make_tiny(tiny, seed=0, overwrite=True)
    for name, manifest in (("train", data / "manifest.jsonl"), ("heldout", data / "heldout.jsonl")):
        r = prepare_manifest(manifest, tiny, out / "cache" / name, progress=False)
        log.info(
            "prepared %s: %d clips (%d encoded, %d reused from the cache) in %s",
            name,
            r.entries,
            r.encoded,
            r.reused,
            r.cache_dir,
        )

    cfg = demo_config(out, max_steps)
    run = train(cfg, overwrite=overwrite)
    log.info(
        "trained %d steps; audio loss %.3f (chance ln(1026) = 6.93)",
        run.steps,
        run.last_metrics.get("audio_loss", float("nan")),
    )

    asr_dir, spk_dir = out / "eval-models" / "asr", out / "eval-models" / "speaker"
    if not (asr_dir / "config.json").is_file() or not (spk_dir / "config.json").is_file():
        make_tiny_eval_models(out / "eval-models")
    stack = load_inference_stack(tiny, run.final_dir)
    evaluate_manifest(
        stack,
        data / "heldout.jsonl",
        run.run_dir / "eval",
        asr=AsrModel.load(asr_dir),
        speaker=SpeakerModel.load(spk_dir),
        ref_manifest=data / "manifest.jsonl",
        options=SamplingOptions(temperature=0.0, ras_win_len=None, max_new_tokens=300, seed=0),
    )
    return build_report(run.run_dir)
