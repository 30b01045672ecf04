"""Higgs Audio v3 through the app: make-tiny --family v3, generate, export in the released layout,
verify (v2 and v3), demo --family v3 end to end."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from click.testing import CliRunner
from recipe_support import small_config
from safetensors import safe_open

from higgs_tune.app.cli import main
from higgs_tune.families.v3.checkpoint import CODEC_PREFIX, load_v3_checkpoint, released_key_map
from higgs_tune.families.v3.family import V3
from higgs_tune.train.recipe import train

V3_BASE = ["finetune.train_modules=[]", "train.log_steps=1", "train.warmup_steps=2"]


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def v3_run(tiny_v3_stack, v3_demo_cache, tmp_path_factory):
    cfg = small_config(
        tiny_v3_stack, v3_demo_cache, None, tmp_path_factory.mktemp("v3run") / "run", [*V3_BASE, "train.max_steps=25"]
    )
    return train(cfg)


def test_make_tiny_family_v3_writes_the_released_layout(tmp_path):
    out = tmp_path / "tiny3"
    result = CliRunner().invoke(main, ["make-tiny", str(out), "--family", "v3"])
    assert result.exit_code == 0, result.output
    assert "tiny Higgs Audio v3 checkpoint written to" in result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "higgs_multimodal_qwen3"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert set(released_key_map(2)) <= keys and any(k.startswith(CODEC_PREFIX) for k in keys)
    again = CliRunner().invoke(main, ["make-tiny", str(out), "--family", "v3"])
    assert again.exit_code == 2 and "not empty" in again.output


def test_generate_cli_speaks_with_a_v3_adapter(v3_run, tiny_v3_stack, tmp_path):
    wav = tmp_path / "out.wav"
    result = CliRunner().invoke(
        main,
        ["generate", "Hello there.", "--model", str(tiny_v3_stack), "--adapter", str(v3_run.final_dir),
         "--out", str(wav), "--temperature", "0", "--max-new-tokens", "40"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert wav.is_file() and wav.stat().st_size > 44


def test_v3_generation_follows_the_stop_rule_and_voice_cloning(v3_run, tiny_v3_stack):
    from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, generate_speech
    from higgs_tune.infer.loading import load_inference_stack

    stack = load_inference_stack(tiny_v3_stack, v3_run.final_dir, device="cpu")
    assert stack.family is V3
    ref = torch.randint(0, 1024, (8, 6), generator=torch.Generator().manual_seed(0))
    requests = [
        GenerationRequest(text="Good morning.", id="tts"),
        GenerationRequest(text="In my voice.", ref_text="Reference words.", ref_codes=ref, id="clone"),
    ]
    options = SamplingOptions(temperature=0.0, max_new_tokens=30, seed=0)
    results = generate_speech(stack.model, stack.processor, stack.tokens, requests, options, family=stack.family)
    hop = stack.processor.audio_tokenizer.config.hop_length
    for r in results:
        assert r.codes.shape[0] == 8 and int(r.codes.max()) < 1024
        assert len(r.wav) == r.num_frames * hop  # every frame decoded, none dropped
        if r.stopped:  # SGLang's rule: EOC on codebook 0 at row T, 6 more rows -> T+7 rows, T frames
            assert r.num_columns == r.num_frames + 7
        else:
            assert r.num_frames == 30


def test_v3_prompt_longer_than_the_context_is_refused_with_its_length(v3_run, tiny_v3_stack):
    """The length checked is that of the prompt generate_v3 feeds (generation_prompt), reference included."""
    from higgs_tune.families.base import GenerationError
    from higgs_tune.families.v3.generate import generation_prompt
    from higgs_tune.infer.generate import GenerationRequest, SamplingOptions
    from higgs_tune.infer.loading import load_inference_stack

    stack = load_inference_stack(tiny_v3_stack, v3_run.final_dir, device="cpu")
    ref = torch.randint(0, 1024, (8, 3000), generator=torch.Generator().manual_seed(0))  # 3007 rows
    request = GenerationRequest(text="Long " * 600, ref_text="Reference words.", ref_codes=ref, id="long")
    expected = len(
        generation_prompt(
            stack.processor.tokenizer, stack.tokens, request.text, ref_codes=ref, ref_text=request.ref_text
        )["input_ids"]
    )
    assert expected > 4096
    with pytest.raises(
        GenerationError, match=rf"long: the prompt is {expected} tokens but the model's context is 4096"
    ):
        stack.family.generate_codes(stack.model, stack.processor, stack.tokens, request, SamplingOptions(), "long")


def test_export_writes_the_released_layout_our_loader_reads(v3_run, tiny_v3_stack, tmp_path):
    from higgs_tune.infer.export import export_merged

    out = tmp_path / "export"
    result = export_merged(tiny_v3_stack, v3_run.final_dir, out)
    assert result.merged_lora
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        exported = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(str(tiny_v3_stack / "model.safetensors"), framework="pt") as f:
        base = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert exported == base  # same key set and shapes as the released base (codec included)
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_v3_stack / "config.json").read_text())
    merged = load_v3_checkpoint(out).model
    trained = v3_run.model.get_base_model()
    assert torch.equal(merged.audio_table.weight, trained.audio_table.weight.detach())
    # the merged model scores a batch as base + adapter does
    batch = {
        "input_ids": torch.tensor([[trained.config.raw["eos_token_id"], -100, -100]]),
        "audio_codes": torch.zeros(1, 3, 8, dtype=torch.long),
        "audio_labels": torch.tensor([[[-100] * 8, [1] * 8, [2] * 8]]),
    }
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).per_codebook_loss, v3_run.model(**batch).per_codebook_loss)
    assert json.loads((out / "higgs_tune_export.json").read_text())["family"] == "v3"


@pytest.mark.parametrize("which", ["v2", "v3"])
def test_verify_prints_a_pasteable_verdict(which, tiny_dir, tiny_v3_stack, tmp_path):
    model = tiny_dir if which == "v2" else tiny_v3_stack
    out_json = tmp_path / "verify.json"
    result = CliRunner().invoke(main, ["verify", str(model), "--max-frames", "20", "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out_json.read_text())
    assert figures["family"] == which
    assert len(figures["per_codebook_loss"]) == len(figures["per_codebook_acc"]) == 8
    assert figures["end_total"] > 0 and 0 <= figures["end_correct"] <= figures["end_total"]
    assert figures["chance_loss"] == pytest.approx(math.log(1026))
    # a random tiny model is at chance: the verdict says so
    assert figures["audio_loss"] > 0.8 * math.log(1026)
    assert figures["verdict"].startswith("PROBLEM: audio loss")
    for needle in ("higgs-tune verify", "strict", "loss per codebook", "end-of-audio", "peak memory", "verdict:"):
        assert needle in result.output


def test_verify_of_a_trained_v3_adapter_is_below_chance(v3_run, tiny_v3_stack):
    from higgs_tune.app.verify import verify_model

    r = verify_model(str(tiny_v3_stack), str(v3_run.final_dir), max_frames=20)
    assert r.family == "v3" and r.audio_loss < 0.5 * math.log(1026) and not r.at_chance


def test_demo_family_v3_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--family", "v3", "--out", str(out), "--max-steps", "30"])
    assert result.exit_code == 0, result.output
    run = out / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m.get("event") == "metrics" and m["split"] == "train"]
    assert train_rows[-1]["step"] == 30 and train_rows[-1]["audio_loss"] < 0.5 * math.log(1026)
    assert (out / "tiny-model-v3" / "config.json").is_file()
    assert (run / "final" / "audio_table.safetensors").is_file()
    summary = json.loads((run / "eval" / "results.json").read_text())["summary"]
    assert summary["num_clips"] == 6
    assert "<svg" in (run / "report.html").read_text(encoding="utf-8")


def test_inspect_batches_of_a_v3_cache(tiny_v3_stack, v3_demo_cache, tmp_path):
    out_json = tmp_path / "stats.json"
    args = ["inspect", str(v3_demo_cache), "--model", str(tiny_v3_stack), "--batches", "2", "--json", str(out_json)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "target labels per codebook" in result.output and "trainable:" in result.output
    batches = json.loads(out_json.read_text())["batches"]["batches"]
    assert len(batches) == 2
    for b in batches:
        assert b["reference_trained"] == 0 and b["boc_labels"] == 0
        assert b["target_eoc_labels"][0] >= b["targets"] > 0
    show = CliRunner().invoke(
        main, ["inspect", str(v3_demo_cache), "--model", str(tiny_v3_stack), "--show", "en_a_000"]
    )
    assert show.exit_code == 0, show.output  # tests/test_v3_inspect.py checks what --show prints for v3
    assert show.stdout.splitlines()[-1].startswith("prompt matches training sample up to target audio: yes")
