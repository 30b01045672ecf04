"""`prepare` end to end with the tiny codec: codes, batching, incremental re-runs, resume, cache checks, CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from fixtures_data import prepare_demo_cache

from higgs_tune.app.cli import main as cli
from higgs_tune.data.audio import read_audio, to_codec_input
from higgs_tune.data.cache import CacheWriter, CodeCache
from higgs_tune.data.manifest import ManifestError
from higgs_tune.data.prepare import (
    codec_fingerprint,
    codec_num_frames,
    encode_batch,
    load_audio_tokenizer,
    prepare_manifest,
)
from higgs_tune.errors import DataError
from higgs_tune.tiny import TinySpec, build_audio_tokenizer


def demo_rows(demo_manifest):
    return [json.loads(line) for line in demo_manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return load_audio_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def demo_waves(demo_manifest):
    """id -> (N,) float32 at 24 kHz: exactly what prepare feeds the codec."""
    root = demo_manifest.parent
    return {r["id"]: to_codec_input(*read_audio(root / r["audio"]), 24000) for r in demo_rows(demo_manifest)}


@pytest.fixture(scope="module")
def single_codes(codec, demo_waves):
    """id -> int16 (K, T): every demo clip encoded alone (the reference for batching)."""
    return {i: encode_batch(codec, [w])[0] for i, w in demo_waves.items()}


@pytest.fixture(scope="module")
def demo_prepared(tiny_dir, demo_manifest, tmp_path_factory):
    """The demo manifest prepared with default batching and 8 clips per shard -> (cache dir, result)."""
    out = tmp_path_factory.mktemp("prepared") / "cache"
    result = prepare_manifest(demo_manifest, tiny_dir, out, shard_size=8, progress=False)
    return out, result


def small_dataset(folder, demo_manifest, n=3, **extra_rows):
    """Copy the first n demo clips (no refs) into `folder` with a manifest; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in demo_rows(demo_manifest)[:n]:
        shutil.copy(demo_manifest.parent / r["audio"], folder / f"{r['id']}.flac")
        rows.append(
            {
                "id": r["id"],
                "audio": f"{r['id']}.flac",
                "text": r["text"],
                "speaker": r["speaker"],
                "language": r["language"],
            }
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return manifest


def code_diff(cache: CodeCache, reference: dict) -> tuple[int, int]:
    """(codes that differ from `reference`, total codes) over all entries of `cache`."""
    diff = total = 0
    for e in cache.entries:
        ref = torch.from_numpy(reference[e.id]).long()
        got = cache.codes(e.key)
        assert got.shape == ref.shape
        diff += int((got != ref).sum())
        total += ref.numel()
    return diff, total


# ---------------------------------------------------------------------------- the codec's length rule


def test_codec_num_frames_matches_the_codec(codec):
    """Frames = the codec's real output length, which is not ceil(samples / 960) everywhere."""
    lengths = [
        7200,
        8700,
        8760,
        9000,
        9599,
        9600,
        9601,
        9660,
        9718,
        9719,
        9720,
        10080,
        10081,
        10560,
        24000,
        48017,
        50344,
        72000,
    ]
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        x = torch.randn(1, 1, n, generator=g) * 0.1
        with torch.inference_mode():
            frames = codec.encode(x, return_dict=False).shape[-1]
        assert codec_num_frames(codec.config, n) == frames, n
    # where the rule and ceil(n / 960) part: up to 118 samples past a multiple of 960, one frame less
    assert [codec_num_frames(codec.config, n) for n in (9600, 9601, 9718, 9719, 10080)] == [10, 10, 10, 11, 11]
    assert [math.ceil(n / 960) for n in (9600, 9601, 9718, 9719, 10080)] == [10, 11, 11, 11, 11]


def test_equal_length_batch_is_exact(codec):
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(30000) * 0.1).astype(np.float32) for _ in range(4)]
    batched = encode_batch(codec, waves)
    for w, b in zip(waves, batched, strict=True):
        assert b.dtype == np.int16 and b.shape == (8, codec_num_frames(codec.config, 30000))
        np.testing.assert_array_equal(b, encode_batch(codec, [w])[0])


# ---------------------------------------------------------------------------- the demo data


def test_demo_prepare_codes(demo_prepared, demo_manifest, demo_waves, codec):
    out, result = demo_prepared
    rows = demo_rows(demo_manifest)
    assert (result.entries, result.encoded, result.reused, result.rejected) == (26, 26, 0, 0)
    cache = CodeCache.open(out)
    assert (cache.num_codebooks, cache.codebook_size, cache.frame_rate, cache.sample_rate) == (8, 1024, 25, 24000)
    assert cache.codec_fingerprint == codec_fingerprint(codec)
    assert [e.id for e in cache.entries] == [r["id"] for r in rows]
    assert cache.rejects == [] and (out / "rejects.jsonl").read_text() == ""
    for e, r in zip(cache.entries, rows, strict=True):
        n = len(demo_waves[e.id])
        info = sf.info(demo_manifest.parent / r["audio"])
        assert (e.text, e.speaker, e.language, e.audio, e.scene) == (
            r["text"],
            r["speaker"],
            r["language"],
            r["audio"],
            None,
        )
        assert e.duration_s == round(info.frames / 22050, 6)
        assert e.num_frames == codec_num_frames(codec.config, n)
        # the codec's rule: ceil(n / 960), one less just past a multiple of 960 -> within 1 of 25 fps
        assert math.ceil(n / 960) - 1 <= e.num_frames <= math.ceil(n / 960)
        assert abs(e.num_frames - e.duration_s * 25) <= 1
        codes = cache.codes(e.key)
        assert codes.dtype == torch.int64 and codes.shape == (8, e.num_frames)
        assert 0 <= int(codes.min()) and int(codes.max()) <= 1023
        # not constant (the tiny random codec uses few codes in its deeper codebooks; codebook 0 varies)
        assert len(torch.unique(codes[0])) > 1, f"{e.id}: codebook 0 is constant"
    # explicit voice prompts reuse the codes of the manifest clip they point at
    by_id = {e.id: e for e in cache.entries}
    assert by_id["en_a_001"].ref_key == by_id["en_a_000"].key and by_id["en_a_001"].ref_text == rows[0]["text"]
    assert by_id["ar_a_001"].ref_key == by_id["ar_a_000"].key
    assert sum(e.ref_key is not None for e in cache.entries) == 2
    assert len({tuple(cache.codes(e.key)[0].tolist()) for e in cache.entries}) == 26  # every clip its own codes
    # storage: int16 (K, T) per key in safetensors shards; every shard listed in the index
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is True and index["format_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(index["shards"]) + ["index.json", "rejects.jsonl"]
    from safetensors.torch import load_file

    stored = {k: v for name in index["shards"] for k, v in load_file(out / name).items()}
    assert len(stored) == 26 and all(v.dtype == torch.int16 and v.shape[0] == 8 for v in stored.values())
    assert index["entries"][1]["sha256"] and index["entries"][1]["ref_audio"] == "audio/en_a_000.flac"


def test_batched_vs_single_encoding_agreement(
    demo_prepared, single_codes, codec, demo_waves, tiny_dir, demo_manifest, tmp_path
):
    """The codec has no padding mask: measure what batching changes, and that exact mode changes nothing."""
    out, result = demo_prepared
    diff, total = code_diff(CodeCache.open(out), single_codes)
    # naive batching for comparison: sort by length, batches of 8, pad to the longest
    order = sorted(demo_waves, key=lambda i: len(demo_waves[i]))
    naive = {}
    for b in range(0, len(order), 8):
        ids = order[b : b + 8]
        naive.update(zip(ids, encode_batch(codec, [demo_waves[i] for i in ids]), strict=True))
    naive_diff = sum(int((naive[i] != single_codes[i]).sum()) for i in order)
    exact = prepare_manifest(demo_manifest, tiny_dir, tmp_path / "exact", pad_tolerance_s=0.0, progress=False)
    exact_diff, _ = code_diff(CodeCache.open(tmp_path / "exact"), single_codes)
    one_by_one = prepare_manifest(demo_manifest, tiny_dir, tmp_path / "single", batch_seconds=0, progress=False)
    print(
        f"\ndemo codes differing from one-by-one encoding: default batching {diff}/{total} ({diff / total:.3%}) "
        f"in {result.codec_calls} codec calls; naive pad-to-longest batches of 8: {naive_diff}/{total} "
        f"({naive_diff / total:.3%}); --pad-tolerance 0: {exact_diff}/{total} in {exact.codec_calls} calls\n"
        f"throughput (tiny codec, 1 thread): default {result.clips_per_second:.1f} clips/s, "
        f"one by one {one_by_one.clips_per_second:.1f} clips/s"
    )
    assert exact_diff == 0
    assert diff / total < 0.005
    assert naive_diff > diff
    assert result.codec_calls < 26 == one_by_one.codec_calls


def test_second_run_encodes_nothing(demo_prepared, tiny_dir, demo_manifest, tmp_path):
    src, _ = demo_prepared
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    before = {p.name: p.read_bytes() for p in out.glob("codes-*.safetensors")}
    result = prepare_manifest(demo_manifest, tiny_dir, out, shard_size=8, progress=False)
    assert (result.encoded, result.reused, result.shards_written, result.shards_removed) == (0, 26, [], [])
    assert {p.name: p.read_bytes() for p in out.glob("codes-*.safetensors")} == before
    assert CodeCache.open(out).entries == CodeCache.open(src).entries


def test_incremental_update(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=4)
    out = tmp_path / "cache"
    first = prepare_manifest(manifest, tiny_dir, out, progress=False)
    assert first.encoded == 4
    old = {e.id: e for e in CodeCache.open(out).entries}
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["text"] = "A corrected transcript."  # metadata only: no re-encode
    shutil.copy(demo_manifest.parent / "audio/en_b_000.flac", tmp_path / "ds" / rows[1]["audio"])  # new content
    shutil.copy(demo_manifest.parent / "audio/en_b_001.flac", tmp_path / "ds" / "new.flac")
    rows.append({"id": "new", "audio": "new.flac", "text": "New row.", "speaker": "en_b", "language": "en"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = prepare_manifest(manifest, tiny_dir, out, progress=False)
    assert (second.encoded, second.reused) == (2, 3)
    cache = CodeCache.open(out)
    new = {e.id: e for e in cache.entries}
    assert new[rows[0]["id"]].text == "A corrected transcript." and new[rows[0]["id"]].key == old[rows[0]["id"]].key
    assert new[rows[1]["id"]].key != old[rows[1]["id"]].key
    assert [e.id for e in cache.entries] == [r["id"] for r in rows]


def test_interrupted_run_resumes(tiny_dir, demo_manifest, single_codes, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_add_shard = CacheWriter.add_shard
    calls = []

    def crash_on_third_shard(self, codes):
        calls.append(len(codes))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the third shard was being written
        return real_add_shard(self, codes)

    monkeypatch.setattr(CacheWriter, "add_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_manifest(demo_manifest, tiny_dir, out, shard_size=8, pad_tolerance_s=0.0, progress=False)
    monkeypatch.setattr(CacheWriter, "add_shard", real_add_shard)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and sorted(index["shards"]) == [
        "codes-00000.safetensors",
        "codes-00001.safetensors",
    ]
    with pytest.raises(
        DataError, match=r"prepare did not finish \(interrupted\?\).*again; it resumes from the finished shards"
    ):
        CodeCache.open(out)
    # leftovers of a crash in the middle of a write: a shard the index does not list, a temp file
    (out / "codes-00009.safetensors").write_bytes(b"partial")
    (out / ".index.json.tmp-4242").write_bytes(b"{")
    result = prepare_manifest(demo_manifest, tiny_dir, out, shard_size=8, pad_tolerance_s=0.0, progress=False)
    assert (result.encoded, result.reused) == (26 - 16, 16)
    assert not (out / "codes-00009.safetensors").exists() and not (out / ".index.json.tmp-4242").exists()
    diff, total = code_diff(CodeCache.open(out), single_codes)
    assert (diff, total) == (0, sum(c.size for c in single_codes.values()))


def test_damaged_shard_is_re_encoded_on_the_next_run(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=3)
    out = tmp_path / "cache"
    prepare_manifest(manifest, tiny_dir, out, shard_size=2, progress=False)
    shard = out / "codes-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match=r"codes-00000.safetensors is damaged \(checksum differs"):
        CodeCache.open(out)
    notes = []
    result = prepare_manifest(manifest, tiny_dir, out, shard_size=2, progress=False, log=notes.append)
    assert result.shards_dropped == ["codes-00000.safetensors"] and result.encoded == 2
    assert notes == [f"{shard} was missing or damaged; its clips are encoded again"]
    assert len(CodeCache.open(out).entries) == 3


# ---------------------------------------------------------------------------- strict / skip-invalid


def test_skip_invalid_writes_rejects(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=2)
    with manifest.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"audio": "gone.flac", "text": "x", "speaker": "s", "language": "en"}) + "\n")
        f.write(
            json.dumps({"id": "blank", "audio": "en_a_000.flac", "text": " ", "speaker": "s", "language": "en"}) + "\n"
        )
        f.write("{not json\n")
    out = tmp_path / "cache"
    with pytest.raises(ManifestError) as e:
        prepare_manifest(manifest, tiny_dir, out, progress=False)
    assert not out.exists()
    assert [(p.row, p.field) for p in e.value.problems] == [(3, "audio"), (4, "text"), (5, "line")]

    result = prepare_manifest(manifest, tiny_dir, out, skip_invalid=True, progress=False)
    assert (result.entries, result.rejected, result.encoded) == (2, 3, 2)
    expected = [
        {
            "row": 3,
            "id": "gone",
            "audio": "gone.flac",
            "reason": f"audio: 'gone.flac' file not found (looked for {tmp_path / 'ds' / 'gone.flac'})",
        },
        {"row": 4, "id": "blank", "audio": "en_a_000.flac", "reason": "text: is empty or whitespace-only"},
        {
            "row": 5,
            "id": None,
            "audio": None,
            "reason": "line: is not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        },
    ]
    assert [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()] == expected
    cache = CodeCache.open(out)
    assert cache.rejects == expected and [e.id for e in cache.entries] == ["en_a_000", "en_a_001"]


def test_reference_outside_the_manifest_is_encoded_too(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=2)
    shutil.copy(demo_manifest.parent / "audio/en_a_002.flac", tmp_path / "ds" / "prompt.flac")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0] |= {"ref_audio": "prompt.flac", "ref_text": "The prompt."}  # not a manifest clip
    rows[1] |= {"ref_audio": rows[0]["audio"], "ref_text": rows[0]["text"]}  # a manifest clip: reused
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = prepare_manifest(manifest, tiny_dir, tmp_path / "cache", progress=False)
    assert (result.entries, result.encoded) == (2, 3)
    cache = CodeCache.open(tmp_path / "cache")
    first, second = cache.entries
    assert first.ref_key not in {first.key, second.key} and second.ref_key == first.key
    assert cache.codes(first.ref_key).shape[0] == 8


def test_stereo_44k_clip_is_prepared(tiny_dir, codec, tmp_path):
    t = np.arange(44100) / 44100
    x = 0.4 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t)
    sf.write(tmp_path / "st.wav", np.stack([x, 0.5 * x], axis=1), 44100, subtype="FLOAT")
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"audio": "st.wav", "text": "Stereo.", "speaker": "s", "language": "en"}) + "\n"
    )
    prepare_manifest(tmp_path / "manifest.jsonl", tiny_dir, tmp_path / "cache", progress=False)
    (entry,) = CodeCache.open(tmp_path / "cache").entries
    wave = to_codec_input(*read_audio(tmp_path / "st.wav"), 24000)
    assert wave.shape == (24000,) and entry.duration_s == 1.0
    assert entry.num_frames == codec_num_frames(codec.config, 24000) == 25
    expected = encode_batch(codec, [wave])[0]
    assert torch.equal(CodeCache.open(tmp_path / "cache").codes(entry.key), torch.from_numpy(expected).long())


def test_loudness_normalisation_is_part_of_the_key(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=1)
    out = tmp_path / "cache"
    prepare_manifest(manifest, tiny_dir, out, progress=False)
    plain = CodeCache.open(out)
    result = prepare_manifest(manifest, tiny_dir, out, normalize_loudness=True, progress=False)
    loud = CodeCache.open(out)
    assert result.encoded == 1 and result.shards_removed == ["codes-00000.safetensors"]
    assert loud.entries[0].key != plain.entries[0].key
    assert loud.header["preprocessing"]["loudness"] == "rms-20dBFS-peak-1dBFS"
    assert "--normalize-loudness" in loud.header["command"]


# ---------------------------------------------------------------------------- cache folder checks


def test_cache_of_another_codec_is_refused(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=2)
    out = tmp_path / "cache"
    prepare_manifest(manifest, tiny_dir, out, progress=False)
    index_before = (out / "index.json").read_bytes()
    other = tmp_path / "other"
    build_audio_tokenizer(TinySpec(seed=1)).save_pretrained(other / "audio_tokenizer")
    with pytest.raises(DataError) as e:
        prepare_manifest(manifest, other, out, progress=False)
    assert f"{out} holds codes of another audio tokenizer (codec_fingerprint" in str(e.value)
    assert "Fix: pass --overwrite to rebuild it, or choose another --out." in str(e.value)
    assert (out / "index.json").read_bytes() == index_before
    result = prepare_manifest(manifest, other, out, overwrite=True, progress=False)
    assert result.encoded == 2
    assert CodeCache.open(out).header["codec_source"] == str(other)


def _same_weights_from_a_config_dict(codec, folder):
    """The codec as v3's loader builds its bundled copy (`load_v3_codec`): from a config written
    without metadata, as the released STANDARD_CODEC_CONFIG is (no `architectures`, `dtype` None),
    with the same weights loaded strictly."""
    from higgs_tune.families.v3.checkpoint import CODEC_CONFIG_FILE, load_v3_codec

    meta = ("architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version")
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in json.loads(codec.config.to_json_string()).items() if k not in meta}
    (folder / CODEC_CONFIG_FILE).write_text(json.dumps(config))
    return load_v3_codec(folder, codec_state=codec.state_dict())


def test_codec_fingerprint_is_what_the_codec_computes_not_how_it_was_saved(codec, tmp_path):
    from higgs_tune.data.prepare import codec_fingerprints

    twin = _same_weights_from_a_config_dict(codec, tmp_path / "v3")
    assert codec.config.to_dict()["architectures"] == ["HiggsAudioV2TokenizerModel"]
    assert twin.config.to_dict()["architectures"] is None  # the metadata differ ...
    assert codec_fingerprint(twin) == codec_fingerprint(codec)  # ... the fingerprint does not
    (current, legacy), (twin_current, twin_legacy) = codec_fingerprints(codec), codec_fingerprints(twin)
    assert current == twin_current and legacy != twin_legacy  # the old fingerprint told them apart
    other = build_audio_tokenizer(TinySpec(seed=1))
    assert codec_fingerprint(other) != current
    with torch.no_grad():  # one weight changed by one ulp: another codec
        tweaked = _same_weights_from_a_config_dict(codec, tmp_path / "v3b")
        p = next(tweaked.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    assert codec_fingerprint(tweaked) != current


def test_a_cache_with_the_legacy_fingerprint_stays_usable_with_its_codec(tiny_dir, demo_manifest, codec, tmp_path):
    """Caches prepared before the metadata keys were left out record the legacy fingerprint:
    training accepts them with the codec that made them, and a re-run of prepare continues them
    (keeping the recorded fingerprint, so checkpoints of runs on them still resume)."""
    from higgs_tune.data.cache import check_cache_codec
    from higgs_tune.data.prepare import codec_fingerprints

    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=2)
    out = tmp_path / "cache"
    prepare_manifest(manifest, tiny_dir, out, progress=False)
    current, legacy = codec_fingerprints(codec)
    index = json.loads((out / "index.json").read_text())
    assert index["header"]["codec_fingerprint"] == current
    index["header"]["codec_fingerprint"] = legacy  # as the previous version wrote it
    (out / "index.json").write_text(json.dumps(index))
    cache = CodeCache.open(out)
    check_cache_codec(cache, codec_fingerprints(codec))  # accepted
    other = codec_fingerprints(build_audio_tokenizer(TinySpec(seed=1)))
    with pytest.raises(
        DataError, match=rf"audio tokenizer \(fingerprint {legacy[:12]}, .*fingerprint {other[0][:12]}\)"
    ):
        check_cache_codec(cache, other)
    result = prepare_manifest(manifest, tiny_dir, out, progress=False)
    assert (result.encoded, result.reused) == (0, 2)
    assert CodeCache.open(out).codec_fingerprint == legacy


def test_cache_dir_with_foreign_files_is_refused(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=1)
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that `higgs-tune prepare` did not write \(notes.txt\)"):
        prepare_manifest(manifest, tiny_dir, out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_code_cache_open_errors(tiny_dir, demo_manifest, tmp_path):
    with pytest.raises(
        DataError,
        match=(
            r"no code cache at .*nope \(folder not found\). Fix: run `higgs-tune prepare MANIFEST --model MODEL "
            r"--out"
        ),
    ):
        CodeCache.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/index.json not found \(it is not a prepared cache\)"):
        CodeCache.open(tmp_path / "empty")
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=1)
    out = tmp_path / "cache"
    prepare_manifest(manifest, tiny_dir, out, progress=False)
    command = f"higgs-tune prepare {manifest} --model {tiny_dir} --out {out}"
    index = (out / "index.json").read_text()

    (out / "index.json").write_text(index[:100])
    with pytest.raises(DataError, match=r"index.json is damaged \(not valid JSON"):
        CodeCache.open(out)
    (out / "index.json").write_text(index.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(DataError, match="was written by a newer higgs-tune"):
        CodeCache.open(out)
    (out / "index.json").write_text(index)
    (out / "rejects.jsonl").unlink()
    with pytest.raises(DataError) as e:
        CodeCache.open(out)
    assert (
        str(e.value) == f"{out / 'rejects.jsonl'} is missing. Fix: rebuild the cache: run `{command}` with --overwrite."
    )
    (out / "rejects.jsonl").write_text("")
    (out / "codes-00000.safetensors").unlink()
    with pytest.raises(DataError, match=r"codes-00000.safetensors is missing \(listed in"):
        CodeCache.open(out)


# ---------------------------------------------------------------------------- CLI


def test_cli_prepare_strict_failure_and_success(tiny_dir, demo_manifest, tmp_path):
    manifest = small_dataset(tmp_path / "ds", demo_manifest, n=2)
    with manifest.open("a") as f:
        f.write(json.dumps({"audio": "en_a_000.flac", "text": "dup", "speaker": "s", "language": "en"}) + "\n")
    out = tmp_path / "cache"
    runner = CliRunner()
    res = runner.invoke(cli, ["prepare", str(manifest), "--model", str(tiny_dir), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert (
        "error:" in res.output
        and "manifest.jsonl:3 (id 'en_a_000') id: duplicate id 'en_a_000' (also on line 1)" in res.output
    )
    assert not out.exists()
    res = runner.invoke(
        cli,
        [
            "prepare",
            str(manifest),
            "--model",
            str(tiny_dir),
            "--out",
            str(out),
            "--skip-invalid",
            "--batch-seconds",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"prepared 1 clips in {out}, 1 encoded, 0 reused" in res.output
    assert f"2 rejected -> {out / 'rejects.jsonl'}" in res.output
    res = runner.invoke(cli, ["prepare", str(manifest), "--model", str(tiny_dir)])
    assert res.exit_code == 2 and "encoding needs both --model MODEL and --out CACHE_DIR" in res.output


def test_cli_from_folder(tiny_dir, demo_manifest, tmp_path):
    ds = tmp_path / "speaker_x"
    ds.mkdir()
    for r in demo_rows(demo_manifest)[:2]:
        shutil.copy(demo_manifest.parent / r["audio"], ds / f"{r['id']}.flac")
        (ds / f"{r['id']}.txt").write_text(r["text"] + "\n", encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(cli, ["prepare", "--from-folder", str(ds), "--language", "en"])
    assert res.exit_code == 0, res.output
    assert res.output == f"wrote {tmp_path / 'speaker_x.jsonl'} (2 rows)\n"
    # the same folder again, now encoding: the identical manifest is reused, and a second identical
    # run stays incremental (it used to demand --overwrite, which also rebuilt the cache from scratch)
    encode = [
        "prepare",
        "--from-folder",
        str(ds),
        "--language",
        "en",
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path / "c"),
    ]
    res = runner.invoke(cli, encode)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == f"{tmp_path / 'speaker_x.jsonl'} is up to date (2 rows)"
    assert res.stdout.splitlines()[-1].startswith(f"prepared 2 clips in {tmp_path / 'c'}, 2 encoded, 0 reused")
    res = runner.invoke(cli, encode)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"prepared 2 clips in {tmp_path / 'c'}, 0 encoded, 2 reused"
    # a changed folder: the manifest differs, so replacing it needs --overwrite (or deleting it)
    (ds / "en_a_001.txt").write_text("A new transcript.\n", encoding="utf-8")
    res = runner.invoke(cli, encode)
    assert res.exit_code == 2
    assert res.stderr == (
        f"error: {tmp_path / 'speaker_x.jsonl'} already exists and differs from what {ds} converts to now. Fix: "
        "delete it (the code cache stays incremental), pass --overwrite to replace it (with --model/--out this "
        "also rebuilds the cache from scratch), or pass --manifest-out to write elsewhere.\n"
    )
    (tmp_path / "speaker_x.jsonl").unlink()
    res = runner.invoke(cli, encode)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"prepared 2 clips in {tmp_path / 'c'}, 0 encoded, 2 reused"
    entries = CodeCache.open(tmp_path / "c").entries
    assert entries[1].text == "A new transcript."
    assert [(e.id, e.speaker, e.audio) for e in entries] == [
        ("en_a_000", "speaker_x", "speaker_x/en_a_000.flac"),
        ("en_a_001", "speaker_x", "speaker_x/en_a_001.flac"),
    ]


def test_demo_fixture_helper(tiny_dir, demo_heldout, tmp_path):
    """The function behind the `demo_heldout_cache` session fixture (tests/fixtures_data.py)."""
    cache = CodeCache.open(prepare_demo_cache(demo_heldout, tiny_dir, tmp_path / "heldout"))
    assert [e.id for e in cache.entries] == ["en_a_008", "en_a_009", "en_b_008", "en_b_009", "ar_a_010", "ar_a_011"]
