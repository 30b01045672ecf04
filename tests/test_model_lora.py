"""LoRA pathways, fully trained modules, full mode, save/load round trips and the parameter report."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_model_support import model_inputs, synthetic_batch, train_steps

from higgs_tune.config import FinetuneConfig, ModelConfig
from higgs_tune.errors import ModelLoadError
from higgs_tune.model.load import load_model
from higgs_tune.model.lora import (
    apply_finetuning,
    collapse_names,
    load_trainable,
    parameter_report,
    resolve_targets,
    resolve_train_modules,
    save_trainable,
)

ALL_PATHWAYS = ["text_attn", "text_mlp", "audio_mlp", "audio_attn"]


def _load(tiny_dir, **kw):
    kw.setdefault("audio_self_attention", True)
    return load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32", **kw)).eval()


def _lora(**kw) -> FinetuneConfig:
    kw.setdefault("pathways", ALL_PATHWAYS)
    kw.setdefault("lora_r", 4)
    kw.setdefault("lora_dropout", 0.0)
    return FinetuneConfig(**kw)


def _names(part: str, leaves: str) -> list[str]:
    return [f"model.layers.{i}.{part}.{leaf}" for i in range(2) for leaf in leaves.split()]


def _lora_layers(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    )


def test_resolve_targets_exact_names(tiny_dir):
    model = _load(tiny_dir)
    assert resolve_targets(model, ALL_PATHWAYS) == {
        "text_attn": _names("self_attn", "q_proj k_proj v_proj o_proj"),
        "text_mlp": _names("mlp", "gate_proj up_proj down_proj"),
        "audio_mlp": _names("audio_mlp", "gate_proj up_proj down_proj"),
        "audio_attn": _names("audio_attn", "q_proj k_proj v_proj o_proj"),
    }
    assert resolve_train_modules(
        model, ["audio_lm_head", "audio_embeddings", "text_lm_head", "text_embeddings", "audio_attn"]
    ) == {
        "audio_lm_head": ["audio_lm_head"],
        "audio_embeddings": ["model.embed_audio_tokens.embed_audio_tokens"],
        "text_lm_head": ["text_lm_head"],
        "text_embeddings": ["model.embed_tokens"],
        "audio_attn": [
            f"model.layers.{i}.{m}" for i in range(2) for m in ("audio_attn", "audio_post_audio_attn_layer_norm")
        ],
    }


def test_unknown_or_empty_pathway_is_an_error(tiny_dir):
    model = _load(tiny_dir, audio_self_attention=False, use_text_head=False)
    with pytest.raises(
        ModelLoadError,
        match=r"unknown LoRA pathway\(s\) \['audio_ffn'\]; known: text_attn, text_mlp, audio_mlp, audio_attn",
    ):
        resolve_targets(model, ["text_attn", "audio_ffn"])
    with pytest.raises(
        ModelLoadError,
        match=r"LoRA pathway 'audio_attn' .* matches no module of this model. Set model.audio_self_attention: true",
    ):
        resolve_targets(model, ["audio_attn"])
    with pytest.raises(
        ModelLoadError,
        match=r"module 'text_lm_head' .* is not in this model. Load the model with model.use_text_head: true",
    ):
        resolve_train_modules(model, ["text_lm_head"])
    with pytest.raises(ModelLoadError, match=r"unknown trainable module\(s\) \['lm_head'\]"):
        apply_finetuning(model, _lora(pathways=["text_attn"], train_modules=["lm_head"]))


def test_setup_errors(tiny_dir):
    model = _load(tiny_dir)
    with pytest.raises(ModelLoadError, match=r"finetune.pathways is empty: PEFT needs at least one LoRA pathway"):
        apply_finetuning(model, _lora(pathways=[], train_modules=["audio_lm_head"]))
    with pytest.raises(ModelLoadError, match=r"audio_attn is both a LoRA pathway and a fully trained module"):
        apply_finetuning(model, _lora(train_modules=["audio_attn"]))
    peft_model = apply_finetuning(model, _lora(pathways=["text_attn"]))
    with pytest.raises(ModelLoadError, match=r"already has PEFT adapters"):
        apply_finetuning(peft_model, _lora(pathways=["text_attn"]))


def test_lora_trains_adapters_only_and_round_trips_through_plain_peft(tiny_dir, tmp_path):
    model = _load(tiny_dir)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_finetuning(model, _lora(train_modules=["audio_lm_head"]))
    assert isinstance(peft_model, PeftModel)
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len([n for n in adapters_before if "lora_A" in n]) == 2 * (4 + 3 + 3 + 4)
    assert [n for n in adapters_before if "lora_" not in n] == [
        "base_model.model.audio_lm_head.modules_to_save.default.weight"
    ]

    batch = synthetic_batch(model.config)
    losses = train_steps(peft_model, batch, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]

    # every base weight bit-identical (LoRA base layers and the frozen original of audio_lm_head)
    named = dict(peft_model.named_parameters())
    for name, before in base_before.items():
        stem, leaf = name.rsplit(".", 1)
        candidates = [
            f"base_model.model.{stem}.base_layer.{leaf}",
            f"base_model.model.{stem}.{leaf}",
            f"base_model.model.{stem}.original_module.{leaf}",
        ]
        current = next(named[c] for c in candidates if c in named)
        assert torch.equal(current, before), name
    # every adapter weight (and the fully trained head) moved
    unchanged = [n for n, before in adapters_before.items() if torch.equal(named[n], before)]
    assert unchanged == [], unchanged

    out = tmp_path / "adapter"
    save_trainable(peft_model, out)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "extra_weights.safetensors",
    ]
    extras = load_file(str(out / "extra_weights.safetensors"))
    assert sorted(extras) == sorted(
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "audio_attn.q_proj",
            "audio_attn.k_proj",
            "audio_attn.v_proj",
            "audio_attn.o_proj",
            "audio_post_audio_attn_layer_norm",
        )
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"] == ["audio_lm_head"]
    assert config["target_modules"]  # PEFT may store the names as a minimal set of suffixes; checked on reload below

    with torch.no_grad():
        want = peft_model(**model_inputs(batch)).logits
        # plain PEFT on a fresh base model (audio self-attention enabled, as at training time)
        plain = PeftModel.from_pretrained(_load(tiny_dir), str(out)).eval()
        assert torch.equal(plain(**model_inputs(batch)).logits, want)
        assert (
            _lora_layers(plain)
            == _lora_layers(peft_model)
            == sorted(n for v in resolve_targets(model, ALL_PATHWAYS).values() for n in v)
        )
        # our loader: enables the block itself and loads extra_weights.safetensors
        ours = load_trainable(_load(tiny_dir, audio_self_attention=False), out).eval()
        assert torch.equal(ours(**model_inputs(batch)).logits, want)


def test_trained_audio_attention_block_is_saved_in_the_adapter(tiny_dir, tmp_path):
    peft_model = apply_finetuning(
        _load(tiny_dir), _lora(pathways=["audio_mlp"], train_modules=["audio_attn", "audio_lm_head"])
    )
    batch = synthetic_batch(peft_model.config)
    train_steps(peft_model, batch, steps=3, lr=1e-2)
    save_trainable(peft_model, tmp_path / "a")
    assert not (tmp_path / "a" / "extra_weights.safetensors").exists()  # the adapter holds the trained block
    with torch.no_grad():
        want = peft_model(**model_inputs(batch)).logits
        plain = PeftModel.from_pretrained(_load(tiny_dir), str(tmp_path / "a")).eval()
        assert torch.equal(plain(**model_inputs(batch)).logits, want)
        ours = load_trainable(_load(tiny_dir, audio_self_attention=False), tmp_path / "a").eval()
        assert torch.equal(ours(**model_inputs(batch)).logits, want)


def test_every_fully_trained_module_trains_and_reloads(tiny_dir, tmp_path):
    modules = ["audio_lm_head", "audio_embeddings", "text_lm_head", "text_embeddings"]
    peft_model = apply_finetuning(
        _load(tiny_dir, audio_self_attention=False), _lora(pathways=["text_attn"], train_modules=modules)
    )
    wrapped = ["audio_lm_head", "model.embed_audio_tokens.embed_audio_tokens", "text_lm_head", "model.embed_tokens"]
    copies = {m: f"base_model.model.{m}.modules_to_save.default.weight" for m in wrapped}
    originals = {m: f"base_model.model.{m}.original_module.weight" for m in wrapped}
    params = dict(peft_model.named_parameters())
    before = {n: params[n].detach().clone() for n in [*copies.values(), *originals.values()]}
    batch = synthetic_batch(peft_model.config)
    train_steps(peft_model, batch, steps=2, lr=1e-2)
    for m in wrapped:
        assert not torch.equal(params[copies[m]], before[copies[m]]), m
        assert torch.equal(params[originals[m]], before[originals[m]]), m
    save_trainable(peft_model, tmp_path / "a")
    with torch.no_grad():
        want = peft_model(**model_inputs(batch)).logits
        plain = PeftModel.from_pretrained(_load(tiny_dir, audio_self_attention=False), str(tmp_path / "a")).eval()
        assert torch.equal(plain(**model_inputs(batch)).logits, want)


def test_lora_with_gradient_checkpointing_matches_plain_gradients(tiny_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA A init in both
        peft_model = apply_finetuning(
            _load(tiny_dir, gradient_checkpointing=checkpointing), _lora(pathways=["text_attn", "audio_attn"])
        )
        peft_model.train()
        peft_model(**synthetic_batch(peft_model.config)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        assert peft_model.get_base_model().is_activation_checkpointing == checkpointing
        # input grads enabled (hook on the text embeddings) exactly when checkpointing
        assert bool(peft_model.get_base_model().get_input_embeddings()._forward_hooks) == checkpointing
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_dora_and_rslora(tiny_dir):
    peft_model = apply_finetuning(_load(tiny_dir), _lora(pathways=["text_mlp"], use_dora=True, use_rslora=True))
    config = peft_model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    magnitudes = [n for n, _ in peft_model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 6
    assert torch.isfinite(peft_model(**synthetic_batch(peft_model.config)).loss)


def test_full_mode_freeze_and_round_trip(tiny_dir, tmp_path):
    model = _load(tiny_dir)
    cfg = FinetuneConfig(mode="full", pathways=[], freeze=["text_attn", "audio_embeddings", "text_lm_head"])
    assert apply_finetuning(model, cfg) is model
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(
        [f"{n}.weight" for n in _names("self_attn", "q_proj k_proj v_proj o_proj")]
        + ["model.embed_audio_tokens.embed_audio_tokens.weight", "text_lm_head.weight"]
    )
    batch = synthetic_batch(model.config)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, batch, steps=2, lr=1e-3)
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name

    save_trainable(model, tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file() and (tmp_path / "full" / "config.json").is_file()
    reloaded = load_trainable(_load(tiny_dir, audio_self_attention=False), tmp_path / "full").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with pytest.raises(ModelLoadError, match=r"holds neither adapter_config.json \(LoRA\) nor config.json"):
        load_trainable(_load(tiny_dir), tmp_path)


def test_parameter_report_adds_up_and_names_targets(tiny_dir):
    model = _load(tiny_dir)
    total = sum(p.numel() for p in model.parameters())
    full = parameter_report(model)
    assert full.mode == "full" and full.total == total == full.trainable
    peft_model = apply_finetuning(model, _lora(train_modules=["audio_lm_head"]))
    report = parameter_report(peft_model)
    assert report.total == sum(p.numel() for p in peft_model.parameters())
    assert report.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (
        sum(r.trainable for r in report.rows) == report.trainable
        and sum(r.frozen for r in report.rows) == report.frozen
    )
    # LoRA r=4 on Linear(in, out) adds 4 * (in + out); q/o are 64->64, k/v 64->32, MLPs 64<->128
    attn_lora = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2)
    mlp_lora = 2 * 4 * (64 + 128) * 3
    rows = {r.group: (r.trainable, r.frozen) for r in report.rows}
    assert rows == {
        "text_attn": (attn_lora, 2 * (64 * 64 * 2 + 32 * 64 * 2)),
        "text_mlp": (mlp_lora, 2 * 3 * 64 * 128),
        "audio_mlp": (mlp_lora, 2 * 3 * 64 * 128),
        "audio_attn": (attn_lora, 2 * (64 * 64 * 2 + 32 * 64 * 2 + 64)),
        "norms": (0, 2 * 4 * 64 + 64),
        "embeddings": (0, 2048 * 64 + 8 * 1026 * 64),
        "heads": (64 * 8 * 1026, 64 * 8 * 1026 + 64 * 2048),  # trained copy / frozen original + text head
        "other": (0, 0),
    }
    assert report.targets == {
        "text_attn": ["model.layers.{0..1}.self_attn.{q,k,v,o}_proj"],
        "text_mlp": ["model.layers.{0..1}.mlp.{gate,up,down}_proj"],
        "audio_mlp": ["model.layers.{0..1}.audio_mlp.{gate,up,down}_proj"],
        "audio_attn": ["model.layers.{0..1}.audio_attn.{q,k,v,o}_proj"],
    }
    assert report.modules_to_save == ["audio_lm_head"]
    assert report.dtypes == {"float32": report.total}
    assert report.weight_bytes == 4 * report.total and report.grad_bytes == 4 * report.trainable
    assert report.optimizer_bytes == 8 * report.trainable
    text = report.format()
    assert "model.layers.{0..1}.self_attn.{q,k,v,o}_proj" in text and "AdamW state" in text
    assert f"{report.trainable:,}" in text and f"{report.frozen:,}" in text


def test_collapse_names():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(28) for p in "qkvo"]
    assert collapse_names(names) == ["model.layers.{0..27}.self_attn.{q,k,v,o}_proj"]
    assert collapse_names(
        ["model.layers.0.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.5.mlp.up_proj", "audio_lm_head"]
    ) == [
        "model.layers.{0,2,5}.mlp.up_proj",
        "audio_lm_head",
    ]
    assert collapse_names(
        [f"model.layers.{i}.{m}" for i in range(4) for m in ("audio_attn", "audio_post_audio_attn_layer_norm")]
    ) == [
        "model.layers.{0..3}.audio_attn",
        "model.layers.{0..3}.audio_post_audio_attn_layer_norm",
    ]


def test_real_3b_shapes_on_the_meta_device():
    """The released model's module tree (Llama-3.2-3B + DualFFN; no memory: meta device): every pathway
    resolves to all 28 layers, and the counts are the published ~3.6B LLM + ~2.2B audio adapter,
    + ~0.7B when audio self-attention is added."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_tune.model.audio_attention import enable_audio_self_attention

    config = HiggsAudioV2Config(codebook_size=1026)  # 1024 codes + stream BOS/EOS rows
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    ) == (3072, 28, 24, 8, 8192, 128256)
    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    targets = resolve_targets(model, ["text_attn", "text_mlp", "audio_mlp"])
    assert {k: len(v) for k, v in targets.items()} == {"text_attn": 112, "text_mlp": 84, "audio_mlp": 84}
    assert {k: collapse_names(v) for k, v in targets.items()} == {
        "text_attn": ["model.layers.{0..27}.self_attn.{q,k,v,o}_proj"],
        "text_mlp": ["model.layers.{0..27}.mlp.{gate,up,down}_proj"],
        "audio_mlp": ["model.layers.{0..27}.audio_mlp.{gate,up,down}_proj"],
    }
    assert resolve_train_modules(model, ["audio_lm_head", "audio_embeddings", "text_lm_head", "text_embeddings"]) == {
        "audio_lm_head": ["audio_lm_head"],
        "audio_embeddings": ["model.embed_audio_tokens.embed_audio_tokens"],
        "text_lm_head": ["text_lm_head"],
        "text_embeddings": ["model.embed_tokens"],
    }
    report = parameter_report(model)
    rows = {r.group: r.total for r in report.rows}
    text_vocab, audio_vocab = 128256 * 3072, 8 * 1026 * 3072
    assert rows == {
        "text_attn": 704_643_072,
        "text_mlp": 2_113_929_216,
        "audio_mlp": 2_113_929_216,
        "audio_attn": 0,
        "norms": 347_136,
        "embeddings": text_vocab + audio_vocab,
        "heads": text_vocab + audio_vocab,
        "other": 0,
    }
    assert report.total == sum(p.numel() for p in model.parameters()) == 5_771_283_456
    llm = rows["text_attn"] + rows["text_mlp"] + 2 * text_vocab + 28 * 2 * 3072 + 3072  # + input/post norms, final norm
    audio_adapter = rows["audio_mlp"] + 2 * audio_vocab + 28 * 2 * 3072  # + audio norms
    assert llm + audio_adapter == report.total
    assert (llm, audio_adapter) == (3_606_752_256, 2_164_531_200)  # ~3.6B + ~2.2B

    with torch.device("meta"):
        assert enable_audio_self_attention(model) == 28
    assert {k: len(v) for k, v in resolve_targets(model, ["audio_attn"]).items()} == {"audio_attn": 112}
    with_block = {r.group: r.total for r in parameter_report(model).rows}
    assert with_block["audio_attn"] == 28 * (704_643_072 // 28 + 3072) == 704_729_088  # ~0.7B
    assert {k: v for k, v in with_block.items() if k != "audio_attn"} == {
        k: v for k, v in rows.items() if k != "audio_attn"
    }
