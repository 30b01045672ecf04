"""The run folder is checked before the model loads: created, writable, big enough, ours."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from higgs_tune.config import config_from_dict
from higgs_tune.errors import OutputDirError
from higgs_tune.runfs import CONFIG_HEADER, LOCK_FILE, OWNED_FILE, claim, format_bytes
from higgs_tune.train import outdir
from higgs_tune.train.outdir import (
    checkpoints_on_disk,
    estimate_checkpoint_bytes,
    prepare_output_dir,
    rough_checkpoint_bytes,
)

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


def listing(folder: Path) -> list[str]:
    """The folder's entries besides the bookkeeping files (ownership manifest, lock; tested on their own)."""
    return sorted(n for n in os.listdir(folder) if n not in (OWNED_FILE, LOCK_FILE))


def fake_free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


# ---------------------------------------------------------------- a new folder


def test_new_folder_is_created_probed_and_marked(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="higgs_tune")
    out = tmp_path / "runs" / "a"
    cfg = make_cfg(out)
    assert prepare_output_dir(cfg, estimate_bytes=10 * MB) == out
    assert listing(out) == ["config.yaml"]  # the write probe is gone
    text = (out / "config.yaml").read_text()
    assert text.startswith(CONFIG_HEADER)
    (line,) = [m for m in caplog.messages if m.startswith("output dir: ")]
    assert line.startswith(f"output dir: {out} (new run); ")
    assert line.endswith(
        f" free, needs about {format_bytes(5 * 10 * MB)} (5 checkpoint(s) x {format_bytes(10 * MB)} + min_free_gb "
        "0.0 GB)"
    )


def test_parent_is_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(make_cfg(tmp_path / "file" / "run"), estimate_bytes=MB)
    assert str(e.value) == (
        f"checkpoint.output_dir {tmp_path / 'file' / 'run'} cannot be created: Not a directory "
        "(a part of the path is a file, not a folder: fix the path). "
        "Or set checkpoint.output_dir_fallback to a folder to use instead."
    )


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(
        OutputDirError, match=r"^checkpoint.output_dir .*/run is a file, not a folder: choose a folder path\."
    ):
        prepare_output_dir(make_cfg(tmp_path / "run"), estimate_bytes=MB)


@pytest.fixture
def unwritable_dir(tmp_path):
    """An existing folder this process cannot write into, also as root.

    As root, permission bits do not stop writes, so the folder is made immutable
    (`chattr +i`: even root gets EPERM); without root, `chmod 0o500` does it.
    """
    d = tmp_path / "locked"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    r = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr +i is not available on this file system ({r.stderr.strip()})")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


def test_existing_folder_that_refuses_writes(unwritable_dir):
    with pytest.raises(
        OutputDirError,
        match=rf"^checkpoint.output_dir {unwritable_dir} is not writable: "
        r"(Operation not permitted \(operation not permitted|Permission denied \(permission denied)",
    ):
        prepare_output_dir(make_cfg(unwritable_dir), estimate_bytes=MB)


def test_fallback_is_used_loudly_only_when_the_folder_is_unusable(tmp_path, unwritable_dir, caplog):
    caplog.set_level(logging.INFO, logger="higgs_tune")
    fallback = tmp_path / "fallback"
    cfg = make_cfg(unwritable_dir, f"checkpoint.output_dir_fallback={fallback}")
    assert prepare_output_dir(cfg, estimate_bytes=MB) == fallback
    assert listing(fallback) == ["config.yaml"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == "!" * 78 and warnings[3] == "!" * 78
    assert warnings[1].startswith(f"OUTPUT DIR FALLBACK: checkpoint.output_dir {unwritable_dir} is not writable: ")
    assert warnings[2] == f"OUTPUT DIR FALLBACK: writing this run to checkpoint.output_dir_fallback = {fallback}"
    # a usable output_dir never switches
    assert (
        prepare_output_dir(make_cfg(tmp_path / "ok", f"checkpoint.output_dir_fallback={fallback}"), estimate_bytes=MB)
        == tmp_path / "ok"
    )


def test_unusable_fallback_reports_both(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = make_cfg(tmp_path / "file" / "a", f"checkpoint.output_dir_fallback={tmp_path / 'file' / 'b'}")
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(cfg, estimate_bytes=MB)
    assert str(e.value).splitlines() == [
        f"checkpoint.output_dir {tmp_path / 'file' / 'a'} cannot be created: Not a directory (a part of the path "
        "is a file, not a folder: fix the path).",
        f"The fallback is not usable either: checkpoint.output_dir {tmp_path / 'file' / 'b'} cannot be created: "
        "Not a directory (a part of the path is a file, not a folder: fix the path).",
    ]


# ---------------------------------------------------------------- free space


def test_not_enough_space_names_the_numbers(tmp_path, monkeypatch):
    fake_free(monkeypatch, 100 * MB)
    cfg = make_cfg(
        tmp_path / "run",
        "checkpoint.min_free_gb=0.5",
        "checkpoint.save_total_limit=2",
        "checkpoint.keep_best=true",
        "train.eval_steps=500",
        "data.eval_fraction=0.1",
    )
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(cfg, estimate_bytes=40 * MB)
    needed = 5 * 40 * MB + 500 * MB
    assert str(e.value) == (
        f"{tmp_path / 'run'}: {format_bytes(100 * MB)} free, the run needs about {format_bytes(needed)} = 5 "
        f"checkpoint(s) x {format_bytes(40 * MB)} (save_total_limit 2 + final + one being written + best) + "
        "checkpoint.min_free_gb 0.5 GB. Free space, choose another disk, or lower checkpoint.save_total_limit."
    )
    fake_free(monkeypatch, needed)
    assert prepare_output_dir(cfg, estimate_bytes=40 * MB) == tmp_path / "run"


def test_checkpoints_counted_for_the_space_check(tmp_path):
    assert checkpoints_on_disk(make_cfg(tmp_path)) == (5, "save_total_limit 3 + final + one being written")
    keep_all = make_cfg(tmp_path, "checkpoint.save_total_limit=null", "checkpoint.save_steps=30")
    assert checkpoints_on_disk(keep_all) == (5, "3 saves (all kept) + final + one being written")
    epochs = make_cfg(
        tmp_path,
        "checkpoint.save_total_limit=null",
        "train.max_steps=null",
        "train.num_epochs=2",
        "checkpoint.save_steps=10",
    )
    assert checkpoints_on_disk(epochs, total_steps=95) == (11, "9 saves (all kept) + final + one being written")


# ---------------------------------------------------------------- what is already in the folder


def _earlier_run(out: Path, cfg) -> None:
    """What a run leaves: its config.yaml, checkpoints, an index, metrics, a leftover temp folder."""
    assert prepare_output_dir(cfg, estimate_bytes=MB) == out
    for name in ("checkpoint-500", "checkpoint-1000", ".tmp-checkpoint-1500-12345", "samples"):
        (out / name).mkdir()
        (out / name / "x.bin").write_bytes(b"1234")
    (out / "checkpoints.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    claim(out, "checkpoint-500", "checkpoint-1000", "samples", "checkpoints.json", "metrics.jsonl")  # as the writers do


def test_foreign_folder_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    (out / "config.yaml").write_text("my: own\n")  # not written by higgs-tune: no header
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(make_cfg(out), estimate_bytes=MB)
    assert (
        str(e.value)
        == f"{out} is not empty and is not a higgs-tune run (it holds config.yaml, thesis.pdf): choose an empty or "
        "new checkpoint.output_dir."
    )
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(make_cfg(out), overwrite=True, estimate_bytes=MB)
    assert str(e.value) == (
        f"{out} holds files higgs-tune did not write (config.yaml, thesis.pdf); --overwrite removes only "
        "higgs-tune's own files and never these. Move them away or choose another checkpoint.output_dir."
    )
    assert listing(out) == ["config.yaml", "thesis.pdf"]
    assert (out / "config.yaml").read_text() == "my: own\n"


def test_earlier_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out)
    _earlier_run(out, cfg)
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(cfg, estimate_bytes=MB)
    assert str(e.value) == (
        f"{out} holds an earlier higgs-tune run (.tmp-checkpoint-1500-12345, checkpoint-1000, checkpoint-500, "
        "checkpoints.json, config.yaml ...): continue it with --resume auto, start over with --overwrite "
        "(removes only higgs-tune's files), or choose another checkpoint.output_dir."
    )


def test_overwrite_removes_only_our_artefacts(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = make_cfg(out)
    _earlier_run(out, cfg)
    caplog.set_level(logging.WARNING, logger="higgs_tune")
    assert prepare_output_dir(cfg, overwrite=True, estimate_bytes=MB) == out
    assert listing(out) == ["config.yaml"]
    # the warnings only (an earlier in-process CLI run may have left INFO records flowing to caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"output dir: --overwrite removed 7 earlier run artefact(s) from {out}: .tmp-checkpoint-1500-12345, "
        "checkpoint-1000, checkpoint-500, checkpoints.json, config.yaml, metrics.jsonl, samples"
    ]


def test_overwrite_space_check_counts_what_it_frees(tmp_path, monkeypatch):
    out, other = tmp_path / "run", tmp_path / "other"
    _earlier_run(out, make_cfg(out))
    _earlier_run(other, make_cfg(other))

    def freed(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in (OWNED_FILE, LOCK_FILE))

    # 5 checkpoints x 1 MB needed: short without what --overwrite frees, enough with it
    fake_free(monkeypatch, 5 * MB - freed(out))
    assert prepare_output_dir(make_cfg(out), overwrite=True, estimate_bytes=MB) == out
    freed = freed(other)
    fake_free(monkeypatch, 5 * MB - freed - 1)
    with pytest.raises(
        OutputDirError, match=rf"free \(\+{re.escape(format_bytes(freed))} freed by --overwrite\), the run needs about"
    ):
        prepare_output_dir(make_cfg(other), overwrite=True, estimate_bytes=MB)
    assert "checkpoint-500" in listing(other)  # nothing removed when the run cannot start


def test_resume_continues_a_run_of_the_same_config(tmp_path, caplog):
    out = tmp_path / "run"
    _earlier_run(out, make_cfg(out))
    (out / "notes.txt").write_text("mine")  # a user's file beside a run is kept, and no obstacle to resuming
    caplog.set_level(logging.INFO, logger="higgs_tune")
    changed_logging = make_cfg(out, "train.log_steps=1", "checkpoint.save_total_limit=5")
    assert prepare_output_dir(changed_logging, resume="auto", estimate_bytes=MB) == out
    assert listing(out) == [
        ".tmp-checkpoint-1500-12345",
        "checkpoint-1000",
        "checkpoint-500",
        "checkpoints.json",
        "config.yaml",
        "metrics.jsonl",
        "notes.txt",
        "samples",
    ]
    assert "log_steps: 1" in (out / "config.yaml").read_text()  # the run's config now says what runs
    assert f"output dir: {out} also holds files higgs-tune did not write (kept): notes.txt" in caplog.messages
    # 5 + 2 checkpoints at once, 2 already there: 5 more needed
    assert any(
        m.startswith(f"output dir: {out} (continuing the run there); ")
        and f"(5 checkpoint(s) x {format_bytes(MB)}" in m
        for m in caplog.messages
    )


def test_resume_refuses_a_run_of_another_config(tmp_path):
    out = tmp_path / "run"
    _earlier_run(out, make_cfg(out))
    other = make_cfg(out, "train.learning_rate=3e-4", "finetune.lora_r=8")
    with pytest.raises(OutputDirError) as e:
        prepare_output_dir(other, resume="auto", estimate_bytes=MB)
    assert str(e.value) == (
        f"{out} is a run of a different config; changed settings that resuming must keep:\n"
        "  finetune.lora_r: 16 -> 8\n"
        "  train.learning_rate: 0.0001 -> 0.0003\n"
        "Restore them to resume, start over there with --overwrite, or choose a new output_dir "
        "(and --resume-weights-only CHECKPOINT to start from its weights)."
    )


def test_resume_and_overwrite_of_the_same_folder_contradict(tmp_path):
    out = tmp_path / "run"
    _earlier_run(out, make_cfg(out))
    with pytest.raises(
        OutputDirError, match=r"^--overwrite would remove the checkpoints that --resume auto continues from in "
    ):
        prepare_output_dir(make_cfg(out), resume="auto", overwrite=True, estimate_bytes=MB)
    with pytest.raises(
        OutputDirError, match=r"^--overwrite would remove the checkpoints that --resume .*checkpoint-500 continues from"
    ):
        prepare_output_dir(make_cfg(out), resume=out / "checkpoint-500", overwrite=True, estimate_bytes=MB)


def test_resume_into_an_empty_folder_from_elsewhere(tmp_path):
    out = tmp_path / "new"
    assert prepare_output_dir(make_cfg(out), resume=tmp_path / "old" / "checkpoint-500", estimate_bytes=MB) == out
    assert listing(out) == ["config.yaml"]


def test_our_artefacts_without_a_run_config_cannot_be_resumed(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-500").mkdir(parents=True)
    claim(out, "checkpoint-500")
    with pytest.raises(OutputDirError, match=r"holds higgs-tune artefacts but no config.yaml written by higgs-tune"):
        prepare_output_dir(make_cfg(out), resume="auto", estimate_bytes=MB)


# ---------------------------------------------------------------- size estimates


def test_estimate_from_the_loaded_model(tiny_dir):
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    total = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model.audio_lm_head.weight.requires_grad_(True)
    head = 8208 * 64  # num_codebooks * codebook_size x hidden
    assert estimate_checkpoint_bytes(model, "full") == int((total * 4 + head * 8) * 1.01) + (8 << 20)
    assert estimate_checkpoint_bytes(model, "lora") == int((head * 4 + head * 8) * 1.01) + (8 << 20)
    with pytest.raises(ValueError, match="mode must be 'full' or 'lora'"):
        estimate_checkpoint_bytes(model, "qlora")


def test_rough_estimate_before_loading_matches_the_loaded_model(tmp_path, tiny_dir):
    """Read from the safetensors headers alone, the estimate equals the one of the loaded model."""
    from peft import LoraConfig, get_peft_model
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_dir, use_text_head=True)
    full = make_cfg(tmp_path, f"model.name_or_path={tiny_dir}", "finetune.mode=full", "finetune.pathways=[]")
    assert rough_checkpoint_bytes(full) == estimate_checkpoint_bytes(model, "full")

    lora_cfg = make_cfg(
        tmp_path,
        f"model.name_or_path={tiny_dir}",
        "finetune.pathways=[text_attn, audio_mlp]",
        "finetune.train_modules=[audio_lm_head]",
        "finetune.lora_r=4",
    )
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            target_modules=r".*\.(self_attn\.[qkvo]_proj|audio_mlp\.(gate|up|down)_proj)",
            modules_to_save=["audio_lm_head"],
        ),
    )
    assert rough_checkpoint_bytes(lora_cfg) == estimate_checkpoint_bytes(peft_model, "lora")


def test_rough_estimate_without_local_weights_assumes_the_released_model(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="higgs_tune")
    cfg = make_cfg(tmp_path, "model.name_or_path=someone/not-cached", "model.dtype=bfloat16")
    assert rough_checkpoint_bytes(cfg) == int((1e8 * 2 + 1e8 * 8) * 1.01) + (8 << 20)
    assert (
        "output dir: someone/not-cached is not on this machine yet; the space check assumes the released 3B model"
        in caplog.messages
    )
    full = make_cfg(
        tmp_path,
        "model.name_or_path=someone/not-cached",
        "model.dtype=bfloat16",
        "finetune.mode=full",
        "finetune.pathways=[]",
        "train.optimizer=adamw",
    )
    assert rough_checkpoint_bytes(full) == int((5.8e9 * 2 + 5.8e9 * 8) * 1.01) + (8 << 20)


def test_rough_estimate_names_a_missing_model_folder_and_survives_a_malformed_id(tmp_path):
    from higgs_tune.errors import ModelLoadError

    # a typo in a local path is the model loader's one-line error, before the output folder is touched
    with pytest.raises(ModelLoadError) as e:
        rough_checkpoint_bytes(make_cfg(tmp_path, f"model.name_or_path={tmp_path}/no-such-model"))
    assert str(e.value) == (
        f"checkpoint folder {tmp_path}/no-such-model does not exist. Set model.name_or_path to a "
        "Higgs Audio v2 folder or Hub id."
    )
    # neither a folder nor a valid hub id (huggingface_hub raises HFValidationError): the fallback estimate
    cfg = make_cfg(tmp_path, "model.name_or_path=a/b/c", "model.dtype=bfloat16")
    assert rough_checkpoint_bytes(cfg) == int((1e8 * 2 + 1e8 * 8) * 1.01) + (8 << 20)


def test_run_artefact_names_are_documented_constants():
    assert outdir.RUN_FILES == {
        "config.yaml",
        "checkpoints.json",
        "metrics.jsonl",
        "train.log",
        "param_report.txt",
        "data_report.txt",
        "report.html",
        "report.json",
        "summary.json",
    }
    assert outdir.RUN_DIRS == {"final", "samples", "tensorboard", "wandb", "logs", "eval", "quality", "best"}
    # the names the recipe, the metrics logger and the report write are among them
    from higgs_tune.runfs import DATA_REPORT_FILE, METRICS_FILE, PARAM_REPORT_FILE, SAMPLES_DIR, TENSORBOARD_DIR
    from higgs_tune.runfs import REPORT_FILE as REPORT_NAME

    assert {METRICS_FILE, PARAM_REPORT_FILE, DATA_REPORT_FILE, REPORT_NAME} <= outdir.RUN_FILES
    assert {TENSORBOARD_DIR, SAMPLES_DIR} <= outdir.RUN_DIRS
