"""`prepare --transcribe --asr-model`: untranscribed rows get the ASR's text, marked in the manifest
and the cache, and `inspect` lists them (the tiny offline ASR)."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from higgs_tune.app.cli import main as cli
from higgs_tune.data.cache import CodeCache
from higgs_tune.infer.evaluate import AsrModel
from higgs_tune.infer.generate import load_codec_audio
from higgs_tune.tiny.eval_models import make_tiny_eval_models


def test_prepare_transcribe_fills_marks_and_inspect_lists(tiny_dir, demo_heldout, tmp_path):
    asr_dir, _ = make_tiny_eval_models(tmp_path / "eval")
    rows = [json.loads(x) for x in demo_heldout.read_text(encoding="utf-8").splitlines()][:3]
    for r in rows:
        shutil.copy(demo_heldout.parent / r["audio"], tmp_path / r["audio"].split("/")[-1])
        r["audio"] = r["audio"].split("/")[-1]
    rows[0].pop("text")
    rows[2]["text"] = None
    manifest = tmp_path / "m.jsonl"
    original = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    manifest.write_text(original, encoding="utf-8")

    args = ["prepare", str(manifest), "--transcribe", "--asr-model", str(asr_dir)]
    res = CliRunner().invoke(cli, [*args, "--model", str(tiny_dir), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.transcribed.jsonl"
    assert f"transcribed 2 row(s) with {asr_dir} -> {out}" in res.output
    assert manifest.read_text(encoding="utf-8") == original  # the user's file is untouched
    written = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    asr = AsrModel.load(asr_dir)
    for i in (0, 2):
        wav = load_codec_audio(tmp_path / rows[i]["audio"], asr.sample_rate)
        expected = asr.transcribe([wav], rows[i]["language"])[0].strip()
        assert written[i]["text"] == expected and written[i]["text_source"] == f"asr:{asr_dir}"
    assert written[1] == rows[1]  # a row with text is copied as written

    cache = CodeCache.open(tmp_path / "c")
    assert {e.id: e.text_source for e in cache.entries} == {
        rows[0]["id"]: f"asr:{asr_dir}",
        rows[1]["id"]: None,
        rows[2]["id"]: f"asr:{asr_dir}",
    }
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "c")])
    assert shown.exit_code == 0, shown.output
    assert "transcribed by ASR (2 clips; check these transcripts)" in shown.output
    assert f"  {rows[0]['id']} (asr:{asr_dir}): {written[0]['text']!r}" in shown.output
    bad = CliRunner().invoke(cli, ["prepare", str(manifest), "--transcribe"])
    assert bad.exit_code == 2 and "--transcribe needs --asr-model MODEL" in bad.output

    # the user corrects an ASR transcript in the filled manifest; running the command again
    # never replaces those corrections (refused before the ASR model loads) unless --overwrite
    corrected = out.read_text(encoding="utf-8").replace(written[0]["text"], "Corrected by hand.")
    out.write_text(corrected, encoding="utf-8")
    again = CliRunner().invoke(cli, [*args, "--model", str(tiny_dir), "--out", str(tmp_path / "c2")])
    assert again.exit_code == 2, again.output
    assert (
        f"{out} exists already (a filled manifest of an earlier --transcribe, perhaps with your corrections): it "
        f"is left as it is. Fix: prepare it directly (`higgs-tune prepare {out} ...`, without --transcribe), or pass "
        "--overwrite to transcribe again and replace it."
    ) in " ".join(again.output.split())
    assert out.read_text(encoding="utf-8") == corrected and not (tmp_path / "c2").exists()
    direct = CliRunner().invoke(cli, ["prepare", str(out), "--model", str(tiny_dir), "--out", str(tmp_path / "c2")])
    assert direct.exit_code == 0, direct.output
    assert "Corrected by hand." in {e.text for e in CodeCache.open(tmp_path / "c2").entries}
    replaced = CliRunner().invoke(cli, [*args, "--model", str(tiny_dir), "--out", str(tmp_path / "c3"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == written


def test_prepare_from_folder_transcribes_audio_without_a_transcript(tiny_dir, demo_heldout, tmp_path):
    asr_dir, _ = make_tiny_eval_models(tmp_path / "eval")
    rows = [json.loads(x) for x in demo_heldout.read_text(encoding="utf-8").splitlines()][:2]
    voices = tmp_path / "voices" / "amira"
    voices.mkdir(parents=True)
    for r in rows:
        shutil.copy(demo_heldout.parent / r["audio"], voices / r["audio"].split("/")[-1])
    with_text = voices / rows[0]["audio"].split("/")[-1]
    with_text.with_suffix(".txt").write_text(rows[0]["text"], encoding="utf-8")
    untranscribed = voices / rows[1]["audio"].split("/")[-1]  # no .txt beside it

    # without --transcribe the missing transcript is a problem, named
    plain = CliRunner().invoke(cli, ["prepare", "--from-folder", str(tmp_path / "voices"), "--language", "en"])
    assert plain.exit_code == 2 and f"{untranscribed.with_suffix('.txt')}: transcript file not found" in plain.output

    args = ["prepare", "--from-folder", str(tmp_path / "voices"), "--language", "en", "--transcribe"]
    res = CliRunner().invoke(
        cli, [*args, "--asr-model", str(asr_dir), "--model", str(tiny_dir), "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 0, res.output
    assert "transcribed 1 row(s)" in res.output
    cache = CodeCache.open(tmp_path / "c")
    by_id = {e.id: e for e in cache.entries}
    assert by_id[with_text.stem].text == rows[0]["text"] and by_id[with_text.stem].text_source is None
    asr = AsrModel.load(asr_dir)
    expected = asr.transcribe([load_codec_audio(untranscribed, asr.sample_rate)], "en")[0].strip()
    assert by_id[untranscribed.stem].text == expected and by_id[untranscribed.stem].text_source == f"asr:{asr_dir}"
