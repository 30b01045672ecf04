"""`higgs-tune evaluate` on the bundled held-out clips with tiny random-weight ASR and speaker models.

The numbers are meaningless (random weights everywhere); the code path is the real one:
transformers Whisper generate with a language, WavLM x-vectors, our WER/CER, JSON + CSV.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from higgs_tune.app.cli import main
from higgs_tune.errors import ModelLoadError, OutputDirError
from higgs_tune.infer.evaluate import (
    CSV_COLUMNS,
    AsrModel,
    SpeakerModel,
    check_eval_out,
    default_eval_dir,
    evaluate_manifest,
    plan_items,
    read_results,
)
from higgs_tune.infer.generate import SamplingOptions
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.tiny.eval_models import make_tiny_adapter, make_tiny_eval_models

DEMO = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
HELDOUT_IDS = ["en_a_008", "en_a_009", "en_b_008", "en_b_009", "ar_a_010", "ar_a_011"]
SUMMARY_KEYS = [
    "num_clips",
    "wer",
    "cer",
    "speaker_similarity",
    "speaker_similarity_clips",
    "speaker_similarity_gt",
    "duration_ratio",
    "stop_rate",
]
FLOAT_KEYS = ["wer", "cer", "speaker_similarity", "speaker_similarity_gt", "duration_ratio", "stop_rate"]


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    return make_tiny_eval_models(tmp_path_factory.mktemp("evalmodels"), seed=0)


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    return make_tiny_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "adapter", seed=3)


# ----------------------------------------------------------------------------- the tiny eval models
def test_tiny_whisper_tokenizer_handles_arabic_and_english(eval_models):
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    asr_dir, _ = eval_models
    processor = AutoProcessor.from_pretrained(str(asr_dir))
    tok = processor.tokenizer
    for text in ["The library opens early on Mondays.", "أين وضعت مفاتيح السيارة؟"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    tok.set_prefix_tokens(language="arabic", task="transcribe")
    ids = tok.convert_tokens_to_ids
    assert tok("x").input_ids[:4] == [
        ids("<|startoftranscript|>"),
        ids("<|ar|>"),
        ids("<|transcribe|>"),
        ids("<|notimestamps|>"),
    ]
    model = WhisperForConditionalGeneration.from_pretrained(str(asr_dir))
    assert model.generation_config.lang_to_id["<|ar|>"] == ids("<|ar|>")
    assert model.generation_config.decoder_start_token_id == ids("<|startoftranscript|>")


def test_asr_and_speaker_wrappers(eval_models):
    asr_dir, spk_dir = eval_models
    asr = AsrModel.load(asr_dir)
    assert (asr.is_whisper, asr.sample_rate) == (True, 16000)
    assert asr.language_token("ar-EG") == "ar" and asr.language_token("EN") == "en"
    with pytest.raises(ModelLoadError, match=r"has no language token for 'xx' \(<\|xx\|>\)"):
        asr.language_token("xx")
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    texts = asr.transcribe([noise, noise[:8000]], "ar", batch_size=2, max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # longer than Whisper's 30 s window: the long-form path
    [long_text] = asr.transcribe([np.tile(noise, 31)], "en", max_new_tokens=5)
    assert isinstance(long_text, str)

    spk = SpeakerModel.load(spk_dir)
    a, b = spk.embed([noise, noise])
    assert a.shape == (16,) and np.array_equal(a, b)
    # WavLM's conv front end + x-vector TDNN need 0.325 s at 16 kHz (2 frames for the pooling's std)
    assert spk.min_samples == 5200
    short, shortest = spk.embed([noise[:5199], noise[:5200]])
    assert short is None and np.isfinite(shortest).all()
    with pytest.raises(ModelLoadError, match=r"cannot load the ASR model .*Fix: pass --asr-model"):
        AsrModel.load(spk_dir.parent / "missing")


# ----------------------------------------------------------------------------- references
def test_references_are_other_clips_of_the_same_speaker():
    from higgs_tune.data.manifest import validate_manifest

    held = validate_manifest(DEMO / "heldout.jsonl")
    items = plan_items(held.rows, held.audio, held.rows, held.audio)
    assert [(i.id, i.ref_id) for i in items] == [
        ("en_a_008", "en_a_009"),
        ("en_a_009", "en_a_008"),
        ("en_b_008", "en_b_009"),
        ("en_b_009", "en_b_008"),
        ("ar_a_010", "ar_a_011"),
        ("ar_a_011", "ar_a_010"),
    ]
    train = validate_manifest(DEMO / "manifest.jsonl")
    items = plan_items(train.rows, train.audio, train.rows, train.audio)
    by_id = {i.id: i for i in items}
    assert (by_id["en_a_001"].ref_id, by_id["en_a_001"].ref_text) == (
        "en_a_000",
        "The morning train was right on time.",
    )
    assert by_id["en_a_003"].ref_id == "en_a_004"  # the next id of the speaker
    assert by_id["en_b_007"].ref_id == "en_b_000"  # cyclic
    # a speaker with a single clip: plain TTS
    solo = [r for r in held.rows if r.id == "en_a_008"]
    [item] = plan_items(solo, held.audio, solo, held.audio)
    assert (item.ref_id, item.ref_path, item.ref_text) == (None, None, None)


def test_default_eval_dir(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert default_eval_dir(run / "final") is None  # not a run folder (no metrics.jsonl)
    (run / "metrics.jsonl").write_text("")
    assert default_eval_dir(run / "final") == (run / "eval").resolve()
    assert default_eval_dir(None) is None


# ----------------------------------------------------------------------------- the evaluation
def test_evaluate_heldout_writes_every_metric(tiny_dir, adapter_dir, eval_models, tmp_path):
    asr_dir, spk_dir = eval_models
    stack = load_inference_stack(tiny_dir, adapter_dir, device="cpu")
    out = tmp_path / "eval"
    doc = evaluate_manifest(
        stack,
        DEMO / "heldout.jsonl",
        out,
        asr=AsrModel.load(asr_dir),
        speaker=SpeakerModel.load(spk_dir),
        options=SamplingOptions(seed=0, max_new_tokens=40),
        asr_max_new_tokens=8,
    )
    assert read_results(out / "results.json") == doc
    assert list(doc) == ["format", "format_version", "summary", "per_language", "settings", "clips"]
    summary = doc["summary"]
    assert list(summary) == SUMMARY_KEYS
    assert summary["num_clips"] == 6
    for key in FLOAT_KEYS:
        assert isinstance(summary[key], float), key
    assert summary["speaker_similarity_clips"] == sum(c["speaker_similarity"] is not None for c in doc["clips"])
    clips = doc["clips"]
    assert [c["id"] for c in clips] == HELDOUT_IDS
    assert summary["stop_rate"] == sum(c["stopped"] for c in clips) / 6
    assert summary["wer"] == sum(c["word_errors"] for c in clips) / sum(c["ref_words"] for c in clips)
    assert summary["cer"] == sum(c["char_errors"] for c in clips) / sum(c["ref_chars"] for c in clips)
    sims = [c["speaker_similarity"] for c in clips if c["speaker_similarity"] is not None]
    assert summary["speaker_similarity"] == pytest.approx(sum(sims) / len(sims))
    assert summary["duration_ratio"] == pytest.approx(sum(c["duration_ratio"] for c in clips) / 6)
    assert {k: v["num_clips"] for k, v in doc["per_language"].items()} == {"en": 4, "ar": 2}
    assert [c["ref_words"] for c in clips] == [6, 6, 6, 6, 4, 4]
    assert clips[4]["normalized_text"] == "شكرا لك علي المساعده"

    for c in clips:
        if c["duration_s"] >= 0.33:  # long enough for the x-vector model (see SpeakerModel.min_samples)
            assert -1.0 <= c["speaker_similarity"] <= 1.0 and -1.0 <= c["speaker_similarity_gt"] <= 1.0
            assert c["notes"] == []
        else:
            assert c["speaker_similarity"] is None and c["speaker_similarity_gt"] is None
            assert c["notes"] == [
                f"output of {c['duration_s']:.2f} s is shorter than the speaker model's minimum 0.33 s: no speaker "
                "similarity"
            ]
        gt = sf.info(str(DEMO / "audio" / f"{c['id']}.flac"))
        assert c["gt_duration_s"] == pytest.approx(gt.frames / gt.samplerate)
        assert c["duration_ratio"] == pytest.approx(c["duration_s"] / c["gt_duration_s"])
        info = sf.info(str(out / c["wav"]))
        assert (info.samplerate, info.frames) == (24000, c["num_frames"] * 960)
        assert c["wer"] == pytest.approx(c["word_errors"] / c["ref_words"])

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["id"] for r in rows] == HELDOUT_IDS
    assert rows[4]["text"] == "شكرا لك على المساعدة."
    assert float(rows[0]["speaker_similarity"]) == pytest.approx(clips[0]["speaker_similarity"])
    assert doc["settings"]["asr_model"] == str(asr_dir) and doc["settings"]["speaker_model"] == str(spk_dir)


def test_evaluate_cli_writes_into_the_run_folder(tiny_dir, adapter_dir, eval_models, tmp_path):
    asr_dir, spk_dir = eval_models
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "final")
    # a checkpoint's config.yaml names the base model: no --model needed
    (run / "final" / "config.yaml").write_text(f"model:\n  name_or_path: {tiny_dir}\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text("")
    args = [
        "evaluate",
        str(DEMO / "heldout.jsonl"),
        "--adapter",
        str(run / "final"),
        "--asr-model",
        str(asr_dir),
        "--speaker-model",
        str(spk_dir),
        "--limit",
        "2",
        "--max-new-tokens",
        "20",
        "--asr-max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"evaluated 2 clips -> {(run / 'eval' / 'results.json').resolve()}, results.csv" in result.output
    doc = json.loads((run / "eval" / "results.json").read_text(encoding="utf-8"))
    assert [c["id"] for c in doc["clips"]] == HELDOUT_IDS[:2]

    # evaluated again: its own results are replaced
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output

    usage = CliRunner().invoke(main, ["evaluate", str(DEMO / "heldout.jsonl"), "--adapter", str(adapter_dir)])
    assert usage.exit_code == 2 and "--out is required unless --adapter is a checkpoint folder of a run" in usage.output


def test_evaluate_never_writes_over_a_users_files(tmp_path):
    """Checked before any model loads: a results.json of another kind, or results.csv / wavs/ without
    evaluate's results.json, stop the command with the file named; nothing is changed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"accuracy": 0.9}', encoding="utf-8")
    args = ["evaluate", str(DEMO / "heldout.jsonl"), "--model", "/nonexistent/model", "--out", str(mine)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"{mine / 'results.json'} exists and was not written by `higgs-tune evaluate`; it is left as it is." in (
        " ".join(result.output.split())
    )
    assert (mine / "results.json").read_text(encoding="utf-8") == '{"accuracy": 0.9}'
    (mine / "results.json").unlink()
    (mine / "wavs").mkdir()
    with pytest.raises(OutputDirError, match=r"already has wavs but no results.json of `higgs-tune evaluate`"):
        check_eval_out(mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_eval_out(tmp_path / "file")
    check_eval_out(tmp_path / "new")  # a new folder is fine
