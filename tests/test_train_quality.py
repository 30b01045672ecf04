"""Quality measured during training (train/quality.py) on the tiny stack with the tiny eval models:
the scores are computed and logged, best/ follows checkpoint.best_metric, the degradation alarm
fires on a constructed degradation, resume keeps the history, and how often the quality
evaluation runs does not change training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from recipe_support import run_folder_at_checkpoint, small_config, train_losses
from safetensors.torch import load_file

from higgs_tune.app.report import build_report
from higgs_tune.config import ConfigError, HealthConfig, config_from_dict
from higgs_tune.errors import ModelLoadError
from higgs_tune.infer import metrics as M
from higgs_tune.tiny.eval_models import make_tiny_eval_models
from higgs_tune.train.health import QUALITY_DEGRADED, HealthMonitor
from higgs_tune.train.quality import SCORE_KEYS
from higgs_tune.train.recipe import train


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    return make_tiny_eval_models(tmp_path_factory.mktemp("quality-eval-models"), seed=0)


@pytest.fixture(autouse=True)
def baseline_cache(tmp_path, monkeypatch):
    """The base-model scores are cached in $HIGGS_TUNE_CACHE: one per test, never ~/.cache."""
    cache = tmp_path / "higgs-tune-cache"
    monkeypatch.setenv("HIGGS_TUNE_CACHE", str(cache))
    return cache


def quality_config(tiny_dir, demo_cache, heldout, run_dir, eval_models, extra=()):
    asr, spk = eval_models
    return small_config(
        tiny_dir,
        demo_cache,
        heldout,
        run_dir,
        [
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.log_steps=1",
            "data.eval_cache=" + str(heldout),
            "train.quality_eval_steps=2",
            "train.quality_eval_clips=2",
            f"train.quality_asr_model={asr}",
            f"train.quality_speaker_model={spk}",
            "checkpoint.save_steps=2",
            *extra,
        ],
    )


def records(run_dir, split):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("event") == "metrics" and r.get("split") == split]


def history(run_dir):
    return json.loads((run_dir / "quality" / "history.json").read_text(encoding="utf-8"))


def without_timing(doc):
    """A history entry without what measures time (seconds differ from run to run)."""
    return {k: v for k, v in doc.items() if k not in ("seconds", "cost_seconds", "cached", "cache_key")}


# ---------------------------------------------------------------- the scores, logged; best/ by CER


def test_quality_scores_are_computed_logged_and_choose_best(
    tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models, baseline_cache
):
    cfg = quality_config(
        tiny_dir,
        demo_cache,
        demo_heldout_cache,
        tmp_path / "run",
        eval_models,
        ["checkpoint.best_metric=cer", "checkpoint.keep_best=true", "checkpoint.save_total_limit=1"],
    )
    result = train(cfg)
    run = result.run_dir

    # the base model at step 0, then every 2 steps (and at the end)
    logged = records(run, "quality")
    assert [r["step"] for r in logged] == [0, 2, 4]
    for r in logged:
        for key in ("cer", "wer", "duration_ratio", "stop_rate", "silence_share", "clipped_share"):
            assert isinstance(r[key], float), (r["step"], key)
    assert all(r["seconds"] > 0 for r in logged[1:])  # the cost of each evaluation is logged

    doc = history(run)
    assert doc["baseline"]["step"] == 0 and doc["baseline"]["cached"] is False
    assert [e["step"] for e in doc["evals"]] == [2, 4]
    for e in [doc["baseline"], *doc["evals"]]:
        assert set(SCORE_KEYS) <= set(e)
        assert set(e["cost_seconds"]) == {"generation", "asr", "speaker"}
        # the scores are those of the clips written beside them, recomputed here from the transcripts
        res = json.loads((run / "quality" / f"step-{e['step']}" / "results.json").read_text(encoding="utf-8"))
        assert len(res["clips"]) == 2
        # one Arabic and one English clip (one speaker after another): each scored in its language,
        # Arabic compared without hamza forms and diacritics
        assert sorted(c["language"] for c in res["clips"]) == ["ar", "en"] and set(e["per_language"]) == {"ar", "en"}
        ar = next(c for c in res["clips"] if c["language"] == "ar")
        assert ar["normalized_text"] == M.normalize_text(ar["text"], "ar") != M.normalize_text(ar["text"], "en")
        chars = [M.char_edits(c["text"], c["transcript"], c["language"]) for c in res["clips"]]
        words = [M.word_edits(c["text"], c["transcript"], c["language"]) for c in res["clips"]]
        assert e["cer"] == M.corpus_rate(chars) and e["wer"] == M.corpus_rate(words)
        assert e["stop_rate"] == sum(c["stopped"] for c in res["clips"]) / 2
        assert e["silence_share"] == pytest.approx(np.mean([c["silence_share"] for c in res["clips"]]))
        for c in res["clips"]:
            assert (run / "quality" / f"step-{e['step']}" / c["wav"]).is_file()
            assert c["reference_id"] is not None and c["reference_id"] != c["id"]  # voice-cloned
    # a training step's log and the evaluations in between agree on the train loss they saw
    train_loss = {s: v[0] for s, v in train_losses(run).items()}
    assert doc["evals"][0]["train_loss"] == pytest.approx((train_loss[1] + train_loss[2]) / 2)

    # checkpoints.json records every checkpoint's scores; best/ is the lowest CER
    index = json.loads((run / "checkpoints.json").read_text(encoding="utf-8"))
    by_step = {e["step"]: e for e in doc["evals"]}
    for c in index["checkpoints"]:
        assert c["metrics"]["quality_cer"] == by_step[c["step"]]["cer"]
        assert c["metrics"]["quality_step"] == c["step"]
    best = min(doc["evals"], key=lambda e: (e["cer"], -e["step"]))
    expected = "final" if best["step"] == 4 else "checkpoint-2"
    assert index["best"]["name"] == expected and index["best"]["metric"] == "cer"
    assert index["best"]["value"] == best["cer"] and index["best"]["folder"] == "best"
    assert (run / expected).is_dir()  # rotation (save_total_limit 1) never deletes the best
    assert result.best_dir == run / "best"
    assert (
        load_file(run / "best" / "adapter_model.safetensors").keys()
        == load_file(run / expected / "adapter_model.safetensors").keys()
    )

    # the report: a chart per metric with the base model as the reference line, the checkpoints
    # with their scores and the best marked, the best and the last clips side by side
    page = build_report(run).read_text(encoding="utf-8")
    section = page[page.index('<section id="quality">') :]
    section = section[: section.index("</section>")]
    assert "Character error rate (ASR)" in section and "Stop rate (ended by itself)" in section
    assert f"base model (step 0): {doc['baseline']['cer']:.3f}" in section
    table = section[section.index('<table class="quality-checkpoints">') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == 1 + 1 + len(index["checkpoints"])  # header, base model, checkpoints
    assert f"<td>{expected}</td>" in table and table.count('<span class="ok">best</span>') == 1
    clips = section[section.index('<table class="quality-clips">') :]
    best_step = 4 if expected == "final" else 2
    assert f"<th>best (step {best_step})</th><th>last (step 4)</th>" in clips
    assert clips.count("<audio") == 4  # 2 clips x (best, last)

    # a second run on the same base model and quality set takes the baseline from the cache
    assert len(list((baseline_cache / "quality-baselines").glob("*.json"))) == 1
    cfg2 = quality_config(tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "run2", eval_models)
    run2 = train(cfg2).run_dir
    doc2 = history(run2)
    assert doc2["baseline"]["cached"] is True
    assert without_timing(doc2["baseline"]) == without_timing(doc["baseline"])
    assert not (run2 / "quality" / "step-0").exists()  # nothing generated for it
    assert [r["step"] for r in records(run2, "quality")] == [0, 2, 4]


# ---------------------------------------------------------------- training is unchanged by it


def test_how_often_quality_runs_does_not_change_training(
    tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models
):
    every_step = quality_config(
        tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "a", eval_models, ["train.quality_eval_steps=1"]
    )
    off = quality_config(
        tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "b", eval_models, ["train.quality_eval_steps=null"]
    )
    a, b = train(every_step), train(off)
    assert [r["step"] for r in records(a.run_dir, "quality")] == [0, 1, 2, 3, 4]
    assert records(b.run_dir, "quality") == []
    assert train_losses(a.run_dir) == train_losses(b.run_dir)  # loss and grad norm, bit for bit
    wa = load_file(a.final_dir / "adapter_model.safetensors")
    wb = load_file(b.final_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- resume keeps the history


def test_resume_keeps_the_quality_history(tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models):
    full = train(quality_config(tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "full", eval_models)).run_dir
    # the run folder as it stood after checkpoint-2, with the quality history of the whole run:
    # the resumed run drops the evaluations after step 2 and makes them again
    cut = run_folder_at_checkpoint(full, 2, tmp_path / "cut")
    shutil.copytree(full / "quality", cut / "quality")
    cfg = quality_config(tiny_dir, demo_cache, demo_heldout_cache, cut, eval_models)
    resumed = train(cfg, resume="auto")
    assert resumed.steps == 4
    got, want = history(cut), history(full)
    assert without_timing(got["baseline"]) == without_timing(want["baseline"])
    assert [without_timing(e) for e in got["evals"]] == [without_timing(e) for e in want["evals"]]
    assert [r["step"] for r in records(cut, "quality")] == [0, 2, 4]


# ---------------------------------------------------------------- the degradation alarm


def _evals(values, losses, metric="cer"):
    return [
        {"step": 2 * (i + 1), metric: v, "train_loss": x} for i, (v, x) in enumerate(zip(values, losses, strict=True))
    ]


def _monitor(**kw):
    warnings = []
    cfg = HealthConfig(**{"quality_alarm_threshold": 0.05, "quality_alarm_evals": 3, **kw})
    monitor = HealthMonitor(
        cfg,
        text_vocab_size=100,
        codebook_size=10,
        num_codebooks=2,
        text_weight=1.0,
        audio_weight=1.0,
        on_warning=warnings.append,
    )
    return monitor, warnings


def test_alarm_fires_when_quality_worsens_while_the_loss_falls():
    monitor, warnings = _monitor()
    cer = [0.40, 0.20, 0.30, 0.32, 0.35]  # best at step 4, then 3 evaluations each worse by > 0.05
    loss = [3.0, 2.5, 2.0, 1.5, 1.2]
    evals = _evals(cer, loss)
    names = {4: "checkpoint-4"}.get
    fired = [monitor.check_quality(e["step"], evals[: i + 1], "cer", names) for i, e in enumerate(evals)]
    assert fired == [False, False, False, False, True]
    (w,) = warnings
    assert w.code == QUALITY_DEGRADED and w.step == 10
    assert w.details["best_step"] == 4 and w.details["best_checkpoint"] == "checkpoint-4"
    assert w.details["recent_steps"] == [6, 8, 10] and w.details["recent_values"] == [0.30, 0.32, 0.35]
    assert "cer was 0.2000 at step 4 (the best so far: checkpoint-4)" in w.message
    assert "quality/step-4/wavs" in w.message and "best/" in w.message


@pytest.mark.parametrize(
    "values, losses, metric",
    [
        ([0.40, 0.20, 0.30, 0.32, 0.35], [3.0, 2.5, 2.6, 2.7, 2.8], "cer"),  # the loss rose too: not over-fitting
        ([0.40, 0.20, 0.30, 0.22, 0.35], [3.0, 2.5, 2.0, 1.5, 1.2], "cer"),  # one evaluation within the threshold
        ([0.40, 0.20, 0.24, 0.24, 0.24], [3.0, 2.5, 2.0, 1.5, 1.2], "cer"),  # worse, but by less than 0.05
        ([0.20, 0.40, 0.45, 0.50, 0.55], [3.0, 2.5, 2.0, 1.5, 1.2], "sim"),  # similarity rising is better
        ([0.20, 0.30, 0.35], [3.0, 2.5, 2.0], "cer"),  # fewer than K + 1 evaluations
    ],
)
def test_alarm_stays_quiet_without_a_sustained_degradation(values, losses, metric):
    monitor, warnings = _monitor()
    evals = _evals(values, losses, metric)
    assert not any(monitor.check_quality(e["step"], evals[: i + 1], metric) for i, e in enumerate(evals))
    assert warnings == []


def test_alarm_reads_similarity_as_higher_is_better():
    monitor, warnings = _monitor()
    evals = _evals([0.50, 0.80, 0.70, 0.65, 0.60], [3.0, 2.5, 2.0, 1.5, 1.2], "sim")
    assert monitor.check_quality(10, evals, "sim", None)
    assert warnings[0].details["best_value"] == 0.80
    assert "no checkpoint kept from that step" in warnings[0].message


def test_early_stop_ends_the_run_at_the_alarm(tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models):
    """A degradation constructed by the alarm's own settings: the alarm watches speaker similarity
    (checkpoint.best_metric: sim; the tiny random ASR gives one CER whatever it hears) with K = 1
    and a threshold of 1e-9, so the first evaluation less similar than the best so far while the
    loss fell stops the run; that step is recomputed from the history the run wrote."""
    cfg = quality_config(
        tiny_dir,
        demo_cache,
        demo_heldout_cache,
        tmp_path / "run",
        eval_models,
        [
            "train.max_steps=12",
            "train.quality_eval_steps=1",
            "train.quality_eval_clips=1",
            "checkpoint.save_steps=1",
            "health.quality_alarm_evals=1",
            "health.quality_alarm_threshold=1e-9",
            "health.quality_early_stop=true",
            "checkpoint.best_metric=sim",
        ],
    )
    result = train(cfg)
    evals = history(result.run_dir)["evals"]
    monitor, _ = _monitor(quality_alarm_evals=1, quality_alarm_threshold=1e-9)
    stops = [e["step"] for i, e in enumerate(evals) if monitor.check_quality(e["step"], evals[: i + 1], "sim")]
    assert stops, [(e["step"], e["sim"], e["train_loss"]) for e in evals]
    assert result.steps == stops[0] < 12 and evals[-1]["step"] == stops[0]
    (w,) = result.warnings
    assert w.code == QUALITY_DEGRADED and w.details["best_checkpoint"] == f"checkpoint-{w.details['best_step']}"
    assert (result.run_dir / "final").is_dir()


# ---------------------------------------------------------------- settings and the signal check


def _cfg(**sections):
    base = {
        "model": {"name_or_path": "m"},
        "data": {"train_cache": "c", "eval_fraction": 0.1},
        "train": {"max_steps": 10},
        "checkpoint": {"output_dir": "o", "save_steps": 5},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def test_quality_settings_are_validated():
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(checkpoint={"best_metric": "cer", "keep_best": True}))
    assert e.value.problems == [
        "checkpoint.best_metric cer needs train.quality_eval_steps: the quality metric is measured by the "
        "in-training quality evaluation."
    ]
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            _cfg(
                train={"quality_eval_steps": 2, "quality_eval_clips": 0},
                checkpoint={"best_metric": "sim", "keep_best": True},
                health={"quality_alarm_threshold": 0, "quality_alarm_evals": 0},
            )
        )
    assert e.value.problems == [
        "health.quality_alarm_threshold must be > 0, got 0.0.",
        "health.quality_alarm_evals must be >= 1, got 0.",
        "train.quality_eval_clips must be >= 1, got 0.",
        "checkpoint.save_steps (5) is not a multiple of train.quality_eval_steps (2): with keep_best by sim every "
        "save needs a fresh score. Make save_steps a multiple of quality_eval_steps.",
    ]
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            _cfg(data={"eval_fraction": 0.0}, train={"quality_eval_steps": 5}, checkpoint={"best_metric": "cer_sims"})
        )
    assert e.value.problems == [
        "checkpoint.best_metric: 'cer_sims' is not one of eval_loss, cer, wer, sim, sim_gt, cer_sim. "
        "Did you mean 'cer_sim'?",
        "train.quality_eval_steps is set but there is no held-out split: the quality set is made of held-out "
        "clips. Set data.eval_cache or data.eval_fraction.",
    ]
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(health={"quality_early_stop": True}))
    assert e.value.problems == ["health.quality_early_stop needs train.quality_eval_steps (the alarm watches it)."]
    ok = config_from_dict(
        _cfg(train={"quality_eval_steps": 5}, checkpoint={"best_metric": "cer_sim", "keep_best": True})
    )
    assert ok.checkpoint.best_metric == "cer_sim" and ok.train.quality_eval_clips == 16


def test_signal_shares_count_silent_frames_and_clipped_samples():
    rate = 1000  # 20 ms frames of 20 samples
    wav = np.concatenate([np.zeros(40), np.full(40, 0.5), np.full(20, 1.0), np.full(20, -1.0)])  # 6 frames
    wav[40] = 0.999  # a clipped sample inside a loud frame
    shares = M.signal_shares(wav, rate)
    assert shares == M.SignalShares(silence=2 / 6, clipped=41 / 120)
    assert M.signal_shares(np.zeros(0), rate) is None
    # a last, partial frame is padded with silence: 25 loud samples = one loud and one partly loud frame
    assert M.signal_shares(np.full(25, 0.5), rate) == M.SignalShares(silence=0.0, clipped=0.0)
    assert M.signal_shares(np.full(10, 0.001), rate).silence == 1.0  # -60 dBFS is silent


# ---------------------------------------------------------------- DDP: the main process scores, the others wait


@pytest.mark.multiproc
def test_two_processes_score_on_the_main_one_and_stop_together(
    tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models
):
    """Under DDP the main process generates and scores, the other rank waits for its scores; both
    take the same early-stop decision (a constructed degradation, as in the single-process test),
    and the training losses equal those of a DDP run without the quality evaluation."""
    from recipe_support import torchrun2

    quality = [
        "train.max_steps=12",
        "train.quality_eval_steps=1",
        "train.quality_eval_clips=1",
        "checkpoint.save_steps=1",
        "health.quality_alarm_evals=1",
        "health.quality_alarm_threshold=1e-9",
        "health.quality_early_stop=true",
        "checkpoint.best_metric=sim",
        f"train.quality_cache_dir={tmp_path / 'baselines'}",
    ]
    with_q = quality_config(tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "q", eval_models, quality)
    without = quality_config(
        tiny_dir,
        demo_cache,
        demo_heldout_cache,
        tmp_path / "plain",
        eval_models,
        ["train.max_steps=12", "train.quality_eval_steps=null", "checkpoint.save_steps=1"],
    )
    with_q.save(tmp_path / "q.yaml")
    without.save(tmp_path / "plain.yaml")
    p = torchrun2("dist_train_script.py", str(tmp_path / "q.yaml"), str(tmp_path / "wq"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = torchrun2("dist_train_script.py", str(tmp_path / "plain.yaml"), str(tmp_path / "wp"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    evals = history(tmp_path / "q")["evals"]
    stop = evals[-1]["step"]
    assert stop < 12  # stopped early, both ranks at the same step (else the run would hang)
    assert [r["step"] for r in records(tmp_path / "q", "quality")] == [0, *range(1, stop + 1)]  # logged once
    losses_q, losses_plain = train_losses(tmp_path / "q"), train_losses(tmp_path / "plain")
    assert losses_q == {s: v for s, v in losses_plain.items() if s <= stop}
    r0, r1 = load_file(tmp_path / "wq" / "rank0.safetensors"), load_file(tmp_path / "wq" / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the ranks stayed in step


def test_a_wrong_quality_model_fails_before_training_naming_the_setting(
    tiny_dir, demo_cache, demo_heldout_cache, tmp_path, eval_models
):
    missing = tmp_path / "no-such-asr"
    cfg = quality_config(
        tiny_dir, demo_cache, demo_heldout_cache, tmp_path / "run", eval_models, [f"train.quality_asr_model={missing}"]
    )
    with pytest.raises(ModelLoadError) as e:
        train(cfg)
    assert str(e.value).startswith(f"cannot load the ASR model {str(missing)!r} (")
    assert "Fix: pass train.quality_asr_model with a local folder or a Hub id" in str(e.value)
    assert not (tmp_path / "run" / "param_report.txt").exists()  # the Higgs model was never loaded
