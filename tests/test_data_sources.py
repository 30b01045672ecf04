"""Data where it lives: LJSpeech folders and Hugging Face datasets (save_to_disk, the local Hub
cache) become manifests, then prepare as any manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from higgs_tune.app.cli import main as cli
from higgs_tune.data.cache import CodeCache
from higgs_tune.data.sources import convert_hf_dataset, convert_source
from higgs_tune.errors import DataError


def tone(path, seconds=1.0, freq=220.0, sr=22050):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def ljspeech(root):
    lj = root / "LJSpeech-1.1"
    for i, f in enumerate((220.0, 330.0, 440.0)):
        tone(lj / "wavs" / f"LJ001-000{i + 1}.wav", 1.0 + 0.2 * i, f)
    (lj / "metadata.csv").write_text(
        "LJ001-0001|Printing, in the 1st sense|Printing, in the first sense\n"
        "LJ001-0002|in being comparatively modern.|\n"
        'LJ001-0003|For "although" the Chinese|For "although" the Chinese\n',
        encoding="utf-8",
    )
    return lj


def rows_of(manifest):
    return [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]


def test_ljspeech_folder_to_manifest_and_cache(tmp_path, tiny_dir):
    lj = ljspeech(tmp_path)
    result = convert_source(lj, language="en")
    assert result.manifest == tmp_path / "LJSpeech-1.1.jsonl"
    assert rows_of(result.manifest) == [
        {"id": "LJ001-0001", "audio": "LJSpeech-1.1/wavs/LJ001-0001.wav", "text": "Printing, in the first sense",
         "speaker": "LJSpeech-1.1", "language": "en"},
        {"id": "LJ001-0002", "audio": "LJSpeech-1.1/wavs/LJ001-0002.wav", "text": "in being comparatively modern.",
         "speaker": "LJSpeech-1.1", "language": "en"},
        {"id": "LJ001-0003", "audio": "LJSpeech-1.1/wavs/LJ001-0003.wav", "text": 'For "although" the Chinese',
         "speaker": "LJSpeech-1.1", "language": "en"},
    ]  # fmt: skip
    res = CliRunner().invoke(
        cli,
        [
            "prepare",
            "--from-folder",
            str(lj),
            "--language",
            "en",
            "--model",
            str(tiny_dir),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 0, res.output
    cache = CodeCache.open(tmp_path / "c")
    assert [(e.id, e.text) for e in cache.entries][1] == ("LJ001-0002", "in being comparatively modern.")


def test_ljspeech_problems_listed_at_once(tmp_path):
    lj = ljspeech(tmp_path)
    (lj / "wavs" / "LJ001-0002.wav").unlink()
    with open(lj / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("LJ001-0004\n")
    with pytest.raises(DataError) as e:
        convert_source(lj)
    msg = str(e.value)
    assert msg.startswith(f"cannot convert {lj}: 2 problem(s); nothing was written:")
    assert f"{lj / 'metadata.csv'} line 2: {lj / 'wavs' / 'LJ001-0002.wav'} not found" in msg
    assert f"{lj / 'metadata.csv'} line 4: 1 field(s). Fix: write `id|text` or `id|text|normalized text`." in msg


def hf_dataset(tmp_path):
    clips = [tone(tmp_path / "src" / f"c{i}.wav", 1.0 + 0.3 * i, 200.0 + 90 * i, sr=24000) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"audio": [str(c) for c in clips], "sentence": ["One.", "Two.", "Three."], "spk": ["a", "b", "a"]}
    ).cast_column("audio", datasets.Audio())
    return ds


def test_hf_save_to_disk_through_prepare(tmp_path, tiny_dir):
    saved = tmp_path / "my_ds"
    datasets.DatasetDict({"train": hf_dataset(tmp_path)}).save_to_disk(str(saved))
    for c in (tmp_path / "src").iterdir():
        c.unlink()  # the saved dataset holds the audio bytes itself
    args = ["prepare", "--hf-dataset", str(saved), "--split", "train", "--text-column", "sentence"]
    args += ["--speaker-column", "spk", "--manifest-out", str(tmp_path / "m" / "train.jsonl")]
    res = CliRunner().invoke(cli, [*args, "--model", str(tiny_dir), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert rows_of(tmp_path / "m" / "train.jsonl") == [
        {"id": f"train_{i:06d}", "audio": f"train_audio/train_{i:06d}.wav", "text": t, "speaker": s}
        for i, (t, s) in enumerate((("One.", "a"), ("Two.", "b"), ("Three.", "a")))
    ]
    cache = CodeCache.open(tmp_path / "c")
    assert [(e.speaker, e.text, e.language) for e in cache.entries] == [
        ("a", "One.", "und"), ("b", "Two.", "und"), ("a", "Three.", "und")
    ]  # fmt: skip
    # wrong split / column: clear errors naming what exists
    bad = CliRunner().invoke(cli, ["prepare", "--hf-dataset", str(saved), "--split", "test"])
    assert bad.exit_code == 2 and "has no split 'test' (it has train). Fix: pass --split NAME." in bad.output
    with pytest.raises(DataError, match=r"has no column --text-column 'text'; its columns: audio, sentence, spk"):
        convert_hf_dataset(saved, tmp_path / "x.jsonl")


def test_hf_dataset_from_the_local_hub_cache_offline(tmp_path):
    root = tmp_path / "hub" / "datasets--org--tiny-voices"
    snap = root / "snapshots" / "abc123"
    (snap / "data").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")
    hf_dataset(tmp_path).to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    code = (
        "from higgs_tune.data.sources import convert_hf_dataset as c;"
        f"r = c('org/tiny-voices', {str(tmp_path / 'out' / 'v.jsonl')!r}, text_column='sentence', speaker='v');"
        "print(r.rows)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "dscache")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "3", p.stderr[-2000:]
    rows = rows_of(tmp_path / "out" / "v.jsonl")
    assert [(r["text"], r["speaker"]) for r in rows] == [("One.", "v"), ("Two.", "v"), ("Three.", "v")]
    assert all((tmp_path / "out" / r["audio"]).is_file() for r in rows)
