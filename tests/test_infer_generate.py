"""Voice-cloning generation on the tiny stack with a tiny LoRA adapter, API and CLI.

The adapter is a fresh PEFT LoRA (text_attn, text_mlp, audio_mlp; r=4) with random non-zero B
matrices and a perturbed audio head (`make_tiny_adapter`), saved by `save_trainable` exactly
as training saves one: base + adapter gives different codes than the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from higgs_tune.app.cli import main
from higgs_tune.app.requests import pick_speaker_reference, read_batch_file
from higgs_tune.data.layout import Conversation, build_prompt
from higgs_tune.errors import DataError, ModelLoadError
from higgs_tune.infer.generate import (
    GenerationError,
    GenerationRequest,
    SamplingOptions,
    encode_reference,
    generate_speech,
    write_wav,
)
from higgs_tune.infer.loading import check_adapter_fits, load_inference_stack
from higgs_tune.tiny.eval_models import make_tiny_adapter

DEMO = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
REF_AUDIO = DEMO / "audio" / "en_a_000.flac"
REF_TEXT = "The morning train was right on time."
HOP = 960
K = 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    return make_tiny_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "adapter", seed=0)


@pytest.fixture(scope="module")
def stack(tiny_dir, adapter_dir):
    return load_inference_stack(tiny_dir, adapter_dir, device="cpu")


@pytest.fixture(scope="module")
def ref_codes(stack):
    return encode_reference(stack.processor, REF_AUDIO)


def _clone(text, ref_codes, **kw):
    return GenerationRequest(text=text, ref_text=REF_TEXT, ref_codes=ref_codes, **kw)


# ----------------------------------------------------------------------------- API
def test_reference_codes_match_the_processor(stack, ref_codes):
    """encode_reference gives the codes the transformers processor computes for the same clip."""
    from higgs_tune.infer.generate import load_codec_audio

    wave = load_codec_audio(REF_AUDIO, 24000)
    with torch.inference_mode():
        expected = stack.processor.audio_tokenizer.encode(torch.from_numpy(wave)[None, None]).audio_codes[0]
    assert ref_codes.dtype == torch.long
    assert ref_codes.shape == (K, expected.shape[1])
    assert torch.equal(ref_codes, expected)


def test_generate_writes_a_valid_wav_of_the_generated_length(stack, ref_codes, tmp_path):
    opts = SamplingOptions(temperature=0.7, seed=0, max_new_tokens=40)
    [res] = generate_speech(
        stack.model, stack.processor, stack.tokens, [_clone("Good morning to you all.", ref_codes, id="a")], opts
    )
    assert res.id == "a"
    assert res.sample_rate == 24000
    assert res.num_frames > 0
    assert res.codes.shape == (K, res.num_frames)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 1023
    assert res.wav.dtype == np.float32 and res.wav.shape == (res.num_frames * HOP,)
    assert res.duration_s == pytest.approx(res.num_frames / 25)
    # the prompt is build_prompt's, token for token
    conv = Conversation.voice_clone("Good morning to you all.", REF_TEXT)
    assert (
        res.prompt_tokens
        == build_prompt(conv, stack.processor.tokenizer, stack.tokens, ref_codes=ref_codes)["input_ids"].shape[1]
    )

    path = write_wav(tmp_path / "out" / "a.wav", res.wav, res.sample_rate)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.format, info.subtype) == (24000, 1, "WAV", "PCM_16")
    assert info.frames == res.num_frames * HOP
    data, _ = sf.read(str(path), dtype="float32")
    assert np.abs(data - np.clip(res.wav, -1, 1)).max() <= 1 / 32767 + 1e-6


def test_stopped_flag_and_column_accounting(stack):
    """A stopped output ended with the all-EOS column within the limit; one that did not stop used
    all max_new_tokens. A trained model closes codebook k one column after codebook k-1 (exactly
    T + K + 1 columns); a random one may close a later codebook first, which ends the frames earlier."""
    opts = SamplingOptions(temperature=1.0, top_p=None, top_k=None, seed=0, max_new_tokens=40)
    requests = [GenerationRequest(text="Short.", id=f"r{i}") for i in range(8)]
    results = generate_speech(stack.model, stack.processor, stack.tokens, requests, opts)
    assert {r.stopped for r in results} == {True, False}  # the seeds give both outcomes
    for r in results:
        assert r.max_new_tokens == 40
        if r.stopped:
            assert r.num_frames <= r.num_columns - (K + 1)
            assert r.num_columns <= 40
        else:
            assert r.num_columns == 40
            assert r.num_frames <= 40 - K
        assert r.wav.shape == (r.num_frames * HOP,)


def test_seeded_generation_is_reproducible_and_the_adapter_matters(stack, ref_codes):
    opts = SamplingOptions(temperature=0.8, seed=5, max_new_tokens=30)
    reqs = [_clone("The library opens early.", ref_codes)]
    a = generate_speech(stack.model, stack.processor, stack.tokens, reqs, opts)[0]
    b = generate_speech(stack.model, stack.processor, stack.tokens, reqs, opts)[0]
    assert torch.equal(a.codes, b.codes)
    greedy = SamplingOptions(temperature=0, ras_win_len=0, max_new_tokens=30)
    with_adapter = generate_speech(stack.model, stack.processor, stack.tokens, reqs, greedy)[0]
    with stack.model.disable_adapter():
        base = generate_speech(stack.model, stack.processor, stack.tokens, reqs, greedy)[0]
    assert not (base.codes.shape == with_adapter.codes.shape and torch.equal(base.codes, with_adapter.codes))


def test_caller_state_is_restored(stack):
    """The training loop calls generate_speech mid-run: its train mode and RNG stream must survive."""
    stack.model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate_speech(
        stack.model,
        stack.processor,
        stack.tokens,
        [GenerationRequest(text="Hi.")],
        SamplingOptions(max_new_tokens=12, seed=0),
    )
    assert stack.model.training
    assert torch.equal(torch.get_rng_state(), before)
    stack.model.eval()
    # without a seed the global RNG is used (and advances): two calls draw differently
    unseeded = SamplingOptions(temperature=1.0, max_new_tokens=12, seed=None)
    a = generate_speech(stack.model, stack.processor, stack.tokens, [GenerationRequest(text="Hi.")], unseeded)[0]
    assert not torch.equal(torch.get_rng_state(), before)
    b = generate_speech(stack.model, stack.processor, stack.tokens, [GenerationRequest(text="Hi.")], unseeded)[0]
    assert not (a.codes.shape == b.codes.shape and torch.equal(a.codes, b.codes))


def test_sampling_options_go_onto_generation_config(stack):
    base = stack.model.generation_config
    cfg = SamplingOptions(
        temperature=0.6, top_p=0.9, top_k=20, ras_win_len=9, ras_win_max_num_repeat=3
    ).generation_config(base, 77)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (True, 0.6, 0.9, 20, 77)
    assert (cfg.ras_win_len, cfg.ras_win_max_num_repeat) == (9, 3)
    greedy = SamplingOptions(temperature=0, ras_win_len=0).generation_config(base, 10)
    assert (greedy.do_sample, greedy.temperature, greedy.top_p, greedy.top_k) == (False, None, None, None)
    assert (greedy.ras_win_len, greedy.ras_win_max_num_repeat) == (None, None)
    assert (base.ras_win_len, base.ras_win_max_num_repeat) == (7, 2)  # the model's own config is untouched
    with pytest.raises(GenerationError, match="temperature must be >= 0.*top_p must be in"):
        SamplingOptions(temperature=-1, top_p=1.5).validate()


def _tts_prompt_len(stack, text):
    return build_prompt(Conversation.tts(text), stack.processor.tokenizer, stack.tokens)["input_ids"].shape[1]


def test_text_longer_than_the_context_is_an_error_and_near_it_caps_the_length(stack):
    context = stack.model.config.max_position_embeddings  # 4096 in the tiny stack
    per_word = _tts_prompt_len(stack, "hello " * 101) - _tts_prompt_len(stack, "hello " * 100)
    base = _tts_prompt_len(stack, "hello " * 100) - 100 * per_word
    words = (context - 20 - base) // per_word
    text = "hello " * words
    prompt_len = _tts_prompt_len(stack, text)
    assert context - 20 - per_word < prompt_len <= context - 20
    [res] = generate_speech(
        stack.model,
        stack.processor,
        stack.tokens,
        [GenerationRequest(text=text)],
        SamplingOptions(max_new_tokens=100, seed=0),
    )
    assert res.max_new_tokens == context - prompt_len  # capped by the context, not 100
    assert res.num_columns <= context - prompt_len

    too_long = "hello " * (words + 100)
    with pytest.raises(
        GenerationError, match=r"the prompt is \d+ tokens .*max_position_embeddings\) is 4096.*Shorten the text"
    ):
        generate_speech(
            stack.model, stack.processor, stack.tokens, [GenerationRequest(text=too_long, id="long")], SamplingOptions()
        )


# ----------------------------------------------------------------------------- bad input
def test_missing_reference_audio(stack, tmp_path):
    with pytest.raises(DataError, match=r"reference audio .*nope\.wav: file not found"):
        encode_reference(stack.processor, tmp_path / "nope.wav")
    result = CliRunner().invoke(
        main, ["generate", "Hi.", "--model", "unused", "--ref-audio", str(tmp_path / "nope.wav"), "--ref-text", "x"]
    )
    assert result.exit_code == 2
    assert f"reference audio {tmp_path / 'nope.wav'} not found" in result.output


def test_adapter_folder_problems(tiny_dir, tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"adapter folder .*missing does not exist\. Pass a run's checkpoint-N/ or final/ folder"
    ):
        load_inference_stack(tiny_dir, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"holds neither adapter_config.json \(LoRA adapter\) nor config.json"):
        load_inference_stack(tiny_dir, tmp_path / "empty")
    with pytest.raises(ModelLoadError, match=r"no base model: pass --model"):
        load_inference_stack(None, None)


def test_adapter_of_another_base_model_is_refused(tiny_dir, tmp_path):
    """An adapter trained on a model with another hidden size: named shapes, the recorded base, the fix."""
    from higgs_tune.config import FinetuneConfig
    from higgs_tune.model.lora import apply_finetuning, save_trainable
    from higgs_tune.tiny import TinySpec, build_model, build_text_tokenizer

    spec = TinySpec(hidden_size=32, intermediate_size=64)
    other = build_model(spec, build_text_tokenizer(spec))
    other.name_or_path = "/models/other-base"  # what from_pretrained sets and PEFT records
    adapter = save_trainable(
        apply_finetuning(other, FinetuneConfig(pathways=["text_attn"], lora_r=4)), tmp_path / "other"
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/other-base"
    with pytest.raises(ModelLoadError) as err:
        load_inference_stack(tiny_dir, adapter, device="cpu")
    message = str(err.value)
    assert f"the adapter {adapter} does not fit the base model {tiny_dir}" in message
    assert (
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight (4, 32) (base "
        "model.layers.0.self_attn.k_proj is 32x64)" in message
    )
    assert "It was trained on '/models/other-base'" in message and "--model" in message


def test_adapter_recorded_for_another_path_but_fitting_is_a_note(tiny_dir, adapter_dir):
    from higgs_tune.config import ModelConfig
    from higgs_tune.model.load import load_model

    base = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32", use_text_head=False))
    assert check_adapter_fits(base, adapter_dir, str(tiny_dir)) == []
    [note] = check_adapter_fits(base, adapter_dir, "/elsewhere/tiny-copy")
    assert note.startswith(
        f"the adapter records base model '{tiny_dir}', you loaded '/elsewhere/tiny-copy'; the shapes fit"
    )


def test_batch_file_problems_are_listed_together(tmp_path):
    (tmp_path / "ref.wav").write_bytes(REF_AUDIO.read_bytes())
    rows = [
        {"text": "One.", "ref_audio": "ref.wav", "ref_text": "Ref.", "out": "a.wav"},
        {"text": "", "out": "b.wav"},
        {"text": "Three.", "ref_audio": "missing.wav", "ref_text": "x", "out": "c.wav"},
        {"text": "Four.", "ref_audio": "ref.wav", "out": "d.wav", "speaker": "x"},
        {"text": "Five.", "out": "a.wav"},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_batch_file(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"batch file {path}: 6 problem(s):"
    assert lines[1:7] == [
        f"  - {path}:2: 'text' is missing or empty",
        f"  - {path}:3: ref_audio 'missing.wav' not found (looked for {tmp_path / 'missing.wav'})",
        f"  - {path}:4: unknown key(s) speaker (known: text, ref_audio, ref_text, out, id, scene)",
        f"  - {path}:4: ref_audio and ref_text go together (voice cloning needs both; plain TTS neither)",
        f"  - {path}:5: out 'a.wav' is also the output of line 1",
        f"  - {path}:6: not valid JSON (Expecting value at column 1)",
    ]


def test_speaker_reference_is_chosen_deterministically():
    audio, text, ident = pick_speaker_reference(DEMO / "manifest.jsonl", "en_b")
    assert (ident, audio, text) == (
        "en_b_000",
        DEMO / "audio" / "en_b_000.flac",
        json.loads(next(line for line in (DEMO / "manifest.jsonl").read_text().splitlines() if '"en_b_000"' in line))[
            "text"
        ],
    )
    with pytest.raises(DataError, match=r"speaker 'zz' has no clip in .*speakers there: ar_a, en_a, en_b"):
        pick_speaker_reference(DEMO / "manifest.jsonl", "zz")


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_speaker_and_batch(tiny_dir, adapter_dir, tmp_path):
    runner = CliRunner()
    common = ["--model", str(tiny_dir), "--adapter", str(adapter_dir), "--device", "cpu", "--max-new-tokens", "30"]
    result = runner.invoke(
        main,
        [
            "generate",
            "Hello there.",
            "See you soon.",
            "--speaker",
            "en_a",
            "--manifest",
            str(DEMO / "manifest.jsonl"),
            "--out-dir",
            str(tmp_path / "gen"),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"reference for speaker en_a: en_a_000 ({DEMO / 'audio' / 'en_a_000.flac'})" in result.output
    outs = [tmp_path / "gen" / "out-01-hello-there.wav", tmp_path / "gen" / "out-02-see-you-soon.wav"]
    for out in outs:
        info = sf.info(str(out))
        assert info.samplerate == 24000 and info.frames % HOP == 0 and info.frames > 0
        # (a progress bar of transformers may precede the line on the same console line)
        line = result.output.split(f"{out}: ", 1)[1].splitlines()[0]
        assert (
            line.endswith(", ended by the model")
            or ", DID NOT STOP: hit the limit of 30 audio columns without an end of audio" in line
        )

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ref.flac").write_bytes(REF_AUDIO.read_bytes())
    batch = tmp_path / "b" / "requests.jsonl"
    batch.write_text(
        json.dumps({"text": "Cloned voice.", "ref_audio": "ref.flac", "ref_text": REF_TEXT, "out": "wav/one.wav"})
        + "\n"
        + json.dumps({"text": "نص عربي قصير.", "out": "wav/two.wav"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    result = runner.invoke(main, ["generate", "--batch", str(batch), *common])
    assert result.exit_code == 0, result.output
    assert sf.info(str(tmp_path / "b" / "wav" / "one.wav")).frames > 0
    assert sf.info(str(tmp_path / "b" / "wav" / "two.wav")).frames > 0


def test_cli_generate_usage_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--model", "x"])
    assert result.exit_code == 2 and "give one or more TEXTS, or --batch FILE.jsonl." in result.output
    result = runner.invoke(main, ["generate", "Hi", "--ref-audio", "a.wav"])
    assert result.exit_code == 2 and "--ref-audio and --ref-text go together" in result.output
    result = runner.invoke(main, ["generate", "Hi", "--speaker", "en_a"])
    assert result.exit_code == 2 and "--speaker needs --manifest" in result.output
    result = runner.invoke(main, ["generate", "Hi", "--temperature", "-1"])
    assert (
        result.exit_code == 2
        and "bad sampling options: temperature must be >= 0 (0 = greedy), got -1.0." in result.output
    )
