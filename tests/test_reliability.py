"""Regression tests of issue 15: nothing of the user's is lost, nothing damaged is used.

Each test reproduces one fault found by a hostile pass over the CLI; docs/RELIABILITY.md lists
them (case, expected behaviour, test name).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_tune.config import config_from_dict
from higgs_tune.errors import OutputDirError
from higgs_tune.runfs import LOCK_FILE, OWNED_FILE, RunLock, claim, owned_names, safe_file_stem
from higgs_tune.train.outdir import prepare_output_dir

MB = 1_000_000


def make_cfg(output_dir, *overrides: str):
    return config_from_dict(
        {
            "model": {"dtype": "float32"},
            "data": {"train_cache": "cache/train"},
            "train": {"max_steps": 100},
            "checkpoint": {"output_dir": str(output_dir), "min_free_gb": 0.0},
        },
        list(overrides),
    )


# ---------------------------------------------------------------- 1. --overwrite removes only what higgs-tune wrote


def test_overwrite_refuses_user_files_with_run_names_and_removes_only_listed_ones(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out)
    prepare_output_dir(cfg, estimate_bytes=MB)
    RunLock.release_folder(out)
    (out / "checkpoint-5").mkdir()  # written by the run: listed in the ownership manifest
    claim(out, "checkpoint-5")
    # the user's own files, with the names a run may use: never ours by name alone
    for name in ("logs", "eval", "samples"):
        (out / name).mkdir()
        (out / name / "mine.txt").write_text("precious")
    for name in ("summary.json", "train.log"):
        (out / name).write_text("precious")
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(cfg, overwrite=True, estimate_bytes=MB)
    assert str(e.value) == (
        f"{out} holds files higgs-tune did not write (eval, logs, samples, summary.json, train.log); --overwrite "
        "removes only higgs-tune's own files and never these. Move them away or choose another checkpoint.output_dir."
    )
    for name in ("logs", "eval", "samples"):
        assert (out / name / "mine.txt").read_text() == "precious"
    assert (out / "train.log").read_text() == "precious" and (out / "checkpoint-5").is_dir()
    assert not (out / LOCK_FILE).exists()  # a run that does not start leaves no lock
    # once the user's files are gone, --overwrite removes exactly the listed entries
    for name in ("logs", "eval", "samples"):
        shutil.rmtree(out / name)
    for name in ("summary.json", "train.log"):
        (out / name).unlink()
    assert prepare_output_dir(cfg, overwrite=True, estimate_bytes=MB) == out
    assert sorted(os.listdir(out)) == [OWNED_FILE, LOCK_FILE, "config.yaml"]
    assert owned_names(out) == {"config.yaml"}
    RunLock.release_folder(out)


# ---------------------------------------------------------------- 8. one run per folder: the lock

_HOLD = """
import sys, time
from higgs_tune.runfs import RunLock
RunLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError) as e:
            prepare_output_dir(make_cfg(out), resume="auto", estimate_bytes=MB)
        message = str(e.value)
        assert message.startswith(f"{out} is in use by another higgs-tune run (pid {holder.pid} on host ")
        assert f"lock file {out / LOCK_FILE}" in message and "choose another checkpoint.output_dir" in message
        assert not (out / "config.yaml").exists()  # nothing written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock file stays, the OS frees the flock
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    caplog.set_level(logging.WARNING, logger="higgs_tune")
    assert prepare_output_dir(make_cfg(out), resume="auto", estimate_bytes=MB) == out
    assert any(f"was left by pid {holder.pid} on host" in m and "taking it over" in m for m in caplog.messages), (
        caplog.messages
    )
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    RunLock.release_folder(out)
    assert not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------- 3. a sample never kills a run; final/ first


def test_a_zero_frame_sample_or_a_failing_tracker_never_ends_the_run(tmp_path, caplog):
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from higgs_tune.train.logging import MetricsLogger

    logger = MetricsLogger(tmp_path / "run", ["tensorboard"])
    caplog.set_level(logging.WARNING, logger="higgs_tune")
    logger.log_audio(3, "clip", np.zeros(0, dtype=np.float32), 24000)  # TensorBoard's add_audio fails on this
    original = SummaryWriter.add_audio
    try:
        SummaryWriter.add_audio = lambda *a, **k: (_ for _ in ()).throw(ValueError("bad audio"))
        logger.log_audio(4, "clip", np.ones(10, dtype=np.float32) * 0.1, 24000)
    finally:
        SummaryWriter.add_audio = original
    logger.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["reason"]) for e in events] == [
        ("sample_not_logged", 3, "0 frames of audio"),
        ("sample_not_logged", 4, "tensorboard: ValueError: bad audio"),
    ]
    assert "samples: step 3, clip has 0 frames of audio: not sent to the trackers" in caplog.messages
    assert owned_names(tmp_path / "run") == {"metrics.jsonl", "tensorboard"}


def test_final_checkpoint_is_saved_before_the_last_samples_and_a_zero_frame_sample_is_survived(
    tiny_dir, demo_cache, tmp_path, monkeypatch
):
    from recipe_support import small_config

    from higgs_tune.train import recipe

    # one audio column per sample: the delay pattern leaves 0 frames, the reproduction of the crash
    monkeypatch.setattr(recipe, "SAMPLE_MAX_COLUMNS", 1)
    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path / "run",
        [
            "train.max_steps=2",
            "train.warmup_steps=0",
            "train.sample_steps=2",
            "train.num_samples=1",
            "checkpoint.save_steps=2",
        ],
    )
    cfg.logging.report_to = ["tensorboard"]
    result = recipe.train(cfg)
    run = result.run_dir
    assert (run / "final" / "manifest.json").is_file()
    (wav,) = (run / "samples" / "step-2").glob("*.wav")
    assert (run / "final" / "manifest.json").stat().st_mtime_ns <= wav.stat().st_mtime_ns  # final/ first
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    samples = [e for e in events if e.get("event") == "samples"]
    assert [s["frames"] for s in samples] == [[0]]
    assert [e["reason"] for e in events if e.get("event") == "sample_not_logged"] == ["0 frames of audio"]
    assert {"final", "samples", "metrics.jsonl", "tensorboard", "config.yaml"} <= owned_names(run)
    assert not (run / LOCK_FILE).exists()  # released at the end of the run


# ---------------------------------------------------------------- 4. make-tiny --overwrite


def test_make_tiny_overwrite_replaces_its_own_stack_and_never_a_users_file(tmp_path):
    from higgs_tune.tiny import OutputDirNotEmpty, make_tiny

    out = make_tiny(tmp_path / "tiny", seed=0)
    written = sorted(p.name for p in out.iterdir() if p.name != OWNED_FILE)
    assert owned_names(out) == set(written) and "model.safetensors" in written
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputDirNotEmpty) as e:
        make_tiny(out, seed=1, overwrite=True)
    assert str(e.value) == (
        f"{out} holds files make-tiny did not write (notes.md); --overwrite removes only make-tiny's own files and "
        "never these. Move them away or choose an empty folder."
    )
    assert (out / "notes.md").read_text() == "mine" and (out / "model.safetensors").is_file()
    (out / "notes.md").unlink()
    before = (out / "model.safetensors").read_bytes()
    make_tiny(out, seed=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name != OWNED_FILE) == written
    assert (out / "model.safetensors").read_bytes() != before  # rebuilt from the new seed


# -------------------------------------------------------- 2, 13. evaluate: names from ids, --limit, --skip-invalid

DEMO = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"


@pytest.fixture(scope="module")
def eval_setup(tiny_dir, tmp_path_factory):
    from higgs_tune.tiny.eval_models import make_tiny_adapter, make_tiny_eval_models

    root = tmp_path_factory.mktemp("evalrel")
    asr, spk = make_tiny_eval_models(root / "models", seed=0)
    adapter = make_tiny_adapter(tiny_dir, root / "adapter", seed=3)
    return asr, spk, adapter


def _eval_args(tiny_dir, eval_setup, manifest, out, *extra):
    asr, spk, adapter = eval_setup
    return [
        "evaluate", str(manifest), "--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(out),
        "--asr-model", str(asr), "--speaker-model", str(spk), "--max-new-tokens", "20",
        "--asr-max-new-tokens", "4", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_evaluate_file_names_never_leave_out_and_limit_and_skip_invalid(tiny_dir, eval_setup, tmp_path):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    data = tmp_path / "data"
    shutil.copytree(DEMO / "audio", data / "audio")
    rows = [
        {"id": "../escape", "audio": "audio/en_a_008.flac", "text": "Library.", "speaker": "en_a", "language": "en"},
        {"id": "a/b", "audio": "audio/en_a_009.flac", "text": "Thank you.", "speaker": "en_a", "language": "en"},
        {"id": "bad", "audio": "audio/none.flac", "text": "Missing.", "speaker": "en_a", "language": "en"},
    ]
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev" / "out"
    runner = CliRunner()
    # a bad row: the hint names evaluate's own flag
    r = runner.invoke(main, _eval_args(tiny_dir, eval_setup, manifest, out))
    assert r.exit_code == 2 and "Fix the rows above, or pass --skip-invalid to evaluate the valid rows" in r.output
    # --limit 0 is an error, never "every clip"
    r = runner.invoke(main, _eval_args(tiny_dir, eval_setup, manifest, out, "--limit", "0", "--skip-invalid"))
    assert r.exit_code == 2 and "--limit" in r.output and "0 is not in the range x>=1" in r.output
    r = runner.invoke(main, _eval_args(tiny_dir, eval_setup, manifest, out, "--skip-invalid"))
    assert r.exit_code == 0, r.output
    assert "skipped m.jsonl:3 (id 'bad'):" in r.output
    assert sorted(p.name for p in (out / "wavs").iterdir()) == ["%2E.%2Fescape.wav", "a%2Fb.wav"]
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["out"]  # nothing beside --out
    doc = json.loads((out / "results.json").read_text())
    assert [c["wav"] for c in doc["clips"]] == ["wavs/%2E.%2Fescape.wav", "wavs/a%2Fb.wav"]
    assert [s["id"] for s in doc["settings"]["skipped_rows"]] == ["bad"]
    r = runner.invoke(main, _eval_args(tiny_dir, eval_setup, manifest, out, "--skip-invalid", "--limit", "1"))
    assert r.exit_code == 0 and "evaluated 1 clips" in r.output


def test_safe_file_stem_is_injective_and_stays_in_the_folder(tmp_path):
    ids = ["../x", "..%2Fx", "a/b", "a%2Fb", ".hidden", "%2Ehidden", "c\\d", "plain", ""]
    stems = [safe_file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert all("/" not in s and "\\" not in s and not s.startswith(".") and s for s in stems)
    assert safe_file_stem("plain") == "plain" and safe_file_stem("../x") == "%2E.%2Fx"


# ---------------------------------------------------------------- 2, 12. generate: outputs, empty text, NaN reference


def test_generate_batch_never_replaces_a_users_file_nor_writes_outside(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    batch = tmp_path / "b" / "requests.jsonl"
    batch.parent.mkdir()
    (batch.parent / "notes.txt").write_text("my notes")
    batch.write_text(json.dumps({"text": "Hello.", "out": "notes.txt"}) + "\n")
    runner = CliRunner()
    args = ["generate", "--model", str(tiny_dir), "--batch", str(batch), "--device", "cpu", "--max-new-tokens", "12"]
    for extra in ([], ["--overwrite"]):
        r = runner.invoke(main, args + extra)
        assert r.exit_code == 2, r.output
        assert f"{batch.parent / 'notes.txt'} exists and is not an audio file: higgs-tune never replaces it" in r.output
    assert (batch.parent / "notes.txt").read_text() == "my notes"
    batch.write_text(json.dumps({"text": "Hello.", "out": "../escape.wav"}) + "\n")
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "is outside the batch file's folder" in r.output
    assert not (tmp_path / "escape.wav").exists()
    # an earlier output WAV: replaced only with --overwrite
    batch.write_text(json.dumps({"text": "Hello.", "out": "a.wav"}) + "\n")
    assert runner.invoke(main, args).exit_code == 0
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "a.wav exists (pass --overwrite to replace earlier outputs)" in r.output
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_generate_refuses_empty_text_and_a_nan_reference(tiny_dir, tmp_path):
    import numpy as np
    import soundfile as sf
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    runner = CliRunner()
    base = ["generate", "--model", str(tiny_dir), "--device", "cpu", "--out-dir", str(tmp_path / "g")]
    for text in ("", "  \u200f ", "\u200b"):
        r = runner.invoke(main, [*base, text])
        assert r.exit_code == 2 and "TEXT 1 is empty (only whitespace or invisible characters)" in r.output
    ref = tmp_path / "nan.wav"
    wav = np.full(24000, 0.1, dtype=np.float32)
    wav[100] = np.nan
    sf.write(ref, wav, 24000, subtype="FLOAT")
    r = runner.invoke(main, [*base, "Hello.", "--ref-audio", str(ref), "--ref-text", "Hi."])
    assert r.exit_code == 2 and f"reference audio {ref} has 1 NaN/Inf sample(s)" in r.output
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- 7. the cache a run trains on: content and codec


def test_resume_refuses_a_cache_re_prepared_with_other_content(tiny_dir, demo_manifest, tmp_path):
    from fixtures_data import prepare_demo_cache
    from recipe_support import small_config

    from higgs_tune.data.cache import CodeCache
    from higgs_tune.errors import CheckpointError
    from higgs_tune.train import recipe
    from higgs_tune.train.checkpoint import read_manifest

    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent / "audio", data / "audio")
    rows = demo_manifest.read_text().splitlines()
    (data / "all.jsonl").write_text("\n".join(rows) + "\n")
    (data / "some.jsonl").write_text("\n".join([r for r in rows if "ref_audio" not in r][:20]) + "\n")
    cache = tmp_path / "cache"
    prepare_demo_cache(data / "all.jsonl", tiny_dir, cache)
    first = CodeCache.open(cache)
    index = json.loads((cache / "index.json").read_text())
    assert index["header"]["content_fingerprint"] == first.content_fingerprint  # recorded at prepare time
    cfg = small_config(
        tiny_dir,
        cache,
        None,
        tmp_path / "run",
        ["train.max_steps=2", "train.warmup_steps=0", "checkpoint.save_steps=1"],
    )
    result = recipe.train(cfg)
    assert read_manifest(result.final_dir)["data"] == {
        "train_cache": str(cache),
        "train_cache_fingerprint": first.content_fingerprint,
        "codec_fingerprint": first.codec_fingerprint,
    }
    # the same data prepared again: the same fingerprint (resuming is fine)
    prepare_demo_cache(data / "all.jsonl", tiny_dir, cache, overwrite=True)
    assert CodeCache.open(cache).content_fingerprint == first.content_fingerprint
    # other data at the same path: resume refuses, naming the fix
    prepare_demo_cache(data / "some.jsonl", tiny_dir, cache, overwrite=True)
    assert CodeCache.open(cache).content_fingerprint != first.content_fingerprint
    with pytest.raises(CheckpointError) as e:
        recipe.train(cfg, resume="auto")
    assert str(e.value).startswith(f"{result.final_dir} was trained on a cache with another content than {cache}")
    assert f"--resume-weights-only {result.final_dir}" in str(e.value)


def test_train_refuses_a_cache_encoded_by_another_codec(tiny_dir, demo_cache, tmp_path):
    from recipe_support import small_config

    from higgs_tune.errors import DataError
    from higgs_tune.tiny import make_tiny
    from higgs_tune.train import recipe

    other = make_tiny(tmp_path / "other", seed=1)  # same shapes, other codec weights
    cfg = small_config(other, demo_cache, None, tmp_path / "run", ["train.max_steps=1", "train.warmup_steps=0"])
    with pytest.raises(DataError) as e:
        recipe.train(cfg)
    assert str(e.value).startswith(f"{demo_cache} was encoded by another audio tokenizer (fingerprint ")
    assert "Fix: prepare the cache again with the model you train" in str(e.value)
    assert not (tmp_path / "run" / "param_report.txt").exists()  # refused before the model loads


# ---------------------------------------------------------------- 5, 6. checkpoints: verified wherever read


@pytest.fixture(scope="module")
def trained_run(tiny_dir, demo_cache, tmp_path_factory):
    """A finished tiny run: checkpoint-1/ and final/ (step 2)."""
    from recipe_support import small_config

    from higgs_tune.train import recipe

    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path_factory.mktemp("trained") / "run",
        ["train.max_steps=2", "train.warmup_steps=0", "checkpoint.save_steps=1"],
    )
    return recipe.train(cfg).run_dir


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _edit_manifest(ckpt: Path, edit) -> None:
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["files"])
    path.write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize(
    "edit,problem",
    [
        (
            lambda files: files.pop("adapter_model.safetensors"),
            "{ckpt}/adapter_model.safetensors is not listed in {ckpt}/manifest.json: weights added or replaced after "
            "the save, which the checkpoint cannot vouch for.",
        ),
        (
            lambda files: files["training_state.pt"].pop("bytes"),
            "{ckpt}/manifest.json: the entry of training_state.pt lacks 'bytes' or 'sha256': the manifest is damaged.",
        ),
    ],
    ids=["weights-unlisted", "entry-without-bytes"],
)
def test_resume_falls_back_when_the_manifest_omits_weights_or_a_field(trained_run, tmp_path, caplog, edit, problem):
    from higgs_tune.errors import CheckpointError
    from higgs_tune.train.checkpoint import CheckpointManager, find_resume_checkpoint, verify_checkpoint

    run = _copy_run(trained_run, tmp_path)
    ckpt = run / "final"
    _edit_manifest(ckpt, edit)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(ckpt)
    assert str(e.value).startswith(problem.format(ckpt=ckpt))
    caplog.set_level(logging.WARNING, logger="higgs_tune")
    assert find_resume_checkpoint(run, "auto") == run / "checkpoint-1"
    assert any(m.startswith(f"resume: skipping {ckpt}: {problem.format(ckpt=ckpt)}") for m in caplog.messages)
    # the manager reads the same manifests (sizes) without a KeyError
    cfg = make_cfg(run)
    manager = CheckpointManager(run, None, cfg.checkpoint, lambda d: None, lambda d: None)
    assert manager.latest == ckpt


def _nan_adapter(ckpt: Path, fix_manifest: bool) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from higgs_tune.runfs import sha256_file

    path = ckpt / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})
    if fix_manifest:  # a NaN model saved as such: the manifest vouches for the NaN bytes
        _edit_manifest(
            ckpt, lambda files: files.update({path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}})
        )


def test_export_and_generate_refuse_damaged_or_non_finite_weights(trained_run, tiny_dir, tmp_path):
    from click.testing import CliRunner

    from higgs_tune.app.cli import main

    run = _copy_run(trained_run, tmp_path)
    runner = CliRunner()

    def export(ckpt):
        return runner.invoke(main, ["export", str(tmp_path / "out"), "--adapter", str(ckpt), "--model", str(tiny_dir)])

    def generate(ckpt):
        args = ["generate", "Hello.", "--adapter", str(ckpt), "--model", str(tiny_dir), "--device", "cpu"]
        return runner.invoke(main, [*args, "--out", str(tmp_path / "g.wav")])

    # NaN weights the manifest vouches for: the non-finite check
    _nan_adapter(run / "final", fix_manifest=True)
    for result in (export(run / "final"), generate(run / "final")):
        assert result.exit_code == 2, result.output
        assert f"the weights loaded from {run / 'final'} hold NaN/Inf values (" in result.output
    # weights changed after the save: the manifest check, before anything loads
    _nan_adapter(run / "checkpoint-1", fix_manifest=False)
    for result in (export(run / "checkpoint-1"), generate(run / "checkpoint-1")):
        assert result.exit_code == 2, result.output
        assert f"{run / 'checkpoint-1' / 'adapter_model.safetensors'} does not match its sha256" in result.output
    # a truncated adapter without a manifest (a plain PEFT folder): a clear error, no SafetensorError traceback
    peft = tmp_path / "peft"
    shutil.copytree(trained_run / "final", peft)
    (peft / "manifest.json").unlink()
    weights = peft / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = export(peft)
    assert result.exit_code == 2 and f"{weights} cannot be read (SafetensorError" in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.wav").exists()


# ---------------------------------------------------------------- 10. every float of the config is finite


@pytest.mark.parametrize(
    "override,problem",
    [
        ("train.learning_rate=.nan", "train.learning_rate must be a finite number, got nan."),
        ("checkpoint.min_free_gb=.nan", "checkpoint.min_free_gb must be a finite number, got nan."),
        ("train.max_grad_norm=.nan", "train.max_grad_norm must be a finite number, got nan."),
        ("train.learning_rate=.inf", "train.learning_rate must be a finite number, got inf."),
        ("loss.audio_weight=-.inf", "loss.audio_weight must be a finite number, got -inf."),
        ("train.adam_betas=[0.9, .nan]", "train.adam_betas must hold finite numbers, got [0.9, nan]."),
    ],
)
def test_non_finite_config_floats_are_named_errors(tmp_path, override, problem):
    from higgs_tune.config import ConfigError

    with pytest.raises(ConfigError) as e:
        make_cfg(tmp_path / "run", override)
    assert e.value.problems == [problem]


# ---------------------------------------------------------------- 9. voice cloning needs a second clip per speaker


def test_voice_clone_warns_or_refuses_when_speakers_have_a_single_clip(tiny_dir, demo_manifest, tmp_path, caplog):
    from fixtures_data import prepare_demo_cache
    from recipe_support import small_config

    from higgs_tune.data.pipeline import build_train_data
    from higgs_tune.errors import DataError
    from higgs_tune.model.load import load_processor

    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent / "audio", data / "audio")
    rows = [json.loads(r) for r in demo_manifest.read_text().splitlines() if "ref_audio" not in r]
    first = {}
    for r in rows:
        first.setdefault(r["speaker"], []).append(r)
    speakers = sorted(first)
    assert len(speakers) >= 3
    mixed = first[speakers[0]][:2] + [first[s][0] for s in speakers[1:]]
    alone = [first[s][0] for s in speakers]
    for name, chosen in (("mixed", mixed), ("alone", alone)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
        prepare_demo_cache(data / f"{name}.jsonl", tiny_dir, tmp_path / name)
    processor = load_processor(str(tiny_dir), None)

    def task_config(cache, task):
        base = small_config(tiny_dir, cache, None, tmp_path / "run").to_dict()
        base["data"].pop("clone_probability", None)
        return config_from_dict(base, [f"data.task={task}"])

    caplog.set_level(logging.WARNING, logger="higgs_tune")
    build_train_data(task_config(tmp_path / "mixed", "voice_clone"), processor)
    n = len(speakers) - 1
    assert (
        f"data: {n} of {len(speakers)} speaker(s) have a single clip and no ref_audio, so their samples are plain "
        f"TTS, never voice cloning (data.task voice_clone): {', '.join(speakers[1:])}. Add a second clip (or "
        "ref_audio) per speaker to clone those voices." in caplog.messages
    )
    with pytest.raises(DataError) as e:
        build_train_data(task_config(tmp_path / "alone", "voice_clone"), processor)
    assert str(e.value).startswith(
        f"data.task is voice_clone but no speaker of {tmp_path / 'alone'} has a second clip or a ref_audio "
        f"({', '.join(speakers)}): every sample would be plain TTS and no cloning would be trained."
    )
    caplog.clear()
    build_train_data(task_config(tmp_path / "alone", "mixed"), processor)
    assert any(
        m.startswith(f"data: {len(speakers)} of {len(speakers)} speaker(s) have a single clip") for m in caplog.messages
    )


# ---------------------------------------------------------------- 11, 14, 15. manifests and audio: the real cause


def _tone(seconds=1.0, rate=24000, amplitude=0.3):
    import numpy as np

    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _row(audio, text="Hello there.", **kw):
    return json.dumps({"audio": audio, "text": text, "speaker": "s", "language": "en", **kw}) + "\n"


def test_validation_names_the_real_cause_of_unusable_audio_and_text(tmp_path):
    import soundfile as sf

    from higgs_tune.data.manifest import validate_manifest

    sf.write(tmp_path / "ok.wav", _tone(), 24000)
    sf.write(tmp_path / "tiny_rate.wav", _tone(3, 1), 1)  # 3 samples at 1 Hz: "3 s"
    (tmp_path / "empty.wav").write_bytes(b"")
    os.symlink("loop_b.wav", tmp_path / "loop_a.wav")
    os.symlink("loop_a.wav", tmp_path / "loop_b.wav")
    os.symlink("gone.wav", tmp_path / "broken.wav")
    sf.write(tmp_path / "hot.wav", _tone(amplitude=1.5), 24000, subtype="FLOAT")  # float WAV above 0 dBFS
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        _row("ok.wav", id="ok")
        + _row("tiny_rate.wav")
        + _row("empty.wav")
        + _row("loop_a.wav")
        + _row("broken.wav")
        + _row("ok.wav", text="\u200f \u200b\u2067 ", id="invisible")
        + _row("hot.wav")
    )
    v = validate_manifest(manifest)
    got = {(p.row, p.field): p.message for p in v.problems}
    assert got == {
        (2, "audio"): "'tiny_rate.wav' has a sample rate of 1 Hz, below 8000 Hz: not speech audio (a wrong header?)",
        (3, "audio"): "'empty.wav' is an empty file (0 bytes): the copy or download did not finish",
        (4, "audio"): "'loop_a.wav' is a symlink loop (the links point at each other, never at a file)",
        (5, "audio"): "'broken.wav' is a broken symlink (it points to 'gone.wav', which does not exist)",
        (6, "text"): "is only invisible characters",
    }
    assert [r.id for r in v.rows] == ["ok", "hot"]  # a clipping clip is kept, with a warning
    (w,) = v.warnings
    assert (w.row, w.field) == (7, "audio")
    assert w.format("m.jsonl") == (
        "m.jsonl:7 (id 'hot') audio: 'hot.wav' peaks at +3.5 dBFS, above full scale (0 dBFS): clipped as soon as it "
        "is written as PCM, and likely distorted. Fix: normalise the clip below 0 dBFS, or check how it was scaled."
    )


def test_a_utf16_manifest_is_named_as_such(tmp_path):
    import soundfile as sf

    from higgs_tune.data.manifest import ManifestError, validate_manifest

    sf.write(tmp_path / "ok.wav", _tone(), 24000)
    for encoding in ("utf-16", "utf-16-le"):  # with and without a byte order mark
        manifest = tmp_path / f"{encoding}.jsonl"
        manifest.write_bytes(_row("ok.wav").encode(encoding))
        v = validate_manifest(manifest)
        with pytest.raises(ManifestError) as e:
            v.raise_if_invalid()
        assert (
            f"{manifest.name} file: is UTF-16 encoded (a byte order mark or NUL bytes between the characters), not "
            f"UTF-8. Fix: save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 {manifest.name} > fixed.jsonl."
            in str(e.value)
        )
        assert "latin1" not in str(e.value)


def test_prepare_reports_a_clipping_clip_and_keeps_it(tiny_dir, tmp_path):
    import soundfile as sf

    from higgs_tune.data.prepare import prepare_manifest

    sf.write(tmp_path / "a.wav", _tone(amplitude=1.25), 24000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", _tone(), 24000)
    (tmp_path / "m.jsonl").write_text(_row("a.wav") + _row("b.wav"))
    notes = []
    result = prepare_manifest(tmp_path / "m.jsonl", tiny_dir, tmp_path / "cache", progress=False, log=notes.append)
    assert result.entries == 2
    assert [n for n in notes if n.startswith("warning: ")] == [
        "warning: m.jsonl:1 (id 'a') audio: 'a.wav' peaks at +1.9 dBFS, above full scale (0 dBFS): clipped as soon "
        "as it is written as PCM, and likely distorted. "
        "Fix: normalise the clip below 0 dBFS, or check how it was scaled."
    ]
