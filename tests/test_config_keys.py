"""The config's description of itself: every key's dotted name, type, default, help and resume rule."""

from __future__ import annotations

import dataclasses

from higgs_tune.config import (
    PATHWAYS,
    RESUME_MUST_MATCH,
    RESUME_SCHEDULE_LENGTH,
    TRAIN_MODULES,
    Config,
    config_help,
    config_keys,
    resume_keys,
)
from higgs_tune.model import lora
from higgs_tune.train.checkpoint import RESUME_KEYS, SCHEDULE_LENGTH_KEYS

# The list train/checkpoint.py typed out before the keys were marked on the config fields.
RESUME_KEYS_BEFORE = (
    "model.name_or_path",
    "model.dtype",
    "model.use_text_head",
    "model.audio_self_attention",
    "finetune.mode",
    "finetune.pathways",
    "finetune.train_modules",
    "finetune.freeze",
    "finetune.lora_r",
    "finetune.lora_alpha",
    "finetune.lora_dropout",
    "finetune.use_rslora",
    "finetune.use_dora",
    "data.train_cache",
    "data.eval_fraction",
    "data.task",
    "data.clone_probability",
    "data.system_prompt",
    "data.use_scene",
    "data.max_tokens_per_batch",
    "data.max_batch_size",
    "data.max_sequence_length",
    "data.bucket_size",
    "data.eoc_labels",
    "loss.text_weight",
    "loss.audio_weight",
    "loss.codebook_weights",
    "train.seed",
    "train.learning_rate",
    "train.weight_decay",
    "train.adam_betas",
    "train.warmup_steps",
    "train.lr_scheduler",
    "train.gradient_accumulation_steps",
    "train.max_grad_norm",
    "train.mixed_precision",
    "train.optimizer",  # issue 17: the optimizer kind is part of the trajectory
)


def test_resume_keys_are_derived_from_the_config_fields():
    assert set(resume_keys(RESUME_MUST_MATCH)) == set(RESUME_KEYS_BEFORE)
    assert RESUME_KEYS == resume_keys(RESUME_MUST_MATCH)
    assert SCHEDULE_LENGTH_KEYS == resume_keys(RESUME_SCHEDULE_LENGTH) == ("train.max_steps", "train.num_epochs")


def test_config_keys_describe_every_setting():
    cfg = Config().to_dict()
    keys = {key.name: key for key in config_keys()}
    assert list(keys) == [f"{section}.{name}" for section, values in cfg.items() for name in values]
    for name, key in keys.items():
        section, field = name.split(".")
        assert key.default == cfg[section][field], name
        assert key.help and key.type, name
    lr = keys["train.learning_rate"]
    assert (lr.type, lr.default, lr.help, lr.resume) == ("a number", 1e-4, "Peak learning rate.", RESUME_MUST_MATCH)
    assert keys["checkpoint.save_steps"].resume is None
    assert keys["model.audio_tokenizer"].type == "a string or null"


def test_help_text_gives_each_key_under_its_section():
    lines = config_help().splitlines()
    for key in config_keys():
        section, name = key.name.split(".")
        line = f"  {name} ({key.type}, default {key.default!r}): {key.help}"
        assert lines.index(line) > lines.index(f"{section}:"), key.name


def test_pathway_names_are_defined_once():
    assert tuple(lora.PATHWAYS) == PATHWAYS
    assert tuple(lora.TRAIN_MODULES) == TRAIN_MODULES
    assert [f.name for f in dataclasses.fields(Config)] == [
        "model",
        "finetune",
        "data",
        "loss",
        "health",
        "train",
        "checkpoint",
        "logging",
    ]
