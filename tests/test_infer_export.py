"""`higgs-tune export`: the merged folder loads with plain transformers and speaks like base + adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from higgs_tune.app.cli import main
from higgs_tune.errors import OutputDirError
from higgs_tune.infer.export import EXPORT_MARKER, codec_hub_id, export_merged
from higgs_tune.infer.generate import GenerationRequest, SamplingOptions, encode_reference, generate_speech
from higgs_tune.infer.loading import load_inference_stack
from higgs_tune.model.load import resolve_audio_tokenizer
from higgs_tune.tiny.eval_models import make_tiny_adapter

DEMO = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
REF_TEXT = "The morning train was right on time."
# Greedy and no repetition-aware re-drawing (it samples even in greedy mode): deterministic codes.
GREEDY = SamplingOptions(temperature=0, ras_win_len=0, max_new_tokens=40)


def _requests(processor):
    ref = encode_reference(processor, DEMO / "audio" / "en_a_000.flac")
    return [
        GenerationRequest(text="Please close the window.", ref_text=REF_TEXT, ref_codes=ref, id="clone"),
        GenerationRequest(text="مرحبا بكم في البيت.", id="tts"),
    ]


def _codes(model, processor, tokens):
    return [r.codes for r in generate_speech(model, processor, tokens, _requests(processor), GREEDY)]


def test_export_loads_with_plain_transformers_and_gives_the_same_codes(tiny_dir, tmp_path):
    from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor

    adapter = make_tiny_adapter(tiny_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["export", str(out), "--adapter", str(adapter), "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert f"exported {out} (LoRA merged; " in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "audio_tokenizer",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        EXPORT_MARKER,
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in ("config.json", "model.safetensors"):
        assert (out / "audio_tokenizer" / name).read_bytes() == (tiny_dir / "audio_tokenizer" / name).read_bytes()
    recorded = json.loads((out / "processor_config.json").read_text())["audio_tokenizer"][
        "audio_tokenizer_name_or_path"
    ]
    assert recorded == str((out / "audio_tokenizer").resolve())
    # transformers resolves that path as written: the user is told what to change after moving the export
    assert (
        f"note: processor_config.json points at the audio tokenizer by absolute path ({recorded}): the audio "
        "tokenizer has no Hub id (a local folder), and transformers does not resolve paths relative to the export. "
        "If you move or upload the export, set audio_tokenizer_name_or_path there to its new place (or a Hub id) "
        "for plain transformers; higgs-tune finds OUT/audio_tokenizer by itself."
    ) in " ".join(result.output.split())
    assert json.loads((out / "generation_config.json").read_text())["ras_win_len"] == 7
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert (
        marker["base_model"],
        marker["adapter"],
        marker["merged_lora"],
        marker["use_text_head"],
        marker["audio_self_attention"],
    ) == (str(tiny_dir), str(adapter), True, True, False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_lm_head.weight" in keys and not any(
        "lora_" in k or "base_layer" in k or "modules_to_save" in k for k in keys
    )

    # base + adapter, through higgs-tune
    stack = load_inference_stack(tiny_dir, adapter, device="cpu")
    expected = _codes(stack.model, stack.processor, stack.tokens)
    # the export, through plain transformers only
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = HiggsAudioV2Processor.from_pretrained(str(out))
    got = _codes(model, processor, stack.tokens)
    assert [c.shape for c in got] == [c.shape for c in expected]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    # and the adapter changed the model: the merged weights are not the base's
    with stack.model.disable_adapter():
        base = _codes(stack.model, stack.processor, stack.tokens)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(base, expected, strict=True))
    base_head = stack.model.base_model.model.audio_lm_head.original_module.weight
    assert not torch.equal(model.audio_lm_head.weight, base_head)
    assert torch.equal(
        model.audio_lm_head.weight, stack.model.base_model.model.audio_lm_head.modules_to_save["default"].weight
    )

    # a second export into the same folder needs --overwrite
    again = CliRunner().invoke(main, ["export", str(out), "--adapter", str(adapter), "--model", str(tiny_dir)])
    assert again.exit_code == 2
    assert f"{out} is not empty. Choose an empty or new folder, or pass --overwrite to replace it." in again.output


def hub_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """`source` laid out as the Hub cache holds a download of `repo_id` (what snapshot_download writes)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    shutil.copytree(source, snap)
    return snap


def test_export_with_a_hub_codec_loads_after_a_move_with_plain_transformers(tiny_dir, tmp_path, monkeypatch):
    """The codec comes from a Hub-cache snapshot: the export names it by Hub id, so the folder can
    be moved (and the working directory changed) and AutoProcessor still finds the codec."""
    from transformers import AutoProcessor, HiggsAudioV2ForConditionalGeneration

    cache = tmp_path / "hub-cache"
    snap = hub_snapshot(cache, "acme/tiny-codec", tiny_dir / "audio_tokenizer")
    adapter = make_tiny_adapter(tiny_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "first" / "export"
    result = CliRunner().invoke(
        main, ["export", str(out), "--adapter", str(adapter), "--model", str(tiny_dir), "--audio-tokenizer", str(snap)]
    )
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # nothing to fix after a move
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["audio_tokenizer"]["audio_tokenizer_name_or_path"] == "acme/tiny-codec"
    assert json.loads((out / EXPORT_MARKER).read_text())["audio_tokenizer_reference"] == "acme/tiny-codec"
    assert (out / "audio_tokenizer" / "model.safetensors").read_bytes() == (snap / "model.safetensors").read_bytes()

    moved = tmp_path / "elsewhere" / "my-voice"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")
    processor = AutoProcessor.from_pretrained(str(moved), cache_dir=str(cache), local_files_only=True)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(moved)).eval()
    stack = load_inference_stack(tiny_dir, adapter, device="cpu")
    expected = _codes(stack.model, stack.processor, stack.tokens)
    assert all(torch.equal(a, b) for a, b in zip(_codes(model, processor, stack.tokens), expected, strict=True))
    # higgs-tune's own loader uses the copy in the moved folder, without the Hub cache
    assert resolve_audio_tokenizer(moved) == str(moved / "audio_tokenizer")
    merged = load_inference_stack(moved, device="cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(_codes(merged.model, merged.processor, stack.tokens), expected, strict=True)
    )


def test_codec_hub_id_from_the_argument_a_snapshot_or_the_base(tiny_dir, tmp_path):
    assert codec_hub_id(tiny_dir, "bosonai/higgs-audio-v2-tokenizer") == "bosonai/higgs-audio-v2-tokenizer"
    assert codec_hub_id(tiny_dir, tmp_path / "hub" / "models--org--codec" / "snapshots" / "abc") == "org/codec"
    # a folder inside a snapshot is not addressable by an id; a plain local folder has none
    assert codec_hub_id(tiny_dir, tmp_path / "hub" / "models--org--m" / "snapshots" / "abc" / "audio_tokenizer") is None
    assert codec_hub_id(tiny_dir, tiny_dir / "audio_tokenizer") is None
    assert codec_hub_id(tiny_dir, None) is None  # the tiny stack records its codec by path
    # a base whose processor_config.json records a Hub id (as the released model does)
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((tiny_dir / "processor_config.json").read_text())
    config["audio_tokenizer"]["audio_tokenizer_name_or_path"] = "bosonai/higgs-audio-v2-tokenizer"
    (base / "processor_config.json").write_text(json.dumps(config))
    assert codec_hub_id(base, None) == "bosonai/higgs-audio-v2-tokenizer"


def test_export_with_audio_self_attention_keeps_its_weights(tiny_dir, tmp_path):
    adapter = make_tiny_adapter(
        tiny_dir,
        tmp_path / "adapter",
        seed=2,
        pathways=("text_attn", "audio_mlp", "audio_attn"),
        audio_self_attention=True,
    )
    result = export_merged(tiny_dir, adapter, tmp_path / "merged")
    assert result.audio_self_attention and result.merged_lora
    assert "plain transformers ignores their weights" in result.notes[0]
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as f:
        attn_keys = sorted(k for k in f.keys() if ".audio_attn." in k)
    assert attn_keys == [f"model.layers.{i}.audio_attn.{p}_proj.weight" for i in range(2) for p in ("k", "o", "q", "v")]

    stack = load_inference_stack(tiny_dir, adapter, device="cpu")
    merged = load_inference_stack(result.out_dir, device="cpu")
    expected = _codes(stack.model, stack.processor, stack.tokens)
    got = _codes(merged.model, merged.processor, merged.tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_export_in_shards_loads_with_plain_transformers(tiny_dir, tmp_path):
    """Above --max-shard-size the weights are split with an index, as the Hub's checkpoints are."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    adapter = make_tiny_adapter(tiny_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "sharded"
    args = ["export", str(out), "--adapter", str(adapter), "--model", str(tiny_dir), "--max-shard-size", "2MB"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    # transformers counts tensor bytes, 2MB as 2 MiB (a shard's file adds its JSON header)
    assert all((out / name).stat().st_size < 2 * 2**20 + 8192 for name in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    stack = load_inference_stack(tiny_dir, adapter, device="cpu")
    expected = _codes(stack.model, stack.processor, stack.tokens)
    plain = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(out)).eval()
    assert all(torch.equal(a, b) for a, b in zip(_codes(plain, stack.processor, stack.tokens), expected, strict=True))
    merged = load_inference_stack(out, device="cpu")  # and through higgs-tune
    assert all(
        torch.equal(a, b) for a, b in zip(_codes(merged.model, merged.processor, stack.tokens), expected, strict=True)
    )


def test_export_refuses_a_foreign_folder(tiny_dir, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputDirError, match=r"is not empty and was not written by `higgs-tune export` \(no higgs_tune_export.json\)"
    ):
        export_merged(tiny_dir, tmp_path / "adapter", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_full_fine_tune_weights_generate_and_export(tiny_dir, tmp_path):
    """A full fine-tune's checkpoint (whole model, save_pretrained) loads as --adapter and exports as is."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_tune.config import ModelConfig
    from higgs_tune.model.load import load_model
    from higgs_tune.model.lora import save_trainable

    tuned = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32", use_text_head=True))
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in (tuned.audio_lm_head.weight, tuned.model.layers[0].audio_mlp.up_proj.weight):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    weights = save_trainable(tuned, tmp_path / "full")

    stack = load_inference_stack(tiny_dir, weights, device="cpu")
    assert stack.model.text_lm_head is not None  # the full checkpoint has it, so it is loaded
    assert torch.equal(stack.model.audio_lm_head.weight, tuned.audio_lm_head.weight)
    expected = _codes(tuned.eval(), stack.processor, stack.tokens)
    assert all(
        torch.equal(a, b) for a, b in zip(_codes(stack.model, stack.processor, stack.tokens), expected, strict=True)
    )

    result = export_merged(tiny_dir, weights, tmp_path / "export")
    assert not result.merged_lora
    plain = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(result.out_dir)).eval()
    assert all(torch.equal(a, b) for a, b in zip(_codes(plain, stack.processor, stack.tokens), expected, strict=True))
