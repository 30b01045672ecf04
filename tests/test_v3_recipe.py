"""Higgs Audio v3 through the same recipe as v2 (the family seam): LoRA with the fused table as ONE
tied tensor, full fine-tuning, exact resume, health at v3's chance level, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from recipe_support import preset_dict, small_config
from safetensors.torch import load_file

from higgs_tune.config import config_from_dict
from higgs_tune.errors import DataError, ModelLoadError
from higgs_tune.families.select import family_for
from higgs_tune.families.v2.family import V2
from higgs_tune.families.v3.family import V3
from higgs_tune.train.recipe import train

V3_BASE = ["finetune.train_modules=[]", "train.log_steps=1", "train.warmup_steps=2"]


def _records(run_dir, split="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("event") == "metrics" and r.get("split", split) == split]


def test_family_is_detected_from_model_type_and_overridable(tiny_dir, tiny_v3_stack):
    assert family_for(tiny_v3_stack) is V3
    assert family_for(tiny_dir) is V2
    assert family_for(tiny_dir, "v3") is V3
    with pytest.raises(ModelLoadError, match="model.family 'v4'"):
        family_for(tiny_dir, "v4")


def test_v3_lora_trains_the_table_as_one_tied_tensor(tiny_v3_stack, v3_demo_cache, tmp_path):
    cfg = small_config(tiny_v3_stack, v3_demo_cache, None, tmp_path / "run", [*V3_BASE, "train.max_steps=30"])
    result = train(cfg)
    rows = _records(result.run_dir)
    first, last = rows[0], rows[-1]
    assert abs(first["audio_loss"] - math.log(1026)) < 0.6  # a random model starts near chance
    assert last["audio_loss"] < 2.0  # and learns (ln 1026 = 6.93)
    assert last["text_loss"] == 0.0 and last["n_text_tokens"] == 0  # v3 has no text loss
    assert len(last["per_codebook_loss"]) == len(last["per_codebook_acc"]) == 8
    # the EOC fill is labelled ("all"): codebook c has c fewer rows than codebook 0
    n = last["n_audio_tokens_per_codebook"]
    assert [n[0] - x for x in n] == [0, *[n[0] - n[c] for c in range(1, 8)]] and n[0] > n[7]

    base = result.model.get_base_model()
    table = base.audio_table.weight
    assert table.requires_grad
    # ONE parameter: nothing else in the model holds an audio-table copy (no modules_to_save)
    same_shape = [name for name, p in result.model.named_parameters() if p.shape == table.shape]
    assert same_shape == ["base_model.model.audio_table.weight"]
    # it moved from the base checkpoint, and the saved file is the live tensor, bit for bit
    start = V3.load_model(cfg.model).audio_table.weight
    assert not torch.equal(start, table.detach())
    saved = load_file(str(result.final_dir / "audio_table.safetensors"))["audio_table.weight"]
    assert torch.equal(saved, table.detach())
    # reloaded onto a fresh base, the adapter gives the same outputs; merging keeps one tied table
    batch = _one_batch(cfg)
    with torch.no_grad():
        want = result.model(**batch).per_codebook_loss
        fresh = V3.load_trainable(V3.load_model(cfg.model), result.final_dir)
        torch.testing.assert_close(fresh(**batch).per_codebook_loss, want)
        merged = fresh.merge_and_unload()
        assert torch.equal(merged.audio_table.weight, table.detach())
        torch.testing.assert_close(merged(**batch).per_codebook_loss, want, rtol=1e-5, atol=1e-5)
        # embedding and head are the same weight: a change to the table changes both paths
        merged.audio_table.weight.mul_(2)
        codes = torch.zeros(1, 8, dtype=torch.long)
        emb = merged.audio_table.embed(codes)
        h = torch.ones(merged.config.hidden_size)
        logits = merged.audio_logits(h)
        torch.testing.assert_close(emb, 2 * table.detach()[[k * 1026 for k in range(8)]].sum(0, keepdim=True))
        torch.testing.assert_close(logits.reshape(-1), 2 * table.detach() @ h)


def _one_batch(cfg):
    from higgs_tune.data.pipeline import build_train_data, first_batches
    from higgs_tune.train.recipe import family_data

    processor = V3.load_processor(cfg.model.name_or_path)
    data = build_train_data(cfg, processor, family_data=family_data(V3, cfg, processor))
    batch = first_batches(data.train_set, data.sampler, data.collator, 1)[0]
    return {k: batch[k] for k in ("input_ids", "attention_mask", "audio_codes", "audio_labels")}


def test_v3_full_finetune_learns_and_reloads(tiny_v3_stack, v3_demo_cache, tmp_path):
    data = preset_dict(tiny_v3_stack, v3_demo_cache, None, tmp_path / "run")
    data["finetune"] = {"mode": "full", "pathways": []}
    overrides = ["train.sample_steps=null", "train.eval_steps=null", "checkpoint.keep_best=false"]
    overrides += ["data.eval_cache=null", "train.max_steps=20", "train.learning_rate=3e-3", *V3_BASE[1:]]
    cfg = config_from_dict(data, overrides)
    result = train(cfg)
    rows = _records(result.run_dir)
    assert rows[-1]["audio_loss"] < rows[0]["audio_loss"] - 1.0
    assert (result.final_dir / "v3_trained.safetensors").is_file()
    reloaded = V3.load_trainable(V3.load_model(cfg.model), result.final_dir)
    for (name, a), b in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_v3_resume_equals_uninterrupted(tiny_v3_stack, v3_demo_cache, tmp_path):
    overrides = [*V3_BASE, "train.max_steps=6", "checkpoint.save_steps=3", "finetune.lora_dropout=0.1"]
    straight = train(small_config(tiny_v3_stack, v3_demo_cache, None, tmp_path / "straight", overrides))

    def stop(step, batch, model):
        if step == 5:
            raise KeyboardInterrupt
        return batch

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_v3_stack, v3_demo_cache, None, run_dir, overrides), _batch_hook=stop)
    resumed = train(small_config(tiny_v3_stack, v3_demo_cache, None, run_dir, overrides), resume="auto")

    def by_step(run):
        return {r["step"]: {k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in _records(run)}

    assert by_step(resumed.run_dir) == by_step(straight.run_dir)
    a = load_file(str(straight.final_dir / "audio_table.safetensors"))["audio_table.weight"]
    b = load_file(str(resumed.final_dir / "audio_table.safetensors"))["audio_table.weight"]
    assert torch.equal(a, b)


def test_v3_chance_level_is_ln_1026_and_fires_when_nothing_learns(tiny_v3_stack, v3_demo_cache, tmp_path):
    from higgs_tune.families.v3.checkpoint import read_v3_config

    spec = V3.health_spec(read_v3_config(tiny_v3_stack))
    assert spec.audio_chance_loss == pytest.approx(6.9334, abs=1e-4) and not spec.has_text_loss
    overrides = [*V3_BASE, "train.max_steps=4", "train.learning_rate=1e-12", "health.chance_after_steps=2"]
    result = train(small_config(tiny_v3_stack, v3_demo_cache, None, tmp_path / "run", overrides))
    codes = [w.code for w in result.warnings]
    assert codes == ["chance_level"]
    assert "ln(1026)=6.93" in result.warnings[0].message


# ----------------------------------------------------------------------------- bad input
def test_a_v2_cache_from_another_codec_is_refused_on_a_v3_run(tiny_v3_stack, demo_cache, tmp_path):
    # the tiny v2 stack's codec is not the tiny v3 checkpoint's bundled codec
    cfg = small_config(tiny_v3_stack, demo_cache, None, tmp_path / "run", V3_BASE)
    with pytest.raises(DataError, match="encoded by another audio tokenizer") as e:
        train(cfg)
    assert str(demo_cache) in str(e.value) and "higgs-tune prepare" in str(e.value)


def test_control_tags_in_manifest_text_are_refused_naming_the_rows(tiny_v3_stack, v3_demo_cache, tmp_path):
    from higgs_tune.data.cache import CodeCache
    from higgs_tune.data.dataset import TTSDataset
    from higgs_tune.families.v3.data import V3SampleLayout

    processor = V3.load_processor(tiny_v3_stack)
    tokens = V3.special_tokens(processor)
    cache = CodeCache.open(v3_demo_cache)
    tag = next(t for t in processor.tokenizer.get_added_vocab() if t not in ("<|tts|>", "<|audio|>"))
    cache.entries[3] = dataclasses.replace(cache.entries[3], text=f"Hello {tag} there.")
    cache.entries[5] = dataclasses.replace(cache.entries[5], text="<|audio|> sneaky")
    with pytest.raises(DataError) as e:
        TTSDataset(cache, tokens, processor.tokenizer, layout=V3SampleLayout(), task="tts")
    msg = str(e.value)
    assert msg.startswith("2 sample(s)")
    assert f"{cache.entries[3].id} (text contains {tag})" in msg
    assert f"{cache.entries[5].id} (text contains <|audio|>)" in msg


def test_adapters_of_the_other_family_are_refused(tiny_dir, tiny_v3_stack, v3_demo_cache, tmp_path):
    from higgs_tune.infer.loading import load_inference_stack
    from higgs_tune.tiny.eval_models import make_tiny_adapter

    v2_adapter = make_tiny_adapter(tiny_dir, tmp_path / "v2-adapter")
    with pytest.raises(ModelLoadError, match="Higgs Audio v2 adapter"):
        load_inference_stack(tiny_v3_stack, v2_adapter, device="cpu")

    cfg = small_config(tiny_v3_stack, v3_demo_cache, None, tmp_path / "run", [*V3_BASE, "train.max_steps=2"])
    v3_adapter = train(cfg).final_dir
    with pytest.raises(ModelLoadError, match="trained on a Higgs Audio v3 model"):
        load_inference_stack(tiny_dir, v3_adapter, device="cpu")
    # the recipe's resume path refuses them too
    shutil.copytree(v2_adapter, tmp_path / "v2-copy")
    with pytest.raises(ModelLoadError, match="Higgs Audio v2 adapter"):
        V3.load_trainable(V3.load_model(cfg.model), tmp_path / "v2-copy")


@pytest.mark.parametrize("eoc_labels", ["all", "first"])
def test_data_eoc_labels_chooses_which_end_of_codebook_rows_are_trained(
    tiny_v3_stack, v3_demo_cache, tmp_path, eoc_labels
):
    from higgs_tune.data.pipeline import build_train_data
    from higgs_tune.train.recipe import family_data, inspect_first_batches

    cfg = small_config(
        tiny_v3_stack, v3_demo_cache, None, tmp_path / "run", [*V3_BASE, f"data.eoc_labels={eoc_labels}"]
    )
    processor = V3.load_processor(tiny_v3_stack)
    data = build_train_data(cfg, processor, family_data=family_data(V3, cfg, processor))
    stats, _ = inspect_first_batches(data, V3)
    for b in stats["batches"]:
        # codebook c's codes end at row T + c - 1; rows T + c .. T + 6 are its EOC fill (7 - c rows)
        want = [(7 - c) * b["targets"] for c in range(8)] if eoc_labels == "all" else [b["targets"]] * 7 + [0]
        assert b["target_eoc_labels"] == want


def test_data_eoc_labels_is_validated(tiny_v3_stack, v3_demo_cache, tmp_path):
    from higgs_tune.config import ConfigError

    with pytest.raises(ConfigError, match="data.eoc_labels"):
        small_config(tiny_v3_stack, v3_demo_cache, None, tmp_path / "run", [*V3_BASE, "data.eoc_labels=some"])
