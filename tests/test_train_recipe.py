"""The training recipe end to end on the tiny stack and the bundled demo data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from higgs_tune.errors import TrainingHealthError
from higgs_tune.train.recipe import train
from recipe_support import small_config

LN_AUDIO = math.log(1026)


def _records(run_dir, split="train", event="metrics"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("event") == event and r.get("split", split) == split]


def test_demo_recipe_learns_and_writes_a_complete_run(tiny_dir, demo_cache, demo_heldout_cache, tmp_path):
    cfg = small_config(tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "run", [
        "train.max_steps=30", "train.log_steps=5", "train.eval_steps=15", "data.eval_cache=" + str(demo_heldout_cache),
        "train.sample_steps=30", "train.num_samples=1", "checkpoint.save_steps=15"])
    result = train(cfg)
    metrics = _records(result.run_dir)
    first, last = metrics[0], metrics[-1]
    assert first["step"] == 1 and last["step"] == 30
    # chance level at the start, well below half of it at the end
    assert abs(first["audio_loss"] - LN_AUDIO) < 0.5
    assert last["audio_loss"] < 0.5 * LN_AUDIO, last["audio_loss"]
    assert all(len(r["per_codebook_loss"]) == 8 and len(r["per_codebook_acc"]) == 8 for r in metrics)
    assert all(r["n_audio_tokens"] > 0 and r["n_text_tokens"] > 0 for r in metrics)
    evals = _records(result.run_dir, "eval")
    assert [r["step"] for r in evals] == [15, 30]
    assert not any(w.code in ("chance_level", "copy_task", "no_signal", "no_eos") for w in result.warnings)
    # the run folder holds what a person needs
    run = result.run_dir
    for name in ["config.yaml", "metrics.jsonl", "param_report.txt", "data_report.txt", "checkpoint-15", "final"]:
        assert (run / name).exists(), name
    assert (run / "final" / "adapter_model.safetensors").is_file()
    wavs = sorted((run / "samples" / "step-30").glob("*.wav"))
    assert len(wavs) == 1 and wavs[0].stat().st_size > 44
    previews = _records(result.run_dir, event="preview")
    assert previews and previews[0]["step"] == 1


def test_random_labels_fire_the_chance_level_warning(tiny_dir, demo_cache, tmp_path):
    g = torch.Generator().manual_seed(0)

    def random_labels(step, batch, model):
        # labels with no relation to the audio: uniform codes wherever a label is set
        labels = batch["audio_labels"].clone()
        mask = labels != -100
        labels[mask] = torch.randint(0, 1024, (int(mask.sum()),), generator=g)
        return {**batch, "audio_labels": labels}

    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", [
        "train.max_steps=12", "train.log_steps=4", "health.chance_after_steps=8", "loss.text_weight=0",
        "train.learning_rate=1e-3", "checkpoint.save_steps=1000"])
    result = train(cfg, _batch_hook=random_labels)
    codes = {w.code for w in result.warnings}
    assert "chance_level" in codes, codes
    record = next(r for r in _records(result.run_dir, event="warning") if r["code"] == "chance_level")
    assert "ln(" in record["message"]


def test_unshifted_loss_fires_the_copy_task_warning(tiny_dir, demo_cache, tmp_path):
    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", [
        "train.max_steps=6", "train.log_steps=2", "train.warmup_steps=2", "checkpoint.save_steps=1000"])
    result = train(cfg, _debug_unshifted=True)
    assert "copy_task" in {w.code for w in result.warnings}


def test_nan_stops_the_run_naming_step_samples_and_checkpoint(tiny_dir, demo_cache, tmp_path):
    def poison(step, batch, model):
        if step == 3:
            # a NaN reaches the loss through the audio embeddings this batch reads
            emb = model.get_base_model().model.embed_audio_tokens.embed_audio_tokens.weight
            with torch.no_grad():
                emb[int(batch["audio_input_ids"][0, 1, 0])] = float("nan")
        return batch

    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", [
        "train.max_steps=8", "train.log_steps=1", "train.warmup_steps=2", "checkpoint.save_steps=2"])
    with pytest.raises(TrainingHealthError) as e:
        train(cfg, _batch_hook=poison)
    msg = str(e.value)
    assert "step 3" in msg
    assert "checkpoint-2" in msg
    ids = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])  # the run did log
    assert ids["step"] == 1
    assert any(sid in msg for sid in ("en_a_", "en_b_", "ar_a_"))
    # the good checkpoint is intact and no final/ was written from a broken model
    assert (tmp_path / "run" / "checkpoint-2" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_resume_weights_only_starts_a_new_run_from_trained_weights(tiny_dir, demo_cache, tmp_path):
    common = ["train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=1000", "loss.text_weight=0"]
    first = train(small_config(tiny_dir, demo_cache, None, tmp_path / "a", ["train.max_steps=6", *common]))
    fresh = _records(first.run_dir)[0]["audio_loss"]
    second = train(small_config(tiny_dir, demo_cache, None, tmp_path / "b", ["train.max_steps=1", *common]),
                   resume=str(first.final_dir), resume_weights_only=True)
    start = _records(second.run_dir)[0]
    assert start["step"] == 1  # a new run: step, schedule and data order start afresh
    assert start["audio_loss"] < fresh - 0.3  # but from the trained weights


def test_train_cli_reports_every_config_problem_at_once(tmp_path):
    from click.testing import CliRunner

    from higgs_tune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dtype: float8\ntrain:\n  learning_rate: -1\n  max_stepz: 3\nfinetune:\n  mode: lora\n  pathways: [text_attn, nope]\n")
    result = CliRunner().invoke(main, ["train", str(bad), "loss.text_weight=-2"])
    assert result.exit_code == 2
    out = result.output
    assert "Traceback" not in out
    for needle in ["model.dtype", "train.learning_rate", "train.max_stepz", "finetune.pathways", "nope",
                   "loss.text_weight", "data.train_cache", "checkpoint.output_dir"]:
        assert needle in out, needle
