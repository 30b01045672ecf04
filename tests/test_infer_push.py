"""`export --push-to-hub` and `checkpoint.push_to_hub`, offline: a stand-in for HfApi records the
upload plan and lays the uploads out as a local Hub cache, from which the pushed export loads with
plain `AutoProcessor.from_pretrained(repo_id)` (never the network)."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
from click.testing import CliRunner
from recipe_support import small_config

from higgs_tune.app.cli import main as cli
from higgs_tune.infer import push as push_mod
from higgs_tune.train.recipe import train


class HubStandIn:
    """Records each call; keeps each repo's files in CACHE/models--org--name/snapshots/main/."""

    calls: list = []
    cache: Path = Path()

    def __init__(self, *a, **k):
        pass

    def _snap(self, repo_id):
        root = self.cache / f"models--{repo_id.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text("main")
        (root / "snapshots" / "main").mkdir(parents=True, exist_ok=True)
        return root / "snapshots" / "main"

    def create_repo(self, repo_id, exist_ok=False, private=False):
        self.calls.append(("create_repo", repo_id, private))
        self._snap(repo_id)
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, folder_path, repo_id, ignore_patterns=(), commit_message=""):
        folder = Path(folder_path)
        kept = sorted(
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and not any(fnmatch(str(p.relative_to(folder)), pat) for pat in ignore_patterns)
        )
        self.calls.append(("upload_folder", repo_id, kept))
        for rel in kept:
            (self._snap(repo_id) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / rel, self._snap(repo_id) / rel)

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message=""):
        self.calls.append(("upload_file", repo_id, path_in_repo))
        (self._snap(repo_id) / path_in_repo).write_bytes(path_or_fileobj)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    HubStandIn.calls = []
    HubStandIn.cache = tmp_path / "hub-cache"
    monkeypatch.setattr(push_mod, "HfApi", HubStandIn)
    return HubStandIn


def test_export_push_to_hub_plan_and_the_pushed_repo_loads(tiny_dir, demo_cache, tmp_path, hub):
    from transformers import AutoProcessor

    run = train(
        small_config(tiny_dir, demo_cache, None, tmp_path / "run", ["train.max_steps=1", "train.warmup_steps=0"])
    )
    out = tmp_path / "export"
    res = CliRunner().invoke(
        cli, ["export", str(out), "--adapter", str(run.final_dir), "--push-to-hub", "me/voice", "--private"]
    )
    assert res.exit_code == 0, res.output
    assert "uploaded to https://hub.example/me/voice (audio tokenizer: me/voice-audio-tokenizer)" in res.output
    codec_files = sorted(str(p.relative_to(out / "audio_tokenizer")) for p in (out / "audio_tokenizer").rglob("*"))
    main_files = sorted(p.name for p in out.iterdir() if p.name not in ("audio_tokenizer", "processor_config.json"))
    assert hub.calls == [
        ("create_repo", "me/voice-audio-tokenizer", True),
        ("upload_folder", "me/voice-audio-tokenizer", codec_files),
        ("create_repo", "me/voice", True),
        ("upload_folder", "me/voice", main_files),
        ("upload_file", "me/voice", "processor_config.json"),
    ]
    # the local export still names its own copy; the pushed one names the tokenizer repo
    pushed = json.loads((hub.cache / "models--me--voice" / "snapshots" / "main" / "processor_config.json").read_text())
    assert pushed["audio_tokenizer"]["audio_tokenizer_name_or_path"] == "me/voice-audio-tokenizer"
    processor = AutoProcessor.from_pretrained("me/voice", cache_dir=str(hub.cache), local_files_only=True)
    assert processor.audio_tokenizer.config.num_quantizers == 8


def test_export_with_a_hub_codec_is_pushed_without_a_codec_copy(tiny_dir, demo_cache, tmp_path, hub):
    """An export naming its codec by Hub id is uploaded as it is, minus audio_tokenizer/: the
    pushed processor finds the codec's own repo."""
    from transformers import AutoProcessor

    codec = HubStandIn()._snap("acme/tiny-codec")  # the codec as the Hub (cache) has it
    shutil.copytree(tiny_dir / "audio_tokenizer", codec, dirs_exist_ok=True)
    run = train(
        small_config(tiny_dir, demo_cache, None, tmp_path / "run", ["train.max_steps=1", "train.warmup_steps=0"])
    )
    out = tmp_path / "export"
    res = CliRunner().invoke(
        cli,
        ["export", str(out), "--adapter", str(run.final_dir), "--audio-tokenizer", str(codec), "--push-to-hub", "me/v"],
    )
    assert res.exit_code == 0, res.output
    assert "uploaded to https://hub.example/me/v (audio tokenizer: acme/tiny-codec)" in res.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.parent == out)
    assert hub.calls == [("create_repo", "me/v", False), ("upload_folder", "me/v", files)]
    pushed = hub.cache / "models--me--v" / "snapshots" / "main"
    assert not (pushed / "audio_tokenizer").exists()
    assert (pushed / "processor_config.json").read_bytes() == (out / "processor_config.json").read_bytes()
    processor = AutoProcessor.from_pretrained("me/v", cache_dir=str(hub.cache), local_files_only=True)
    assert processor.audio_tokenizer.config.num_quantizers == 8


def test_train_pushes_final_without_resume_state(tiny_dir, demo_cache, tmp_path, hub):
    cfg = small_config(
        tiny_dir,
        demo_cache,
        None,
        tmp_path / "run",
        ["train.max_steps=1", "train.warmup_steps=0", "checkpoint.push_to_hub=me/run"],
    )
    run = train(cfg)
    files = sorted(p.name for p in run.final_dir.iterdir() if p.name != "training_state.pt")
    assert hub.calls == [("create_repo", "me/run", False), ("upload_folder", "me/run", files)]
    assert "README.md" in files and "adapter_model.safetensors" in files
