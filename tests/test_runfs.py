"""runfs: the run-folder names and the one atomic write."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from higgs_tune import runfs


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.json"
    runfs.atomic_write_bytes(path, b"old")
    runfs.atomic_write_text(path, "new\n")
    assert path.read_bytes() == b"new\n"
    assert _entries(tmp_path) == ["index.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"old content\n")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runfs.atomic_write_bytes(path, b"new content that never lands\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content\n"
    assert _entries(tmp_path) == ["metrics.jsonl"]


def test_a_write_that_cannot_be_encoded_changes_nothing(tmp_path):
    path = tmp_path / "checkpoints.json"
    runfs.write_json_atomic(path, {"latest": "checkpoint-2"})
    with pytest.raises(TypeError):
        runfs.write_json_atomic(path, {"latest": object()})
    assert path.read_text(encoding="utf-8") == '{\n  "latest": "checkpoint-2"\n}\n'
    assert _entries(tmp_path) == ["checkpoints.json"]


def test_temporary_names_are_run_artefacts_with_the_writers_pid(tmp_path):
    tmp = runfs.temp_path(tmp_path / "config.yaml")
    assert tmp.parent == tmp_path and tmp.name == f".tmp-config.yaml-{os.getpid()}"
    assert runfs.RUN_PATTERN.match(tmp.name) and runfs.LEFTOVER_RE.match(tmp.name).group(1) == str(os.getpid())
    assert runfs.trash_path(tmp_path / "checkpoint-4").name == f".old-checkpoint-4-{os.getpid()}"
    assert runfs.checkpoint_step(runfs.checkpoint_name(12)) == 12 and runfs.checkpoint_step("final") is None


def test_sha256_of_a_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert runfs.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert runfs.sha256_bytes(b"abc") == runfs.sha256_file(path)
    big = tmp_path / "big.bin"
    data = os.urandom(3 * (8 << 20) + 5)  # more than one read chunk
    big.write_bytes(data)
    assert runfs.sha256_file(big) == hashlib.sha256(data).hexdigest()


def test_publish_dir_replaces_an_earlier_folder_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp = runfs.temp_path(target)
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    runfs.fsync_tree(tmp)
    runfs.publish_dir(tmp, target)
    assert _entries(target) == ["new.txt"]
    assert _entries(tmp_path) == ["export"]


def test_published_files_follow_the_umask_not_safetensors_0600(tmp_path):
    """safetensors writes owner-only files; a published checkpoint or export gets the umask's mode."""
    import torch
    from safetensors.torch import save_file

    tmp = tmp_path / ".tmp-final"
    (tmp / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "adapter_model.safetensors"))
    assert (tmp / "sub" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does
    (tmp / "card.md").write_text("x")
    old = os.umask(0o022)
    try:
        assert runfs.current_umask() == 0o022
        runfs.publish_dir(tmp, tmp_path / "final")
        assert os.stat(tmp_path / "final" / "sub" / "adapter_model.safetensors").st_mode & 0o777 == 0o644
        assert os.stat(tmp_path / "final" / "card.md").st_mode & 0o777 == 0o644
        os.umask(0o077)  # a user who wants owner-only files keeps them
        runfs.files_follow_umask(tmp_path / "final")
        assert os.stat(tmp_path / "final" / "card.md").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_failed_publish_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp = runfs.temp_path(target)
    tmp.mkdir()
    real_replace = os.replace

    def refuse_the_new_folder(src, dst):
        if os.fspath(src) == os.fspath(tmp):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match="Input/output error"):
        runfs.publish_dir(tmp, target)
    monkeypatch.undo()
    assert _entries(target) == ["old.txt"]
    assert sorted(_entries(tmp_path)) == sorted(["final", tmp.name])  # the caller removes its temporary folder


def test_discard_dir_removes_the_folder(tmp_path):
    folder = tmp_path / "checkpoint-3"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x").write_text("x")
    runfs.discard_dir(folder)
    assert _entries(tmp_path) == []


def test_run_names_are_what_the_run_folder_check_counts_as_ours():
    assert {
        runfs.METRICS_FILE,
        runfs.PARAM_REPORT_FILE,
        runfs.DATA_REPORT_FILE,
        runfs.REPORT_FILE,
        runfs.CONFIG_FILE,
        runfs.INDEX_FILE,
    } <= runfs.RUN_FILES
    assert {
        runfs.FINAL_NAME,
        runfs.SAMPLES_DIR,
        runfs.TENSORBOARD_DIR,
        runfs.EVAL_DIR,
        runfs.LOGS_DIR,
    } <= runfs.RUN_DIRS
    assert runfs.format_bytes(1_500_000_000) == "1.50 GB"


def test_a_mode_that_cannot_be_set_never_fails_the_publish(tmp_path, monkeypatch, caplog):
    tmp = tmp_path / ".tmp-final"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"x")
    os.chmod(tmp / "adapter_model.safetensors", 0o600)

    def refuse(self, mode, **kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "chmod", refuse)
    old = os.umask(0o022)
    try:
        with caplog.at_level("WARNING", logger="higgs_tune.runfs"):
            runfs.publish_dir(tmp, tmp_path / "final")
    finally:
        os.umask(old)
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == b"x"
    assert f"could not give {tmp} the mode 644: adapter_model.safetensors (Operation not permitted)" in caplog.text
