"""A real model card in every checkpoint (final/, checkpoint-N/) and every export."""

from __future__ import annotations

import json

from click.testing import CliRunner
from recipe_support import small_config

from higgs_tune.app.cli import main as cli
from higgs_tune.data.cache import CodeCache
from higgs_tune.train.checkpoint import verify_checkpoint
from higgs_tune.train.recipe import train


def test_final_and_export_cards(tiny_dir, demo_cache, tmp_path):
    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", ["train.max_steps=2", "train.warmup_steps=0"])
    run = train(cfg)
    card = (run.final_dir / "README.md").read_text(encoding="utf-8")
    manifest = verify_checkpoint(run.final_dir)  # the card is part of the verified files
    assert "README.md" in manifest["files"]
    entries = CodeCache.open(demo_cache).entries
    hours = sum(e.duration_s for e in entries) / 3600
    speakers = len({e.speaker for e in entries})
    loss = manifest["metrics"]["loss"]
    for line in (
        f"base_model: {tiny_dir}",
        "library_name: peft",
        "# Fine-tuned Higgs Audio v2 (adapter)",
        f"- Base model: `{tiny_dir}` (Higgs Audio v2 family)",
        "- Mode: LoRA r=16, alpha=32, pathways text_attn, text_mlp, audio_mlp; "
        "trained in full: audio_lm_head, audio_embeddings, text_lm_head",
        f"- Data: {hours:.2f} h in {len(entries)} clips, {speakers} speaker(s), languages ar, en",
        "- Steps: 2",
        f"- Last train loss: {loss:.4f}",
        "- Evaluation: not run",
        "## Generate",
        "- Licence: other",
        'higgs-tune generate "Hello there." --adapter THIS_FOLDER',
        f"base = HiggsAudioV2ForConditionalGeneration.from_pretrained({str(tiny_dir)!r}, use_text_head=True)",
        "`use_text_head=True` is needed",
    ):
        assert line in card, line

    # evaluated run: the export's card carries WER/CER/SIM
    (run.run_dir / "eval").mkdir()
    summary = {"num_clips": 6, "wer": 0.25, "cer": 0.125, "speaker_similarity": 0.5}
    (run.run_dir / "eval" / "results.json").write_text(json.dumps({"summary": summary}))
    out = tmp_path / "export"
    res = CliRunner().invoke(cli, ["export", str(out), "--adapter", str(run.final_dir)])
    assert res.exit_code == 0, res.output
    exported = (out / "README.md").read_text(encoding="utf-8")
    assert "# Fine-tuned Higgs Audio v2 (merged export)" in exported
    assert "- Evaluation (6 held-out clips): WER 0.2500, CER 0.1250, speaker similarity 0.5000" in exported
    assert "; merged into the base weights" in exported and "--model THIS_FOLDER" in exported
    assert "- Steps: 2" in exported and "library_name: transformers" in exported


def test_no_peft_template_left(tiny_dir, demo_cache, tmp_path):
    cfg = small_config(tiny_dir, demo_cache, None, tmp_path / "run", ["train.max_steps=1", "train.warmup_steps=0"])
    card = (train(cfg).final_dir / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card and card.startswith("---\nbase_model: ")
