"""Configs for recipe tests: the demo preset pointed at the session's tiny stack and caches."""

from __future__ import annotations

from pathlib import Path

import yaml

from higgs_tune.config import config_from_dict


def preset_dict(tiny_dir: Path, train_cache: Path, heldout_cache: Path | None, output_dir: Path) -> dict:
    from importlib.resources import files as res_files

    text = res_files("higgs_tune.resources").joinpath("demo-tiny-cpu.yaml").read_text(encoding="utf-8")
    for key, value in {
        "TINY_MODEL": tiny_dir,
        "DEMO_CACHE": train_cache,
        "DEMO_HELDOUT_CACHE": heldout_cache or "",
        "OUTPUT_DIR": output_dir,
    }.items():
        text = text.replace("${" + key + "}", str(value))
    data = yaml.safe_load(text)
    data["logging"]["report_to"] = []  # no TensorBoard files in tests
    return data


def small_config(tiny_dir, train_cache, heldout_cache, output_dir, overrides=()):
    """The demo preset, small and fast: no eval/samples unless overridden."""
    data = preset_dict(tiny_dir, train_cache, heldout_cache, output_dir)
    base = ["train.sample_steps=null", "train.eval_steps=null", "checkpoint.keep_best=false", "data.eval_cache=null"]
    return config_from_dict(data, base + list(overrides))


def write_config(path: Path, cfg) -> Path:
    cfg.save(path)
    return path


HERE = Path(__file__).resolve().parent


def torchrun2(script: str, *args: str, env: dict | None = None):
    """Run tests/<script> under `torchrun --standalone --nproc_per_node 2` (gloo on CPU)."""
    import os
    import subprocess
    import sys

    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "500",
        "OMP_NUM_THREADS": "1",
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def train_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) of the train records in run_dir/metrics.jsonl."""
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: (r["loss"], r["grad_norm"]) for r in rows if r.get("event") == "metrics" and r["split"] == "train"
    }


def run_folder_at_checkpoint(run: Path, step: int, dest: Path) -> Path:
    """A copy of `run` as it stood right after checkpoint-<step> was saved (its checkpoint, its
    config.yaml, its metrics up to that step): a resume from there must replay what followed."""
    import json
    import shutil

    dest.mkdir()
    shutil.copytree(run / f"checkpoint-{step}", dest / f"checkpoint-{step}")
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("\n".join(x for x in lines if json.loads(x).get("step", 0) <= step) + "\n")
    return dest
