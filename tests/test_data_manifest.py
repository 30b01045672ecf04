"""Manifest validation (one test per bad input), audio conversion, and folder -> manifest conversion.

Every bad-input test goes through `prepare_manifest` in strict mode and checks three things:
the error names the manifest line and field, says how to fix it, and the cache folder was
not created. Audio files are hand-made with soundfile in tmp_path.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr

from higgs_tune.data.audio import content_sha256, inspect_audio, normalize_loudness, to_codec_input
from higgs_tune.data.manifest import ManifestError, convert_folder, validate_manifest
from higgs_tune.data.prepare import prepare_manifest
from higgs_tune.errors import DataError


def tone(path, seconds=1.0, sr=24000, channels=1, amp=0.5, freq=220.0, subtype=None):
    """Write a sine tone; channel c is scaled by 1/(c+1) so channels differ."""
    t = np.arange(int(round(seconds * sr))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    data = np.stack([x / (c + 1) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)
    return path


def write_manifest(folder, rows):
    """rows: dicts (dumped as JSON) or raw bytes/str lines written as they are."""
    path = folder / "manifest.jsonl"
    out = b""
    for r in rows:
        if isinstance(r, dict):
            r = json.dumps(r, ensure_ascii=False)
        out += (r.encode("utf-8") if isinstance(r, str) else r) + b"\n"
    path.write_bytes(out)
    return path


def row(audio="a.wav", **kw):
    base = {"audio": audio, "text": "Hello there.", "speaker": "s1", "language": "en"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def strict_error(tmp_path, tiny_dir, rows, **kw) -> ManifestError:
    """Run prepare in strict mode; it must raise ManifestError and leave no cache folder."""
    manifest = write_manifest(tmp_path, rows)
    out = tmp_path / "cache"
    with pytest.raises(ManifestError) as e:
        prepare_manifest(manifest, tiny_dir, out, progress=False, **kw)
    assert not out.exists(), "strict mode must not write anything"
    assert f"nothing was written to {out}" in str(e.value)
    return e.value


def only_problem(err: ManifestError, line: int, field: str):
    assert [(p.row, p.field) for p in err.problems] == [(line, field)], err
    p = err.problems[0]
    assert f"manifest.jsonl:{line}" in str(err)
    assert "Fix:" in p.format("manifest.jsonl")
    return p


# ---------------------------------------------------------------------------- one test per bad input


def test_missing_audio_file(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    err = strict_error(tmp_path, tiny_dir, [row(), row("b.wav")])
    p = only_problem(err, 2, "audio")
    assert p.message == f"'b.wav' file not found (looked for {tmp_path / 'b.wav'})"
    assert p.id == "b"


def test_corrupt_audio_file(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    err = strict_error(tmp_path, tiny_dir, [row(), row("bad.wav")])
    p = only_problem(err, 2, "audio")
    assert p.message == "'bad.wav' cannot decode (Error in WAV file. No 'data' chunk marker.)"
    assert p.fix == "re-export the file (WAV or FLAC) or remove the row"


def test_truncated_flac(tmp_path, tiny_dir):
    full = tone(tmp_path / "full.flac", seconds=2.0)
    data = full.read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    err = strict_error(tmp_path, tiny_dir, [row("full.flac"), row("cut.flac")])
    p = only_problem(err, 2, "audio")
    assert p.message.startswith("'cut.flac' cannot decode (")


def test_silent_audio(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "quiet.wav", amp=0.0005, subtype="FLOAT")  # peak -66 dBFS
    err = strict_error(tmp_path, tiny_dir, [row(), row("quiet.wav")])
    p = only_problem(err, 2, "audio")
    assert p.message == "'quiet.wav' is silence only: peak -66.0 dBFS < -60 dBFS"


def test_nan_samples(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    x = np.full(24000, 0.1, np.float32)
    x[[10, 20, 30]] = [np.nan, np.inf, -np.inf]
    sf.write(tmp_path / "nan.wav", x, 24000, subtype="FLOAT")
    err = strict_error(tmp_path, tiny_dir, [row(), row("nan.wav")])
    p = only_problem(err, 2, "audio")
    assert p.message == "'nan.wav' has 3 NaN/Inf sample(s)"


def test_too_short_and_too_long(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav", seconds=1.0)
    tone(tmp_path / "short.wav", seconds=0.2)
    tone(tmp_path / "long.wav", seconds=2.5)
    err = strict_error(tmp_path, tiny_dir, [row(), row("short.wav"), row("long.wav")], max_seconds=2.0)
    assert [(p.row, p.field) for p in err.problems] == [(2, "audio"), (3, "audio")]
    assert err.problems[0].message == "'short.wav' is too short: 0.200 s < 0.3 s"
    assert err.problems[1].message == "'long.wav' is too long: 2.50 s > 2 s"
    assert "raise --max-seconds" in err.problems[1].fix


def test_bad_utf8_line(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav")
    bad = json.dumps(row("b.wav")).replace("Hello", "H\xe9llo").encode("latin-1")
    err = strict_error(tmp_path, tiny_dir, [row(), bad])
    p = only_problem(err, 2, "line")
    assert p.message == "is not valid UTF-8 (byte 0xe9 at byte 30)"


def test_invalid_json_and_non_object(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    err = strict_error(tmp_path, tiny_dir, [row(), '{"audio": "b.wav", "text": }', '["a.wav"]'])
    assert [(p.row, p.field) for p in err.problems] == [(2, "line"), (3, "line")]
    assert err.problems[0].message == "is not valid JSON (Expecting value at column 28)"
    assert err.problems[1].message == "is a JSON list, not an object"


def test_duplicate_id_names_both_rows(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "sub" / "a.wav", freq=330)  # same stem -> same default id
    err = strict_error(tmp_path, tiny_dir, [row(), row("sub/a.wav")])
    assert [(p.row, p.field, p.message) for p in err.problems] == [
        (1, "id", "duplicate id 'a' (also on line 2)"),
        (2, "id", "duplicate id 'a' (also on line 1)"),
    ]


def test_unknown_and_missing_keys(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    r = {"audio": "a.wav", "transcript": "Hello.", "speaker": "s1", "language": "en", "emotion": "happy"}
    err = strict_error(tmp_path, tiny_dir, [r])
    assert [(p.field, p.message, p.fix) for p in err.problems] == [
        ("transcript", "unknown key", "rename it to 'text'"),
        (
            "emotion",
            "unknown key",
            "remove it (known keys: audio, text, speaker, language, id, scene, ref_audio, ref_text)",
        ),
        ("text", "missing required key", 'add "text"'),
    ]
    # the alias next to the real key: renaming would duplicate it, so the fix is to remove it
    err = strict_error(tmp_path, tiny_dir, [{**row(), "transcript": "Hello there."}])
    assert [(p.field, p.message, p.fix) for p in err.problems] == [
        ("transcript", "unknown key", "remove it (the row already has 'text')")
    ]


def test_empty_text(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav")
    err = strict_error(tmp_path, tiny_dir, [row(), row("b.wav", text="  \t ")])
    p = only_problem(err, 2, "text")
    assert p.message == "is empty or whitespace-only"


def test_wrong_types(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    err = strict_error(tmp_path, tiny_dir, [row(speaker=7, id=3)])
    assert [(p.field, p.message) for p in err.problems] == [
        ("speaker", "must be a string, got int 7"),
        ("id", "must be a string, got int 3"),
    ]


def test_path_escaping_root(tmp_path, tiny_dir):
    data = tmp_path / "data"
    tone(data / "a.wav")
    tone(tmp_path / "x.wav")
    manifest = write_manifest(data, [row(), row("../x.wav")])
    with pytest.raises(ManifestError) as e:
        prepare_manifest(manifest, tiny_dir, data / "cache", progress=False)
    assert not (data / "cache").exists()
    p = only_problem(e.value, 2, "audio")
    assert p.message == f"'../x.wav' is outside the dataset root {data}"
    assert "--allow-outside-root" in p.fix
    # explicitly allowed: both rows are valid
    v = validate_manifest(manifest, allow_outside_root=True)
    assert [r.audio_path for r in v.rows] == [data / "a.wav", tmp_path / "x.wav"] and not v.problems


def test_ref_equal_to_target_same_path(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    err = strict_error(tmp_path, tiny_dir, [row(ref_audio="./a.wav", ref_text="Hello there.")])
    p = only_problem(err, 1, "ref_audio")
    assert p.message == "is the target clip itself ('./a.wav')"


def test_ref_equal_to_target_same_content(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    shutil.copy(tmp_path / "a.wav", tmp_path / "copy.wav")
    err = strict_error(tmp_path, tiny_dir, [row(ref_audio="copy.wav", ref_text="Hello there.")])
    p = only_problem(err, 1, "ref_audio")
    assert p.message == "'copy.wav' has the same audio content as the target 'a.wav'"


def test_ref_audio_without_ref_text_and_vice_versa(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav", freq=330)
    tone(tmp_path / "c.wav", freq=440)
    err = strict_error(tmp_path, tiny_dir, [row(ref_audio="b.wav"), row("c.wav", ref_text="Hi.")])
    assert [(p.row, p.field, p.message) for p in err.problems] == [
        (1, "ref_text", "missing: ref_audio is set but ref_text is not"),
        (2, "ref_audio", "missing: ref_text is set but ref_audio is not"),
    ]


def test_bad_reference_file_is_reported_on_ref_audio(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    err = strict_error(tmp_path, tiny_dir, [row(ref_audio="gone.wav", ref_text="Hi.")])
    p = only_problem(err, 1, "ref_audio")
    assert p.message.startswith("'gone.wav' file not found")


def test_empty_manifest_is_fatal_even_with_skip_invalid(tmp_path, tiny_dir):
    manifest = write_manifest(tmp_path, ["", "   "])
    with pytest.raises(ManifestError, match="has no rows"):
        prepare_manifest(manifest, tiny_dir, tmp_path / "cache", skip_invalid=True, progress=False)
    assert not (tmp_path / "cache").exists()


def test_skip_invalid_with_no_valid_row_left(tmp_path, tiny_dir):
    manifest = write_manifest(tmp_path, [row("gone.wav")])
    with pytest.raises(ManifestError) as e:
        prepare_manifest(manifest, tiny_dir, tmp_path / "cache", skip_invalid=True, progress=False)
    assert [(p.row, p.field) for p in e.value.problems] == [(1, "audio"), (None, "rows")]
    assert "manifest.jsonl rows: no valid row left to prepare" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_all_problems_reported_at_once(tmp_path, tiny_dir):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "short.wav", seconds=0.1)
    rows = [row(), row("missing.wav"), "{oops", row("short.wav", text=""), row(lang="en")]
    err = strict_error(tmp_path, tiny_dir, rows)
    assert [(p.row, p.field) for p in err.problems] == [
        (1, "id"),
        (2, "audio"),
        (3, "line"),
        (4, "text"),
        (4, "audio"),
        (5, "lang"),
        (5, "id"),
    ]
    text = str(err)
    assert text.startswith(f"{tmp_path / 'manifest.jsonl'}: 7 problem(s) in 5 row(s); nothing was written")
    assert text.rstrip().endswith(
        "pass --skip-invalid to prepare the valid rows and list the rejected ones in rejects.jsonl."
    )


def test_missing_manifest_and_folder_given(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        validate_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        validate_manifest(tmp_path)


# ---------------------------------------------------------------------------- valid input


def test_valid_rows_parsed_with_defaults(tmp_path):
    tone(tmp_path / "audio" / "a.wav")
    tone(tmp_path / "audio" / "b.flac", freq=330)
    tone(tmp_path / "audio" / "c.wav", freq=440)
    manifest = write_manifest(
        tmp_path,
        [
            "\ufeff" + json.dumps(row("audio/a.wav", scene="A quiet room.")),
            "",
            json.dumps(row("audio/b.flac", id="clip-b", ref_audio="audio/a.wav", ref_text="Hello there."))
            + "\r",  # CRLF
            {**row("audio/c.wav"), "id": None, "scene": None, "ref_audio": None, "ref_text": None},
        ],
    )
    v = validate_manifest(manifest)
    assert not v.problems and not v.rejects
    a, b, c = v.rows
    assert (a.row, a.id, a.scene, a.ref_audio) == (1, "a", "A quiet room.", None)
    assert (b.row, b.id, b.ref_audio_path, b.ref_text) == (3, "clip-b", tmp_path / "audio" / "a.wav", "Hello there.")
    assert (c.row, c.id, c.scene, c.ref_audio_path, c.ref_text) == (4, "c", None, None, None)
    assert set(v.audio) == {tmp_path / "audio" / n for n in ("a.wav", "b.flac", "c.wav")}


def test_stereo_44k_converted_to_mono_24k(tmp_path):
    path = tone(tmp_path / "st.wav", seconds=1.0, sr=44100, channels=2, subtype="FLOAT")
    samples, sr = sf.read(path, dtype="float32", always_2d=True)
    assert samples.shape == (44100, 2) and sr == 44100
    out = to_codec_input(samples, sr, 24000)
    # mono = mean of the channels (x and x/2), then soxr HQ 44.1k -> 24k
    expected = soxr.resample((samples[:, 0] + samples[:, 1]) / 2, 44100, 24000, quality="HQ")
    assert out.dtype == np.float32 and out.shape == (24000,)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    # the mono mix has peak 0.75 * 0.5: a 220 Hz tone survives resampling with its amplitude
    assert abs(float(np.max(np.abs(out))) - 0.375) < 2e-3
    info, problems = inspect_audio(path, target_rate=24000)
    assert problems == []
    assert (info.sample_rate, info.channels, info.num_samples, info.codec_samples) == (44100, 2, 44100, 24000)
    assert info.duration_s == 1.0


def test_content_hash_ignores_container():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1000, 1)).astype(np.float32)
    assert content_sha256(x, 16000) == content_sha256(x.copy(), 16000)
    assert content_sha256(x, 16000) != content_sha256(x, 22050)


def test_content_hash_same_for_wav_and_flac(tmp_path):
    # the same 16-bit samples in two containers (libsndfile rounds float -> PCM_16 differently
    # for WAV and FLAC, so the samples are written as int16 to be really the same)
    x = (np.random.default_rng(0).uniform(-0.5, 0.5, 24000) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", x, 24000, subtype="PCM_16")
    a, _ = inspect_audio(tmp_path / "a.wav", target_rate=24000)
    b, _ = inspect_audio(tmp_path / "a.flac", target_rate=24000)
    assert a.sha256 == b.sha256


def test_normalize_loudness_rms_then_peak_ceiling():
    t = np.arange(24000) / 24000
    quiet = (0.01 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # RMS 0.00707 = -43 dBFS
    out = normalize_loudness(quiet)
    rms = math.sqrt(float(np.mean(out.astype(np.float64) ** 2)))
    assert abs(20 * math.log10(rms) - -20.0) < 1e-4
    spiky = np.zeros(24000, np.float32)
    spiky[::1000] = 0.05  # RMS -> -20 dBFS would put the peak far above full scale
    out = normalize_loudness(spiky)
    assert abs(20 * math.log10(float(np.max(np.abs(out)))) - -1.0) < 1e-4
    assert normalize_loudness(np.zeros(10, np.float32)).tolist() == [0.0] * 10


# ---------------------------------------------------------------------------- folder -> manifest


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_folder_of_pairs(tmp_path):
    ds = tmp_path / "voices"
    tone(ds / "spk1" / "001.wav")
    (ds / "spk1" / "001.txt").write_text("First line.\n", encoding="utf-8")
    tone(ds / "spk2" / "001.wav", freq=330)
    (ds / "spk2" / "001.txt").write_text("مرحبا", encoding="utf-8")
    tone(ds / "solo.flac", freq=440)
    (ds / "solo.txt").write_text("Solo.", encoding="utf-8")
    result = convert_folder(ds, language="en")
    assert result.manifest == tmp_path / "voices.jsonl" and result.rows == 3 and not result.outside_root
    assert read_jsonl(result.manifest) == [
        {"id": "solo", "audio": "voices/solo.flac", "text": "Solo.", "speaker": "voices", "language": "en"},
        {"id": "spk1_001", "audio": "voices/spk1/001.wav", "text": "First line.", "speaker": "spk1", "language": "en"},
        {"id": "spk2_001", "audio": "voices/spk2/001.wav", "text": "مرحبا", "speaker": "spk2", "language": "en"},
    ]
    assert not validate_manifest(result.manifest).problems
    written = result.manifest.read_bytes()
    again = convert_folder(ds, language="en")  # unchanged folder: the manifest is reused as it is
    assert (again.rows, again.unchanged, result.unchanged) == (3, True, False)
    assert result.manifest.read_bytes() == written
    (ds / "solo.txt").write_text("Solo, changed.", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"voices.jsonl already exists and differs from what .*voices converts to now. Fix: delete it"
    ):
        convert_folder(ds, language="en")
    assert result.manifest.read_bytes() == written
    replaced = convert_folder(ds, language="en", overwrite=True)
    assert (replaced.rows, replaced.unchanged) == (3, False)
    assert read_jsonl(result.manifest)[0]["text"] == "Solo, changed."


def test_convert_folder_reports_all_problems_and_writes_nothing(tmp_path):
    ds = tmp_path / "voices"
    tone(ds / "a.wav")
    tone(ds / "b.wav")
    (ds / "b.txt").write_bytes(b"caf\xe9")
    (ds / "orphan.txt").write_text("no audio", encoding="utf-8")
    with pytest.raises(DataError) as e:
        convert_folder(ds)
    msg = str(e.value)
    assert msg.startswith(f"cannot convert {ds}: 3 problem(s); nothing was written:")
    assert f"{ds / 'orphan.txt'}: transcript without an audio file" in msg
    assert f"{ds / 'a.txt'}: transcript file not found" in msg
    assert f"{ds / 'b.txt'}: not valid UTF-8" in msg
    assert not (tmp_path / "voices.jsonl").exists()


def test_convert_folder_needs_language(tmp_path):
    ds = tmp_path / "voices"
    tone(ds / "a.wav")
    (ds / "a.txt").write_text("Hi.", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.wav: no language. Fix: pass --language CODE"):
        convert_folder(ds)


@pytest.mark.parametrize("wrapped", [True, False], ids=["samples-dict", "plain-list"])
def test_convert_community_metadata_json(tmp_path, wrapped):
    ds = tmp_path / "higgs_training_data"
    tone(ds / "huo_000.wav")
    (ds / "huo_000.txt").write_text("From the transcript file.", encoding="utf-8")
    tone(ds / "huo_001.wav", freq=330)
    samples = [
        {
            "id": "huo_000",
            "audio_file": "huo_000.wav",
            "transcript_file": "huo_000.txt",
            "duration": 1.0,
            "speaker_id": "huo_speaker",
            "scene": "quiet_room",
            "emotion": "alerting",
            "language": "zh",
        },
        {"audio": "huo_001.wav", "transcript": "Inline transcript.", "speaker": "huo", "gender": "unknown"},
    ]
    meta = {"dataset_info": {"total_samples": 2}, "samples": samples} if wrapped else samples
    (ds / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    out = tmp_path / "m" / "train.jsonl"
    result = convert_folder(ds, manifest_out=out, language="en")
    assert result.ignored_keys == ["duration", "emotion", "gender"]
    assert read_jsonl(out) == [
        {
            "id": "huo_000",
            "audio": "../higgs_training_data/huo_000.wav",
            "text": "From the transcript file.",
            "speaker": "huo_speaker",
            "language": "zh",
            "scene": "quiet_room",
        },
        {
            "id": "huo_001",
            "audio": "../higgs_training_data/huo_001.wav",
            "text": "Inline transcript.",
            "speaker": "huo",
            "language": "en",
        },
    ]
    assert result.outside_root
    assert [r.id for r in validate_manifest(out, allow_outside_root=True).rows] == ["huo_000", "huo_001"]


def test_convert_metadata_numeric_speaker_and_non_string_text(tmp_path):
    """Numeric speaker ids (common in community datasets) become names; a non-string transcript is
    reported against metadata.json, where the user can fix it, not against the generated manifest."""
    ds = tmp_path / "d"
    tone(ds / "a.wav")
    tone(ds / "b.wav", freq=330)
    (ds / "metadata.json").write_text(
        json.dumps(
            [
                {"audio_file": "a.wav", "text": "Fine.", "speaker_id": 1034},
                {"audio_file": "b.wav", "text": 7, "speaker_id": 1034},
            ]
        ),
        encoding="utf-8",
    )
    with pytest.raises(DataError) as e:
        convert_folder(ds, language="en")
    assert str(e.value) == (
        f"cannot convert {ds}: 1 problem(s); nothing was written:\n"
        f'  - {ds / "metadata.json"} sample 2: "text"/"transcript" is int 7, not a string. '
        "Fix: write the transcript as a JSON string."
    )
    (ds / "metadata.json").write_text(
        json.dumps([{"audio_file": "a.wav", "text": "Fine.", "speaker_id": 1034}]), encoding="utf-8"
    )
    result = convert_folder(ds, language="en")
    assert read_jsonl(result.manifest) == [
        {"id": "a", "audio": "d/a.wav", "text": "Fine.", "speaker": "1034", "language": "en"}
    ]
