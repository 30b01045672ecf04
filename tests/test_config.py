"""The typed config: every problem at once, each naming its key and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from higgs_tune.config import Config, ConfigError, config_from_dict, config_help, load_config
from higgs_tune.errors import HiggsTuneError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"train_cache": "cache/train"}, "train": {"max_steps": 100}, "checkpoint": {"output_dir": "runs/a"}}


def problems(data: dict, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    return e.value.problems


def with_(**sections) -> dict:
    """MINIMAL with some sections' keys added or replaced."""
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_minimal_config_and_defaults():
    cfg = config_from_dict(MINIMAL)
    assert cfg.checkpoint.save_steps == 500
    assert cfg.checkpoint.save_total_limit == 3
    assert cfg.checkpoint.on_save_error == "abort"
    assert cfg.checkpoint.output_dir_fallback is None
    assert cfg.finetune.mode == "lora" and cfg.finetune.pathways == ["text_attn", "text_mlp", "audio_mlp"]
    assert cfg.model.audio_self_attention is False and cfg.model.use_text_head is True
    # list defaults are not shared between instances
    cfg.finetune.pathways.append("audio_attn")
    assert config_from_dict(MINIMAL).finetune.pathways == ["text_attn", "text_mlp", "audio_mlp"]


def test_five_mistakes_give_one_error_with_five_lines(tmp_path):
    path = write(
        tmp_path,
        """\
        model:
          dtype: bf16
          use_text_head: false
        finetune:
          mode: full
          pathways: []
          lora_r: 8
        data:
          train_cache: cache/train
        train:
          max_steps: 1000
          learning_rat: 3e-4
        checkpoint:
          save_steps: 500
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [
        "train.learning_rat: unknown key. Did you mean train.learning_rate?",
        "model.dtype: 'bf16' is not one of bfloat16, float16, float32. Did you mean 'bfloat16'?",
        "finetune.lora_r set in full mode: LoRA options have no effect there. Remove them or use mode: lora.",
        "loss.text_weight > 0 but model.use_text_head is false: set use_text_head true or text_weight 0.",
        "checkpoint.output_dir is required: the run folder for checkpoints, metrics and samples.",
    ]
    assert str(e.value) == f"5 problem(s) in {path}:\n" + "\n".join(f"  - {p}" for p in e.value.problems)
    # the CLI prints HiggsTuneError messages without a traceback
    assert isinstance(e.value, HiggsTuneError) and isinstance(e.value, ValueError)


def test_unknown_keys_are_errors_with_a_hint():
    assert problems(with_(train={"learning_rat": 1e-4})) == [
        "train.learning_rat: unknown key. Did you mean train.learning_rate?"
    ]
    assert problems(with_(train={"save_steps": 100})) == [
        "train.save_steps: unknown key. It belongs in another section: checkpoint.save_steps."
    ]
    assert problems({**MINIMAL, "trian": {}}) == ["trian: unknown key. Did you mean train?"]
    assert problems({**MINIMAL, "extras": 1}) == [
        "extras: unknown key. Sections: model, finetune, data, loss, health, train, checkpoint, logging."
    ]
    assert problems(with_(model={"zzz": 1})) == ["model.zzz: unknown key."]


def test_output_dir_is_required():
    data = with_()
    del data["checkpoint"]
    assert problems(data) == ["checkpoint.output_dir is required: the run folder for checkpoints, metrics and samples."]


@pytest.mark.parametrize(
    "sections,expected",
    [
        (
            {
                "checkpoint": {"keep_best": True, "save_steps": 500},
                "train": {"eval_steps": 200},
                "data": {"eval_fraction": 0.1},
            },
            [
                "checkpoint.save_steps (500) is not a multiple of train.eval_steps (200): with keep_best every "
                "save needs a fresh eval loss. Make save_steps a multiple of eval_steps."
            ],
        ),
        (
            {
                "checkpoint": {"keep_best": True},
                "train": {"eval_steps": 0},
                "data": {"eval_fraction": 0.1},
            },  # no division by zero
            ["train.eval_steps must be > 0 (or null), got 0."],
        ),
        (
            {"checkpoint": {"keep_best": True}},
            [
                "checkpoint.keep_best needs train.eval_steps: the best checkpoint is chosen by eval loss.",
                "checkpoint.keep_best needs a held-out split: set data.eval_cache or data.eval_fraction.",
            ],
        ),
        (
            {
                "finetune": {"mode": "full", "pathways": [], "lora_alpha": 64, "use_dora": True},
                "model": {"dtype": "float32"},
            },
            [
                "finetune.lora_alpha, finetune.use_dora set in full mode: LoRA options have no effect there. "
                "Remove them or use mode: lora."
            ],
        ),
        ({"finetune": {"mode": "full"}, "model": {"dtype": "float32"}}, []),
        (
            {
                "finetune": {"mode": "full", "pathways": ["text_attn"], "train_modules": ["audio_lm_head"]},
                "model": {"dtype": "float32"},
            },
            [
                "finetune.pathways set in full mode: all weights are trained; use finetune.freeze to keep parts "
                "frozen (or pathways: []).",
                "finetune.train_modules set in full mode: every module is trained already. Remove it (use "
                "finetune.freeze to keep parts frozen).",
            ],
        ),
        (
            {"finetune": {"freeze": ["text_embeddings"]}},
            [
                "finetune.freeze is a full-mode option; in lora mode everything outside the adapters is frozen "
                "already. Remove it."
            ],
        ),
        (
            {"model": {"use_text_head": False}},
            ["loss.text_weight > 0 but model.use_text_head is false: set use_text_head true or text_weight 0."],
        ),
        (
            {
                "model": {"use_text_head": False},
                "loss": {"text_weight": 0.0},
                "finetune": {"train_modules": ["text_lm_head"]},
            },
            [
                "finetune.train_modules has text_lm_head but model.use_text_head is false: set use_text_head true "
                "or remove text_lm_head."
            ],
        ),
        (
            {"finetune": {"pathways": ["text_attn", "audio_attn"]}},
            ["finetune names audio_attn but model.audio_self_attention is false: set it true or remove audio_attn."],
        ),
        (
            {"finetune": {"pathways": ["text_atn"]}},
            [
                "finetune.pathways: 'text_atn' is not one of text_attn, text_mlp, audio_mlp, audio_attn. Did you "
                "mean 'text_attn'?"
            ],
        ),
        (
            {"data": {"eval_cache": "cache/heldout"}, "train": {"max_steps": 10, "warmup_steps": 20}},
            [
                "train.warmup_steps (20) exceeds train.max_steps (10): the peak learning rate would never be "
                "reached. Lower warmup_steps."
            ],
        ),
        (
            {"data": {"eval_cache": "cache/heldout", "eval_fraction": 0.1}},
            ["data.eval_cache and data.eval_fraction are both set: choose one held-out source."],
        ),
        (
            {"data": {"task": "tts", "clone_probability": 0.5}},
            [
                "data.clone_probability is used only with data.task: mixed (task is 'tts'). Remove it or set task: "
                "mixed."
            ],
        ),
        (
            {"train": {"eval_steps": 100}},
            ["train.eval_steps is set but there is no held-out split: set data.eval_cache or data.eval_fraction."],
        ),
        (
            {"train": {"mixed_precision": "fp16"}},
            ["train.mixed_precision fp16 with model.dtype bfloat16: use bf16, or load float32/float16 weights."],
        ),
        (
            {"loss": {"text_weight": 0.0, "audio_weight": 0.0}},
            ["loss.text_weight and loss.audio_weight are both 0: nothing would be learned. Set one > 0."],
        ),
        (
            {"loss": {"codebook_weights": [0.0, 0.0]}},
            ["loss.codebook_weights must be >= 0 with at least one > 0, got [0.0, 0.0]."],
        ),
        (
            {"checkpoint": {"output_dir_fallback": "runs/a"}},
            [
                "checkpoint.output_dir_fallback is the same folder as checkpoint.output_dir: give another disk's "
                "folder or remove it."
            ],
        ),
        (
            {"checkpoint": {"save_steps": 0, "save_total_limit": 0, "on_save_error": "ignore", "min_free_gb": -1.0}},
            [
                "checkpoint.save_steps must be > 0, got 0.",
                "checkpoint.save_total_limit must be >= 1 (or null to keep all), got 0.",
                "checkpoint.on_save_error: 'ignore' is not one of abort, continue.",
                "checkpoint.min_free_gb must be >= 0, got -1.0.",
            ],
        ),
        (
            {"logging": {"report_to": ["none", "tensorboard"]}},
            ["logging.report_to lists none beside tensorboard: use [none] alone or drop it."],
        ),
    ],
)
def test_contradictions_are_rejected(sections, expected):
    if expected:
        assert problems(with_(**sections)) == expected
    else:
        config_from_dict(with_(**sections))


def test_full_mode_options_are_judged_by_what_was_written():
    # lora_r written with a value of its own is a contradiction in full mode (its default is what
    # a saved config writes back, so that is accepted: test_full_mode_default_lora_values_...)
    assert problems(with_(finetune={"mode": "full", "pathways": [], "lora_r": 4}, model={"dtype": "float32"})) == [
        "finetune.lora_r set in full mode: LoRA options have no effect there. Remove them or use mode: lora."
    ]
    # a Config built in code counts changed values
    cfg = Config()
    cfg.data.train_cache, cfg.train.max_steps, cfg.checkpoint.output_dir = "c", 10, "o"
    cfg.finetune.mode, cfg.finetune.pathways, cfg.model.dtype = "full", [], "float32"
    cfg.validate()
    cfg.finetune.lora_r = 8
    with pytest.raises(ConfigError, match="finetune.lora_r set in full mode"):
        cfg.validate()


def test_overrides_are_parsed_as_yaml():
    cfg = config_from_dict(
        MINIMAL,
        [
            "train.learning_rate=3e-4",
            "finetune.pathways=[text_attn, audio_mlp]",
            "checkpoint.save_total_limit=null",
            "train.max_grad_norm=0",
            "model.gradient_checkpointing=true",
            "data.system_prompt=Speak: slowly.",
        ],
    )
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.finetune.pathways == ["text_attn", "audio_mlp"]
    assert cfg.checkpoint.save_total_limit is None
    assert cfg.train.max_grad_norm == 0.0 and isinstance(cfg.train.max_grad_norm, float)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.system_prompt == "Speak: slowly."
    # overrides do not change the caller's mapping
    data = with_()
    config_from_dict(data, ["train.max_steps=5"])
    assert data["train"] == {"max_steps": 100}


def test_bad_overrides_are_listed_with_everything_else():
    assert problems(MINIMAL, ["bogus", "learning_rate=1", "train.learning_rate=[", "train.warmup_steps=many"]) == [
        "override 'bogus': expected section.key=value, e.g. train.learning_rate=3e-4.",
        "override 'learning_rate=1': expected section.key=value, e.g. train.learning_rate=3e-4.",
        "override 'train.learning_rate=[': the value is not valid YAML (while parsing a flow node). Quote it.",
        "train.warmup_steps: expected an integer, got 'many'.",
    ]


def test_yaml_1_1_exponent_floats_are_numbers(tmp_path):
    """PyYAML reads `3e-4` (no dot) as a string; a float setting accepts it as the number."""
    path = write(
        tmp_path,
        """\
        data: {train_cache: c}
        train: {max_steps: 10, learning_rate: 3e-4, weight_decay: 1E-2}
        checkpoint: {output_dir: o, min_free_gb: 5e-1}
        """,
    )
    cfg = load_config(path)
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.checkpoint.min_free_gb) == (3e-4, 1e-2, 0.5)
    assert problems(with_(train={"learning_rate": "fast"})) == ["train.learning_rate: expected a number, got 'fast'."]
    assert problems(with_(train={"max_steps": "1e3"})) == ["train.max_steps: expected an integer or null, got '1e3'."]


def test_alias_use_audio_out_self_attention():
    cfg = config_from_dict(with_(model={"use_audio_out_self_attention": True}))
    assert cfg.model.audio_self_attention is True
    assert "use_audio_out_self_attention" not in cfg.to_dict()["model"]
    cfg = config_from_dict(MINIMAL, ["model.use_audio_out_self_attention=true"])
    assert cfg.model.audio_self_attention is True
    assert problems(with_(model={"use_audio_out_self_attention": True, "audio_self_attention": False})) == [
        "model.audio_self_attention and model.use_audio_out_self_attention are the same setting: keep only "
        "model.audio_self_attention."
    ]


def test_a_rejected_value_is_not_reported_twice():
    # max_steps rejected -> its default (None) would also trip "max_steps or num_epochs is required"
    assert problems(with_(train={"max_steps": "ten"})) == ["train.max_steps: expected an integer or null, got 'ten'."]
    assert problems({**MINIMAL, "data": "cache/train"}) == [
        "data: expected a mapping of settings, got str 'cache/train'."
    ]
    assert problems(with_(model={"use_text_head": "no"})) == ["model.use_text_head: expected true or false, got 'no'."]


def test_types_are_checked():
    assert problems(
        with_(train={"adam_betas": [0.9, "x"]}, finetune={"lora_r": 4.0}, logging={"report_to": "none"})
    ) == [
        "train.adam_betas: expected a list of numbers, got [0.9, 'x'].",
        "finetune.lora_r: expected an integer, got 4.0.",
        "logging.report_to: expected a list of strings, got 'none'.",
    ]


def test_empty_sections_and_files(tmp_path):
    cfg = config_from_dict({**MINIMAL, "loss": None, "health": {}})
    assert cfg.loss.text_weight == 1.0
    assert problems({}) == [
        "data.train_cache is required: the folder written by `higgs-tune prepare`.",
        "train.max_steps or train.num_epochs is required.",
        "checkpoint.output_dir is required: the run folder for checkpoints, metrics and samples.",
    ]
    with pytest.raises(
        ConfigError,
        match=(
            r"^1 problem\(s\) in .*run.yaml:\n  - the config must be a mapping of sections \(model, finetune, "
            r"data, \.\.\.\), got list\.$"
        ),
    ):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml does not exist\."):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"config file .*run.yaml is not valid YAML: "):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match=r"config file .* is a folder: give the YAML file\."):
        load_config(tmp_path)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = config_from_dict(with_(train={"learning_rate": 3e-4}, finetune={"train_modules": ["audio_lm_head"]}))
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", ["lora-1gpu.yaml", "full-multigpu.yaml", "full-fsdp.yaml", "demo-tiny-cpu.yaml"])
def test_shipped_presets_validate(name, monkeypatch, tmp_path):
    for var in ("TINY_MODEL", "DEMO_CACHE", "DEMO_HELDOUT_CACHE", "OUTPUT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    load_config(REPO / "configs" / name)


def test_placeholders_filled_from_environment(monkeypatch, tmp_path):
    for var in ("TINY_MODEL", "DEMO_CACHE", "DEMO_HELDOUT_CACHE", "OUTPUT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TINY_MODEL", "/models/tiny")
    monkeypatch.setenv("DEMO_CACHE", "/c/train")
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "demo-tiny-cpu.yaml")
    # the two unset placeholders are named, each once, with the fix; nothing else is reported
    assert e.value.problems == [
        f"${{{name}}} has no value: set the environment variable {name} (e.g. `{name}=... higgs-tune train ...`) "
        "or write the value into the config."
        for name in ("DEMO_HELDOUT_CACHE", "OUTPUT_DIR")
    ]
    monkeypatch.setenv("DEMO_HELDOUT_CACHE", "/c/heldout")
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "run"))
    cfg = load_config(REPO / "configs" / "demo-tiny-cpu.yaml")
    assert (cfg.model.name_or_path, cfg.data.train_cache, cfg.data.eval_cache, cfg.checkpoint.output_dir) == (
        "/models/tiny",
        "/c/train",
        "/c/heldout",
        str(tmp_path / "run"),
    )


def test_help_lists_every_setting():
    text = config_help()
    cfg = Config().to_dict()
    for section, values in cfg.items():
        assert f"{section}:" in text.splitlines()
        for key in values:
            assert any(line.startswith(f"  {key} (") for line in text.splitlines()), key
    assert "  save_steps (an integer, default 500): Save a checkpoint every N optimizer steps." in text
    assert text.splitlines()[-1] == "aliases: model.use_audio_out_self_attention -> model.audio_self_attention"
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
)
def test_every_preset_saved_by_config_save_loads_back_equal(name, tmp_path, monkeypatch):
    """A run's config.yaml is written by Config.save (every field, defaults included): it must load
    back as the same config, in full mode too (where the LoRA defaults are written but unused)."""
    for var in ("TINY_MODEL", "OUTPUT_DIR", "DEMO_CACHE", "DEMO_HELDOUT_CACHE"):  # demo-tiny-cpu's placeholders
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_full_mode_default_lora_values_are_not_reported_other_values_are():
    full = {"mode": "full", "pathways": [], "lora_r": 16, "use_dora": False}
    assert config_from_dict(with_(finetune=full, model={"dtype": "float32"})).finetune.lora_r == 16
    assert problems(with_(finetune={**full, "lora_r": 8}, model={"dtype": "float32"})) == [
        "finetune.lora_r set in full mode: LoRA options have no effect there. Remove them or use mode: lora."
    ]
