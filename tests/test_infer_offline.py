"""Offline with a Hub id: fail at once with the fix, or load from the Hub cache without the network;
`make-tiny --eval-models DIR` builds the tiny ASR/speaker models from the CLI."""

from __future__ import annotations

import socket
import time

import pytest
from click.testing import CliRunner

from higgs_tune.app.cli import main as cli
from higgs_tune.errors import ModelLoadError
from higgs_tune.infer.evaluate import AsrModel, SpeakerModel
from higgs_tune.model.hub import check_hub_source
from higgs_tune.tiny.eval_models import make_tiny_eval_models


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: a connection is refused at once
    return port


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_offline_fails_at_once_with_the_fix(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        AsrModel.load("openai/whisper-large-v3")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert (
        f"the ASR model 'openai/whisper-large-v3' is not a local folder and not in the Hub cache ({empty_cache})" in msg
    )
    assert "HF_HUB_OFFLINE is set" in msg and "pass --asr-model DIR" in msg


def test_unreachable_hub_fails_at_once(empty_cache, monkeypatch, closed_port):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(ModelLoadError, match=rf"the Hub \(http://127.0.0.1:{closed_port}\) cannot be reached"):
        SpeakerModel.load("microsoft/wavlm-base-plus-sv")
    # through the CLI: before any model is loaded, exit 2 with the message
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["evaluate", "m.jsonl", "--model", "no-such", "--out", "o"])
    assert res.exit_code == 2 and "the ASR model 'openai/whisper-large-v3'" in res.output, res.output
    assert time.perf_counter() - t0 < 10


def test_cached_hub_id_loads_offline(tmp_path, empty_cache, monkeypatch):
    asr_dir, spk_dir = make_tiny_eval_models(tmp_path / "src")
    for repo, src in (("org/tiny-asr", asr_dir), ("org/tiny-spk", spk_dir)):
        root = empty_cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("abc123")
        snap = root / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        for f in src.iterdir():
            (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_hub_source("org/tiny-asr", what="ASR model", option="--asr-model") is True
    assert AsrModel.load("org/tiny-asr").name == "org/tiny-asr"
    assert SpeakerModel.load("org/tiny-spk").name == "org/tiny-spk"


def test_make_tiny_eval_models_from_the_cli(tmp_path):
    res = CliRunner().invoke(cli, ["make-tiny", "--eval-models", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    asr, spk = tmp_path / "eval" / "asr", tmp_path / "eval" / "speaker"
    assert f"--asr-model {asr} --speaker-model {spk}" in res.output
    assert AsrModel.load(asr).sample_rate == 16000 and SpeakerModel.load(spk).name == str(spk)
    again = CliRunner().invoke(cli, ["make-tiny", "--eval-models", str(tmp_path / "eval")])
    assert again.exit_code == 2 and "add --overwrite" in again.output
    assert CliRunner().invoke(cli, ["make-tiny"]).exit_code == 2
