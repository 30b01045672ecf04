"""`higgs-tune inspect`: cache summary, batch token accounting, one sample beside its prompt."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from higgs_tune.app.cli import main
from higgs_tune.config import config_from_dict
from higgs_tune.data.cache import CacheWriter, CodeCache
from higgs_tune.data.collate import Collator
from higgs_tune.data.inspect import (
    batch_statistics,
    duration_histogram,
    reason_kinds,
    render_sample,
    sample_and_prompt,
    text_rate_outliers,
)
from higgs_tune.data.layout import Conversation, SpecialTokens, build_sample
from higgs_tune.data.pipeline import first_batches
from higgs_tune.data.plot import histogram_png
from higgs_tune.errors import DataError, TrainingHealthError
from higgs_tune.train.health import check_trainable

EXPECTED_SHOW = Path(__file__).parent / "data" / "inspect_show_expected.txt"
K = 8


def _config(tiny_dir, cache_dir, out_dir, **data) -> dict:
    return {
        "model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
        "data": {
            "train_cache": str(cache_dir),
            "max_tokens_per_batch": 2048,
            "max_batch_size": 8,
            "max_sequence_length": 1024,
            **data,
        },
        "train": {"max_steps": 1, "seed": 42},
        "checkpoint": {"output_dir": str(out_dir)},
    }


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _tokens(tiny_dir):
    from transformers import AutoTokenizer, HiggsAudioV2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return tokenizer, SpecialTokens.from_tokenizer(tokenizer, HiggsAudioV2Config.from_pretrained(tiny_dir))


def _train_data(tiny_dir, cfg: dict):
    """What `train` builds from this config (the recipe's builder) and its SpecialTokens."""
    from higgs_tune.data.pipeline import build_train_data
    from higgs_tune.model.load import load_processor

    data = build_train_data(config_from_dict(cfg), load_processor(tiny_dir))
    return data, data.tokens


def _hand_made_cache(folder: Path, num_codebooks: int = K, rejects=()) -> Path:
    """Two clips with tiny hand-written codes: `hand_made` (3 frames) voiced after `ref_clip` (2 frames)."""
    ref = (np.arange(2 * num_codebooks).reshape(num_codebooks, 2)).astype(np.int16)
    target = ((np.arange(3 * num_codebooks).reshape(num_codebooks, 3) * 7) % 1024).astype(np.int16)
    header = {
        "codec_fingerprint": "hand-made",
        "num_codebooks": num_codebooks,
        "codebook_size": 1024,
        "frame_rate": 25,
        "sample_rate": 24000,
        "codec_source": "hand-made codes",
        "command": "",
        "created": "2026-01-01T00:00:00",
    }
    writer = CacheWriter(folder, header, None)
    writer.add_shard({"key_ref": ref, "key_target": target})
    base = {"speaker": "spk", "language": "en", "scene": None, "sha256": "0", "row": 1}
    entries = [
        {
            **base,
            "id": "ref_clip",
            "key": "key_ref",
            "text": "Hello.",
            "ref_key": None,
            "ref_text": None,
            "duration_s": 0.08,
            "num_frames": 2,
            "audio": "ref.wav",
            "ref_audio": None,
        },
        {
            **base,
            "id": "hand_made",
            "key": "key_target",
            "text": "Hi there.",
            "scene": "A quiet room.",
            "ref_key": "key_ref",
            "ref_text": "Hello.",
            "duration_s": 0.12,
            "num_frames": 3,
            "audio": "target.wav",
            "ref_audio": "ref.wav",
            "row": 2,
        },
    ]
    writer.finish(entries, list(rejects))
    return folder


# ----------------------------------------------------------------------------- the demo data, counted


def test_demo_batches_counts_add_up(tiny_dir, demo_cache, tmp_path):
    data, tokens = _train_data(tiny_dir, _config(tiny_dir, demo_cache, tmp_path / "run", task="mixed"))
    dataset, sampler = data.train_set, data.sampler
    cache = dataset.cache
    batches = first_batches(dataset, sampler, data.collator, 100)  # the whole epoch
    stats = batch_statistics(batches, tokens.stream_bos, tokens.stream_eos)
    check_trainable(stats)

    # what the batches must hold, from the cache index and the dataset's plan alone
    plans = [dataset.plan(i) for i in range(len(dataset))]
    frames = {e.key: e.num_frames for e in cache.entries}
    clones = [p for p in plans if p.ref_key is not None]
    t = stats["total"]
    assert t["batches"] == len(batches) == len(list(sampler))
    assert t["samples"] == len(dataset) == 26
    assert t["tokens"] == sum(p.length for p in plans)
    assert 0 < len(clones) < 26  # task mixed: both kinds present
    target, reference = t["audio"]["target"], t["audio"]["reference"]
    assert target["segments"] == 26
    assert reference["segments"] == len(clones)
    assert target["columns"] == sum(e.num_frames + K + 1 for e in dataset.entries)
    assert reference["columns"] == sum(frames[p.ref_key] + K + 1 for p in clones)
    # every target segment: its T codes + ONE EOS per codebook trained; the reference: nothing
    assert target["trained"] == [sum(e.num_frames + 1 for e in dataset.entries)] * K
    assert target["eos_labels"] == [26] * K
    assert reference["trained"] == [0] * K and reference["eos_labels"] == [0] * K
    assert t["stream"]["bos_labels"] == [0] * K
    assert t["stream"]["eos_labels"] == [26] * K
    # text labels: <|audio_out_bos|>, <|audio_eos|>, <|eot_id|> of each target turn
    assert t["text"]["trained"] == 3 * 26
    for s in stats["batches"] + [t]:
        assert s["text"]["trained"] + s["text"]["masked"] == s["text"]["total"]
        for role in ("target", "reference"):
            a = s["audio"][role]
            assert [tr + ms for tr, ms in zip(a["trained"], a["masked"], strict=True)] == [a["columns"]] * K
        assert s["text"]["total"] + s["audio"]["target"]["columns"] + s["audio"]["reference"]["columns"] == s["tokens"]
        assert (
            s["loss_positions"]
            == s["text"]["trained"] + s["audio"]["target"]["trained"][0] + (K - 1) * s["audio"]["target"]["segments"]
        )
    # per batch: each target segment has exactly one EOS label per codebook
    for b in stats["batches"]:
        assert b["audio"]["target"]["eos_labels"] == [b["audio"]["target"]["segments"]] * K == [b["batch_size"]] * K
        assert b["padding_waste"] == pytest.approx(1 - sum(b["lengths"]) / (b["batch_size"] * b["padded_length"]))


def test_cli_batches_on_demo_cache(tiny_dir, demo_cache, tmp_path):
    cfg = _write_config(tmp_path / "run.yaml", _config(tiny_dir, "ignored/by/inspect", tmp_path / "run"))
    result = CliRunner().invoke(
        main, ["inspect", str(demo_cache), "--config", str(cfg), "--batches", "2", "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "s.json").read_text())["batches"]
    assert len(stats["batches"]) == 2
    assert "batch 0: " in result.output and "batch 1: " in result.output
    assert (
        f"stream EOS  inputs {stats['total']['stream']['eos_inputs']}  labels {stats['total']['stream']['eos_labels']}"
        in result.output
    )
    assert result.stdout.endswith(
        "\ntrainable: every batch has trained target audio and one EOS label per codebook and target segment\n"
        f"statistics written to {tmp_path / 's.json'}\n"
    )


def test_cli_summary_and_plot(demo_cache, tmp_path):
    png = tmp_path / "plots" / "durations.png"
    result = CliRunner().invoke(
        main, ["inspect", str(demo_cache), "--plot", str(png), "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["clips"] == 26
    assert summary["speakers"] == {
        "ar_a": {
            "clips": 10,
            "seconds": pytest.approx(summary["speakers"]["ar_a"]["seconds"]),
            "languages": {"ar": 10},
        },
        "en_a": {"clips": 8, "seconds": pytest.approx(summary["speakers"]["en_a"]["seconds"]), "languages": {"en": 8}},
        "en_b": {"clips": 8, "seconds": pytest.approx(summary["speakers"]["en_b"]["seconds"]), "languages": {"en": 8}},
    }
    assert {k: v["clips"] for k, v in summary["languages"].items()} == {"ar": 10, "en": 16}
    assert sum(c for _, _, c in summary["histogram"]) == 26
    assert summary["with_reference"] == 2 and summary["outliers"] == [] and summary["rejects"] == []
    assert f"clips        26  ({summary['hours']:.3f} h = {summary['seconds']:.1f} s" in result.output
    assert "rejected at prepare: none" in result.output

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    assert struct.unpack(">IIBBBBB", data[16:29]) == (640, 360, 8, 2, 0, 0, 0)
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    # the one IDAT holds 360 rows of (filter byte + 640 RGB pixels); the file ends with IEND
    idat_len, idat = struct.unpack(">I4s", data[33:41])
    assert idat == b"IDAT"
    assert len(zlib.decompress(data[41 : 41 + idat_len])) == 360 * (1 + 640 * 3)
    assert data[-12:] == struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


# ----------------------------------------------------------------------------- --show


def test_show_hand_made_sample_matches_expected_text(tiny_dir, tmp_path):
    cache = _hand_made_cache(tmp_path / "cache")
    cfg = _write_config(tmp_path / "run.yaml", _config(tiny_dir, cache, tmp_path / "run", task="voice_clone"))
    result = CliRunner().invoke(main, ["inspect", str(cache), "--config", str(cfg), "--show", "hand_made"])
    assert result.exit_code == 0, result.output
    assert result.stdout == EXPECTED_SHOW.read_text(encoding="utf-8")


def test_show_refuses_a_prompt_that_differs_from_the_sample(tiny_dir, tmp_path):
    cache_dir = _hand_made_cache(tmp_path / "cache")
    data, tokens = _train_data(tiny_dir, _config(tiny_dir, cache_dir, tmp_path / "run", task="voice_clone"))
    tokenizer, cache = data.train_set.tokenizer, data.train_set.cache
    sample, prompt = sample_and_prompt(data.train_set, "hand_made")
    assert "prompt matches training sample up to target audio: yes" in render_sample(sample, prompt, tokenizer, tokens)
    # a prompt built from another system text (a layout drift between training and inference)
    from higgs_tune.data.layout import build_prompt

    drifted = build_prompt(
        Conversation.voice_clone("Hi there.", "Hello.", system_prompt="Speak."),
        tokenizer,
        tokens,
        ref_codes=cache.codes("key_ref"),
        sample_id="hand_made",
    )
    with pytest.raises(
        DataError,
        match=(
            r"sample 'hand_made': the generation prompt \(\d+ tokens\) differs from the training sample before "
            r"its target audio \(\d+ tokens\) at position 9"
        ),
    ):
        render_sample(sample, drifted, tokenizer, tokens)


def test_show_renders_partial_utf8_tokens_as_bytes(tiny_dir):
    """Byte-level BPE splits Arabic diacritics (2 UTF-8 bytes) into one-byte tokens; decoded alone each
    is U+FFFD. --show must print the bytes ("\\xd9" "\\x8e"), not a column of replacement characters."""
    tokenizer, tokens = _tokens(tiny_dir)
    text = "مَرْحَبًا"  # meem, fatha (U+064E = d9 8e), reh, sukun (U+0652 = d9 92), ...
    target = torch.zeros(K, 1, dtype=torch.long)
    sample = build_sample(Conversation.tts(text), tokenizer, tokens, target_codes=target, sample_id="ar")
    prompt = {"input_ids": sample["input_ids"][None, : sample["segments"][0].token_start]}
    rendered = render_sample(sample, prompt, tokenizer, tokens)
    assert "\ufffd" not in rendered
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(sample["input_ids"])) if sample["input_ids"][i : i + len(ids)].tolist() == ids)
    lines = {int(line.split()[0]): line.split()[1] for line in rendered.splitlines() if line[:5].strip().isdigit()}
    shown = [lines[start + i] for i in range(len(ids))]
    assert shown == [
        '"م"',
        '"\\xd9"',
        '"\\x8e"',
        '"ر"',
        '"\\xd9"',
        '"\\x92"',
        '"ح"',
        '"\\xd9"',
        '"\\x8e"',
        '"ب"',
        '"\\xd9"',
        '"\\x8b"',
        '"ا"',
    ]


def test_show_unknown_id(tiny_dir, tmp_path):
    cache = _hand_made_cache(tmp_path / "cache")
    cfg = _write_config(tmp_path / "run.yaml", _config(tiny_dir, cache, tmp_path / "run", task="tts"))
    result = CliRunner().invoke(main, ["inspect", str(cache), "--config", str(cfg), "--show", "nope"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: no clip with id 'nope' in {cache} (2 training clips: ref_clip, hand_made). "
        "Check the id (ids are the manifest's `id` values).\n"
    )


def test_show_held_out_clip(tiny_dir, tmp_path):
    from higgs_tune.data.dataset import split_ids

    cache = _hand_made_cache(tmp_path / "cache")
    cfg = _write_config(
        tmp_path / "run.yaml", _config(tiny_dir, cache, tmp_path / "run", task="tts", eval_fraction=0.5)
    )
    _, (held,) = split_ids(CodeCache.open(cache).entries, 0.5, 42)
    result = CliRunner().invoke(main, ["inspect", str(cache), "--config", str(cfg), "--show", held])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: clip {held!r} is in {cache} but held out of training (data.eval_fraction split). "
        "Show a training clip, or set data.eval_fraction: 0 to inspect every clip.\n"
    )


def test_show_needs_a_model(tmp_path):
    cache = _hand_made_cache(tmp_path / "cache")
    result = CliRunner().invoke(main, ["inspect", str(cache), "--show", "hand_made"])
    assert result.exit_code == 2
    assert (
        "--batches and --show need the model's tokenizer: pass --config CONFIG.yaml (or --model MODEL)."
        in result.output
    )


# ----------------------------------------------------------------------------- bad caches


def test_cache_of_another_model_is_refused(tiny_dir, tmp_path):
    cache = _hand_made_cache(tmp_path / "cache4", num_codebooks=4)
    result = CliRunner().invoke(main, ["inspect", str(cache), "--model", str(tiny_dir), "--batches", "1"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {cache} holds codes with 4 codebooks (prepared with hand-made codes), but the model {tiny_dir} "
        "has 8. The cache belongs to another model: prepare the data with this model: higgs-tune prepare MANIFEST "
        f"--model {tiny_dir} --out NEW_CACHE_DIR.\n"
    )


def test_missing_and_damaged_index(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["inspect", str(empty)])
    assert result.exit_code == 2
    assert f"error: {empty / 'index.json'} not found (it is not a prepared cache)." in result.output

    cache = _hand_made_cache(tmp_path / "cache")
    (cache / "index.json").write_text('{"format": "higgs-tune-code-cache", "entr', encoding="utf-8")
    result = CliRunner().invoke(main, ["inspect", str(cache)])
    assert result.exit_code == 2
    assert f"error: {cache / 'index.json'} is damaged (not valid JSON" in result.output

    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(main, ["inspect", str(missing)])
    assert result.exit_code == 2
    assert f"error: no code cache at {missing} (folder not found)." in result.output


@pytest.mark.parametrize(
    "damage, detail",
    [
        (
            lambda i: i["codes"].__setitem__("key_ref", 5),
            "malformed shards/codes/entries: TypeError: 'int' object is not subscriptable",
        ),
        (lambda i: i["codes"]["key_ref"].pop("num_frames"), "malformed shards/codes/entries: KeyError: 'num_frames'"),
        (
            lambda i: i["shards"].__setitem__("codes-00000.safetensors", 3),
            "malformed shards/codes/entries: AttributeError: 'int' object has no attribute 'get'",
        ),
        (
            lambda i: i["shards"].__setitem__("../elsewhere.bin", {"keys": [], "sha256": ""}),
            "shard name '../elsewhere.bin' is not codes-NNNNN.safetensors",
        ),
        (
            lambda i: i["entries"][0].__setitem__("key", ["key_ref"]),
            "malformed shards/codes/entries: TypeError: unhashable type: 'list'",
        ),
        (lambda i: i["entries"][1].__setitem__("text", None), "entry 2 has wrong types for text"),
        (lambda i: i["entries"][1].__setitem__("num_frames", 7), "entry 'hand_made' lists 7 frames, its codes have 3"),
        (
            lambda i: i["header"].__setitem__("num_codebooks", "8"),
            "header num_codebooks='8', codebook_size=1024, frame_rate=25, sample_rate=24000: expected positive numbers",
        ),
    ],
    ids=[
        "codes-entry",
        "codes-frames",
        "shard-meta",
        "shard-name",
        "entry-key",
        "entry-text",
        "entry-frames",
        "header-type",
    ],
)
def test_index_that_parses_but_is_malformed_is_a_clear_error(tmp_path, damage, detail):
    """A hand-edited index whose JSON is valid but whose parts have the wrong shape: one error line, no traceback."""
    cache = _hand_made_cache(tmp_path / "cache")
    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))
    damage(index)
    (cache / "index.json").write_text(json.dumps(index), encoding="utf-8")
    result = CliRunner().invoke(main, ["inspect", str(cache)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {cache / 'index.json'} is damaged ({detail}). Fix: rebuild the cache: run "
        f"`higgs-tune prepare MANIFEST --model MODEL --out {cache}` with --overwrite.\n"
    )


def test_rejects_are_listed(tiny_dir, tmp_path):
    """A manifest with a missing file and a too-short clip, prepared with --skip-invalid."""
    import soundfile as sf

    from higgs_tune.data.prepare import prepare_manifest

    demo = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
    (tmp_path / "audio").mkdir()
    for name in ("en_a_000", "en_a_002"):
        (tmp_path / "audio" / f"{name}.flac").write_bytes((demo / "audio" / f"{name}.flac").read_bytes())
    sf.write(tmp_path / "audio" / "short.wav", np.full(2400, 0.1, dtype=np.float32), 24000)  # 0.1 s
    rows = [
        {
            "id": "en_a_000",
            "audio": "audio/en_a_000.flac",
            "text": "The morning train was right on time.",
            "speaker": "en_a",
            "language": "en",
        },
        {"id": "gone", "audio": "audio/gone.flac", "text": "Not here.", "speaker": "en_a", "language": "en"},
        {"id": "short", "audio": "audio/short.wav", "text": "Too short.", "speaker": "en_a", "language": "en"},
        {
            "id": "en_a_002",
            "audio": "audio/en_a_002.flac",
            "text": "My sister likes green tea with honey.",
            "speaker": "en_a",
            "language": "en",
        },
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cache = prepare_manifest(manifest, tiny_dir, tmp_path / "cache", skip_invalid=True, progress=False).cache_dir
    rejects = CodeCache.open(cache).rejects
    result = CliRunner().invoke(main, ["inspect", str(cache)])
    assert result.exit_code == 0, result.output
    assert "clips        2  (" in result.output
    assert (
        "rejected at prepare (2 rows; rejects.jsonl): audio file not found 1, audio is too short 1\n"
        f"  gone (row 2): {rejects[0]['reason']}\n"
        f"  short (row 3): {rejects[1]['reason']}\n"
    ) in result.output + "\n"
    assert rejects[0]["reason"].startswith("audio: 'audio/gone.flac' file not found")
    assert rejects[1]["reason"].startswith("audio: 'audio/short.wav' is too short: 0.100 s")


def test_reason_kinds():
    assert reason_kinds("audio: 'a.wav' is too short: 0.100 s < 0.3 s; text: is empty") == [
        "audio is too short",
        "text is empty",
    ]
    assert reason_kinds("audio: 'x.flac' file not found (looked for /data/x.flac)") == ["audio file not found"]
    assert reason_kinds("") == ["unknown"]
    # counts inside a message do not split a kind: 1 and 3 NaN samples are the same kind of problem
    assert (
        reason_kinds("audio: 'a.wav' has 1 NaN/Inf sample(s)")
        == reason_kinds("audio: 'b.wav' has 3 NaN/Inf sample(s)")
        == ["audio has NaN/Inf samples"]
    )


# ----------------------------------------------------------------------------- statistics on hand-made data


@pytest.fixture(scope="module")
def two_sample_batch(tiny_dir):
    tokenizer, tokens = _tokens(tiny_dir)
    ref = torch.arange(2 * K).reshape(K, 2)
    target = (torch.arange(3 * K).reshape(K, 3) * 7) % 1024
    clone = build_sample(
        Conversation.voice_clone("Hi there.", "Hello."),
        tokenizer,
        tokens,
        target_codes=target,
        ref_codes=ref,
        sample_id="clone",
    )
    tts = build_sample(Conversation.tts("Good day."), tokenizer, tokens, target_codes=target[:, :2], sample_id="tts")
    return Collator(tokens)([clone, tts]), tokens


def test_batch_statistics_exact(two_sample_batch):
    batch, tokens = two_sample_batch
    s = batch_statistics([batch], tokens.stream_bos, tokens.stream_eos)["batches"][0]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert s["lengths"] == lengths and s["padded_length"] == max(lengths) and s["batch_size"] == 2
    ref, tgt = s["audio"]["reference"], s["audio"]["target"]
    assert (ref["segments"], ref["columns"], ref["trained"], ref["masked"]) == (1, 2 + 9, [0] * K, [11] * K)
    # targets: 3 + 9 and 2 + 9 columns; trained = T codes + one EOS per codebook
    assert (tgt["segments"], tgt["columns"], tgt["trained"], tgt["eos_labels"]) == (2, 23, [4 + 3] * K, [2] * K)
    assert tgt["masked"] == [23 - 7] * K
    # delay pattern: codebook k opens each segment with k+1 BOS and closes it with K-k EOS (3 segments)
    assert s["stream"]["bos_inputs"] == [3 * (k + 1) for k in range(K)]
    assert s["stream"]["eos_inputs"] == [3 * (K - k) for k in range(K)]
    assert s["stream"]["bos_labels"] == [0] * K and s["stream"]["eos_labels"] == [2] * K
    assert s["text"]["trained"] == 6
    assert s["text"]["total"] == sum(lengths) - 11 - 23
    assert s["loss_positions"] == 6 + (3 + 1 + K - 1) + (2 + 1 + K - 1)
    assert s["loss_share"] == s["loss_positions"] / sum(lengths)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b, t: b["audio_labels"].fill_(-100), r"batch 0 \(samples clone, tts\) has no trained audio token"),
        (
            lambda b, t: b["audio_labels"][..., 3].masked_fill_(b["audio_labels"][..., 3] == t.stream_eos, -100),
            r"batch 0 \(samples clone, tts\) has no stream EOS label in codebook\(s\) 3: the model would never "
            r"learn to stop",
        ),
        (
            lambda b, t: b["audio_labels"].masked_fill_((b["audio_roles"] == 1)[..., None], 5),
            r"batch 0 \(samples clone, tts\) trains 88 reference audio label\(s\)",
        ),
        (
            lambda b, t: b["audio_labels"][0, 11].fill_(t.stream_bos),
            r"batch 0 \(samples clone, tts\) has 8 stream BOS label\(s\)",
        ),
        (
            lambda b, t: b["audio_labels"][1, 5, 0].fill_(t.stream_eos),
            r"batch 0 \(samples clone, tts\) has \[3\] stream EOS labels in codebook\(s\) 0 for 2 target segment\(s\)",
        ),
    ],
)
def test_check_trainable_names_the_problem(two_sample_batch, damage, message):
    batch, tokens = two_sample_batch
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    damage(batch, tokens)
    with pytest.raises(TrainingHealthError, match=message):
        check_trainable(batch_statistics([batch], tokens.stream_bos, tokens.stream_eos))


def test_check_trainable_without_batches():
    with pytest.raises(TrainingHealthError, match="no training batch was built"):
        check_trainable({"batches": [], "total": None})


def test_duration_histogram_bins():
    assert duration_histogram([1.72, 1.75, 2.0, 2.05, 2.83], bin_width=0.5) == [
        (1.5, 2.0, 2),
        (2.0, 2.5, 2),
        (2.5, 3.0, 1),
    ]
    assert duration_histogram([3.0]) == [(3.0, 3.5, 1)]
    assert duration_histogram([]) == []
    with pytest.raises(DataError, match="no clips to plot"):
        histogram_png([])


def test_text_rate_outliers():
    def clip(i, speaker, chars, seconds, language="en"):
        return SimpleNamespace(
            id=f"{speaker}_{i}", speaker=speaker, language=language, text="x" * chars, duration_s=seconds
        )

    regular = [clip(i, "a", 28 + i, 2.0) for i in range(6)]  # 14-16.5 chars/s
    fast = clip(9, "a", 90, 2.0)  # 45 chars/s: a transcript far too long for its audio
    slow = clip(8, "a", 10, 2.0)  # 5 chars/s
    lone = clip(0, "b", 30, 2.0)  # 1 clip: compared with all "en" clips
    found = text_rate_outliers(regular + [fast, slow, lone])
    assert [(o.id, o.reference) for o in found] == [("a_9", "speaker a (8 clips)"), ("a_8", "speaker a (8 clips)")]
    assert found[0].chars_per_s == 45.0 and found[0].reference_cps == pytest.approx(15.25)
    assert found[0].reason.startswith("2.95x the median rate (> 2.0x)")
    assert found[1].reason.startswith("0.33x the median rate (< 0.5x)")
