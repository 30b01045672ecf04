"""The training recipe end to end on the tiny stack and the bundled demo data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from recipe_support import small_config

from higgs_tune.errors import TrainingHealthError
from higgs_tune.train.recipe import make_scheduler, train

LN_AUDIO = math.log(1026)


def _records(run_dir, split="train", event="metrics"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("event") == event and r.get("split", split) == split]


def test_demo_recipe_learns_and_writes_a_complete_run(tiny_dir, demo_cache, demo_heldout_cache, tmp_path):
    cfg = small_config(
        tiny_dir,
        demo_cache,
        demo_heldout_cache,
        tmp_path / "run",
        [
            "train.max_steps=30",
            "train.log_steps=5",
            "train.eval_steps=15",
            "data.eval_cache=" + str(demo_heldout_cache),
            "train.sample_steps=30",
            "train.num_samples=1",
            "checkpoint.save_steps=15",
        ],
    )
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

    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path / "run",
        [
            "train.max_steps=12",
            "train.log_steps=4",
            "health.chance_after_steps=8",
            "loss.text_weight=0",
            "train.learning_rate=1e-3",
            "checkpoint.save_steps=1000",
        ],
    )
    result = train(cfg, _batch_hook=random_labels)
    codes = {w.code for w in result.warnings}
    assert "chance_level" in codes, codes
    record = next(r for r in _records(result.run_dir, event="warning") if r["code"] == "chance_level")
    assert "ln(" in record["message"]


def test_unshifted_loss_fires_the_copy_task_warning(tiny_dir, demo_cache, tmp_path):
    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path / "run",
        ["train.max_steps=6", "train.log_steps=2", "train.warmup_steps=2", "checkpoint.save_steps=1000"],
    )
    result = train(cfg, _debug_unshifted=True)
    assert "copy_task" in {w.code for w in result.warnings}


def test_batch_checks_run_on_the_first_micro_batch_only(tiny_dir, demo_cache, tmp_path):
    """HealthMonitor.check_batch (no_eos among others) syncs with the device, so the recipe runs
    it once, on the run's first micro-batch (health.py says why)."""

    def strip_eos_from(first_step):
        def hook(step, batch, model):
            if step < first_step:
                return batch
            labels = batch["audio_labels"].clone()
            labels[labels == 1025] = -100  # no stream EOS label left: a model that never stops
            return {**batch, "audio_labels": labels}

        return hook

    def no_eos_steps(first_step, name):
        cfg = small_config(
            tiny_dir,
            demo_cache,
            None,
            tmp_path / name,
            ["train.max_steps=3", "train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=1000"],
        )
        return [w.step for w in train(cfg, _batch_hook=strip_eos_from(first_step)).warnings if w.code == "no_eos"]

    assert no_eos_steps(1, "first") == [1]
    assert no_eos_steps(2, "later") == []


def test_nan_stops_the_run_naming_step_samples_and_checkpoint(tiny_dir, demo_cache, tmp_path):
    def poison(step, batch, model):
        if step == 3:
            # a NaN reaches the loss through the audio embeddings this batch reads
            emb = model.get_base_model().model.embed_audio_tokens.embed_audio_tokens.weight
            with torch.no_grad():
                emb[int(batch["audio_input_ids"][0, 1, 0])] = float("nan")
        return batch

    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path / "run",
        ["train.max_steps=8", "train.log_steps=1", "train.warmup_steps=2", "checkpoint.save_steps=2"],
    )
    with pytest.raises(TrainingHealthError) as e:
        train(cfg, _batch_hook=poison)
    msg = str(e.value)
    # the step named is the one that failed: the one after the last logged step (numbered as logged)
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]
    assert msg.startswith("step 3: non-finite loss = nan")
    assert "checkpoint-2" in msg
    assert any(sid in msg for sid in ("en_a_", "en_b_", "ar_a_"))
    # the good checkpoint is intact and no final/ was written from a broken model
    assert (tmp_path / "run" / "checkpoint-2" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_resume_weights_only_starts_a_new_run_from_trained_weights(tiny_dir, demo_cache, tmp_path):
    common = ["train.log_steps=1", "train.warmup_steps=1", "checkpoint.save_steps=1000", "loss.text_weight=0"]
    first = train(small_config(tiny_dir, demo_cache, None, tmp_path / "a", ["train.max_steps=6", *common]))
    fresh = _records(first.run_dir)[0]["audio_loss"]
    second = train(
        small_config(tiny_dir, demo_cache, None, tmp_path / "b", ["train.max_steps=1", *common]),
        resume=str(first.final_dir),
        resume_weights_only=True,
    )
    start = _records(second.run_dir)[0]
    assert start["step"] == 1  # a new run: step, schedule and data order start afresh
    assert start["audio_loss"] < fresh - 0.3  # but from the trained weights


def test_train_cli_reports_every_config_problem_at_once(tmp_path):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  dtype: float8\ntrain:\n  learning_rate: -1\n  max_stepz: 3\nfinetune:\n  mode: lora\n  "
        "pathways: [text_attn, nope]\n"
    )
    result = CliRunner().invoke(main, ["train", str(bad), "loss.text_weight=-2"])
    assert result.exit_code == 2
    out = result.output
    assert "Traceback" not in out
    for needle in [
        "model.dtype",
        "train.learning_rate",
        "train.max_stepz",
        "finetune.pathways",
        "nope",
        "loss.text_weight",
        "data.train_cache",
        "checkpoint.output_dir",
    ]:
        assert needle in out, needle


def test_log_records_the_applied_lr_fractional_epochs_and_a_final_eval(
    tiny_dir, demo_cache, demo_heldout_cache, tmp_path
):
    # a held-out set without eval_steps: evaluated once, at the end ("None: only at the end")
    cfg = small_config(
        tiny_dir,
        demo_cache,
        demo_heldout_cache,
        tmp_path / "run",
        [
            "data.eval_cache=" + str(demo_heldout_cache),
            "train.max_steps=2",
            "train.log_steps=1",
            "train.warmup_steps=2",
            "train.learning_rate=0.004",
            "checkpoint.save_steps=1000",
        ],
    )
    result = train(cfg)
    train_rows = _records(result.run_dir)
    # warm-up 2: step 1 runs at half the peak LR, step 2 at the peak (not the LR of the step after)
    assert [(r["step"], r["lr"]) for r in train_rows] == [(1, 0.002), (2, 0.004)]
    # 4 batches per epoch of the demo data: a quarter of an epoch per step
    assert [r["epoch"] for r in train_rows] == [0.25, 0.5]
    evals = _records(result.run_dir, "eval")
    assert [r["step"] for r in evals] == [2]
    manifest = json.loads((result.final_dir / "manifest.json").read_text())
    assert manifest["eval_loss"] == evals[0]["loss"]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_is_transformers_after_the_warm_up_and_one_step_earlier_during_it(name):
    """Why make_scheduler is not transformers.get_scheduler: the same curve, except that our
    warm-up does not spend its first step at LR 0 (step s runs at (s+1)/W, get_scheduler's at s/W)."""
    from transformers import get_scheduler

    warmup, total = 3, 9

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched, out = make(opt), []
        for _ in range(total + 1):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: make_scheduler(opt, name, warmup, total))
    hf_name = "constant_with_warmup" if name == "constant" else name
    theirs = lrs(lambda opt: get_scheduler(hf_name, opt, num_warmup_steps=warmup, num_training_steps=total))
    assert ours[:warmup] == [2.0 * (s + 1) / warmup for s in range(warmup)] == theirs[1 : warmup + 1]
    assert theirs[0] == 0.0
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12, abs=1e-15)  # linear: 1 - p vs (T - s) / (T - W)


def test_interrupt_mid_run_then_resume_is_exact_with_accumulation_across_epochs(tiny_dir, demo_cache, tmp_path):
    # 2 epochs of 4 batches in windows of 3: step 2 takes batches 3, 4 of epoch 0 and 0 of epoch 1
    overrides = [
        "train.max_steps=null",
        "train.num_epochs=2",
        "train.gradient_accumulation_steps=3",
        "train.log_steps=1",
        "train.warmup_steps=1",
        "checkpoint.save_steps=2",
        "finetune.lora_dropout=0.1",
    ]
    straight = train(small_config(tiny_dir, demo_cache, None, tmp_path / "straight", overrides))
    assert straight.steps == 3

    def ctrl_c(step, batch, model):
        if step == 3:
            raise KeyboardInterrupt
        return batch

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_dir, demo_cache, None, run_dir, overrides), _batch_hook=ctrl_c)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("checkpoint-", ".tmp-", "final"))) == [
        "checkpoint-2"
    ]
    resumed = train(small_config(tiny_dir, demo_cache, None, run_dir, overrides), resume="auto")

    def by_step(run):
        return {r["step"]: {k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in _records(run)}

    assert by_step(resumed.run_dir) == by_step(straight.run_dir)
    assert [r["epoch"] for r in _records(straight.run_dir)] == [0.75, 1.5, 2.25]
    assert (
        json.loads((run_dir / "final" / "manifest.json").read_text())["metrics"]["loss"]
        == _records(straight.run_dir)[-1]["loss"]
    )


def test_ctrl_c_prints_where_to_resume_without_a_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main
    from higgs_tune.config import config_from_dict
    from higgs_tune.train import recipe

    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config_from_dict(
        {
            "data": {"train_cache": str(tmp_path / "cache")},
            "train": {"max_steps": 10},
            "checkpoint": {"output_dir": str(run)},
        }
    ).save(config)

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "train", interrupted)
    result = CliRunner().invoke(main, ["train", str(config), "train.log_steps=5"])
    assert result.exit_code == 130
    assert result.output == (
        f"interrupted before the first checkpoint: nothing to resume from; `higgs-tune train {config} "
        "train.log_steps=5 --resume auto` starts the run again from step 0.\n"
    )

    for step in (2, 4):  # complete checkpoints (a manifest), and a torn save that has none
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "manifest.json").write_text(
            json.dumps({"format": "higgs-tune-checkpoint", "format_version": 1, "step": step, "files": {}})
        )
    (run / "checkpoint-6").mkdir()
    result = CliRunner().invoke(main, ["train", str(config)])
    assert result.exit_code == 130
    assert result.output == (
        f"interrupted: the newest complete checkpoint is {run / 'checkpoint-4'} (step 4). Continue with:\n"
        f"  higgs-tune train {config} --resume auto\n"
    )


def test_demo_run_again_says_to_add_overwrite_before_building_anything(tmp_path):
    from higgs_tune.app.demo import run_demo
    from higgs_tune.errors import OutputDirError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OutputDirError) as e:
        run_demo(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'run'} is not empty (an earlier demo run): add --overwrite to train the demo "
        "again (the tiny stack and the code caches are reused), or choose another --out."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing built
