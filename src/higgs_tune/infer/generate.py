"""Voice-cloning generation with a base model + adapter (or a merged model): codes -> WAV.

Python API (also called by the training loop every `train.sample_steps`):

    stack = load_inference_stack("models/higgs", adapter="runs/x/final")   # model, processor, tokens
    ref = encode_reference(stack.processor, "ref.wav")                       # (K, T) codes
    results = generate_speech(stack.model, stack.processor, stack.tokens,
                              [GenerationRequest(text="Hello.", ref_text="...", ref_codes=ref)],
                              SamplingOptions(temperature=0.7, seed=0))
    write_wav("out.wav", results[0].wav, stack.sample_rate)

Each prompt is built by `higgs_tune.data.layout.build_prompt`, the function that builds the
training samples, so inference sees exactly the layout training used. Requests run one at a
time (a batch of one: no padding between prompts of different lengths can change a result),
each under its own seed (`seed + index`) inside a forked RNG, so a request's output does not
depend on the others and the caller's RNG streams (training!) are left untouched
(`seed=None`: the global RNG is used and advances, as with any sampling code).

What one generate step is: one audio *column* of the delay pattern (all K codebooks). A clip
of T frames takes T + K + 1 columns (a BOS column, the T frames spread over the K-step
delay, and the closing EOS column), so `max_new_tokens` counts columns. A generation that
used them all without producing the all-EOS column did not stop by itself:
`GenerationResult.stopped` is False and the CLI says so for that output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from higgs_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Conversation, SpecialTokens, build_prompt, generated_codes
from higgs_tune.errors import DataError, HiggsTuneError, ModelLoadError

logger = logging.getLogger(__name__)

REQUEST_KEYS = ("text", "ref_audio", "ref_text", "out", "id", "scene")


class GenerationError(HiggsTuneError):
    """A request that cannot be generated (prompt longer than the model's context, bad options)."""


# ----------------------------------------------------------------------------- options and results
@dataclass
class SamplingOptions:
    """How tokens are drawn. temperature 0 = greedy (argmax per codebook)."""

    temperature: float = 0.7
    top_p: float | None = 0.95  # nucleus sampling; None or 1.0 = off
    top_k: int | None = 50  # None or 0 = off
    # Repetition-aware sampling (set on generation_config; the model's generate reads it there):
    # when a code was drawn >= ras_win_max_num_repeat times in the last ras_win_len columns,
    # it is re-drawn from the untempered distribution. None or 0 = off.
    ras_win_len: int | None = 7
    ras_win_max_num_repeat: int = 2
    max_new_tokens: int = 1024  # generated audio columns (T frames need T + K + 1); 25 per second at 25 fps
    seed: int | None = 0  # request i runs under seed + i; None = the global RNG as it is

    def validate(self) -> "SamplingOptions":
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.ras_win_len is not None and self.ras_win_len < 0:
            problems.append(f"ras_win_len must be >= 0 (0 = off), got {self.ras_win_len}")
        if self.ras_win_max_num_repeat < 1:
            problems.append(f"ras_win_max_num_repeat must be >= 1, got {self.ras_win_max_num_repeat}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise GenerationError("bad sampling options: " + "; ".join(problems) + ".")
        return self

    def generation_config(self, base, max_new_tokens: int):
        """A copy of the model's GenerationConfig with these options applied."""
        cfg = copy.deepcopy(base)
        greedy = self.temperature == 0
        cfg.do_sample = not greedy
        cfg.max_new_tokens = max_new_tokens
        cfg.max_length = None
        cfg.return_dict_in_generate = True  # audio_sequences come with the dict output only
        # Unset what does not apply, so transformers does not warn about ignored settings.
        cfg.temperature = None if greedy else self.temperature
        cfg.top_p = None if greedy or not self.top_p or self.top_p == 1.0 else self.top_p
        cfg.top_k = None if greedy or not self.top_k else self.top_k
        ras = bool(self.ras_win_len)
        cfg.ras_win_len = self.ras_win_len if ras else None
        cfg.ras_win_max_num_repeat = self.ras_win_max_num_repeat if ras else None
        return cfg

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationRequest:
    """One text to speak. Voice cloning when `ref_codes` (K, T) and `ref_text` are given, else plain TTS."""

    text: str
    ref_text: str | None = None
    ref_codes: torch.Tensor | None = None  # (K, T) long, values 0..codebook_size-1
    scene: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    id: str = ""

    def conversation(self) -> Conversation:
        if (self.ref_codes is None) != (self.ref_text is None):
            given = "ref_codes" if self.ref_codes is not None else "ref_text"
            raise GenerationError(f"request {self.id or self.text[:40]!r}: {given} without the other; voice cloning needs the reference codes and their transcript.")
        if self.ref_codes is None:
            return Conversation.tts(self.text, system_prompt=self.system_prompt, scene=self.scene)
        return Conversation.voice_clone(self.text, self.ref_text, system_prompt=self.system_prompt, scene=self.scene)


@dataclass
class GenerationResult:
    codes: torch.Tensor  # (K, T) long, the generated frames (delay pattern reverted, BOS/EOS removed)
    wav: np.ndarray  # (T * hop,) float32 at sample_rate
    stopped: bool  # True: the model closed the audio itself (all-EOS column) within the limit
    num_frames: int  # T
    sample_rate: int = 24000
    id: str = ""
    prompt_tokens: int = 0
    num_columns: int = 0  # audio columns generated (T + K + 1 when stopped)
    max_new_tokens: int = 0  # the limit applied (may be below the option: the context is finite)

    @property
    def duration_s(self) -> float:
        return len(self.wav) / self.sample_rate


# ----------------------------------------------------------------------------- generation
def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate_speech(
    model,
    processor,
    tokens: SpecialTokens,
    requests: Sequence[GenerationRequest],
    options: SamplingOptions | None = None,
) -> list[GenerationResult]:
    """Generate each request -> GenerationResult(codes (K, T), wav, stopped, num_frames).

    `model`: HiggsAudioV2ForConditionalGeneration or a PeftModel around one (not a DDP
    wrapper: pass the unwrapped module). Its train/eval mode is restored afterwards.
    `processor`: HiggsAudioV2Processor (text tokenizer + audio tokenizer for decoding).
    Raises GenerationError when a prompt does not fit the model's context
    (`max_position_embeddings`) with room for at least one frame.
    """
    options = (options or SamplingOptions()).validate()
    context = model.config.max_position_embeddings  # a PeftModel forwards .config to the wrapped model
    min_columns = tokens.num_columns(1)  # BOS column + one frame through the delay + EOS column
    device = _device(model)
    codec = processor.audio_tokenizer
    codec_device = next(codec.parameters()).device
    sample_rate = codec.config.sample_rate
    was_training = model.training
    model.eval()
    results = []
    try:
        for i, req in enumerate(requests):
            name = req.id or f"request {i + 1}"
            prompt = build_prompt(req.conversation(), processor.tokenizer, tokens, ref_codes=req.ref_codes, sample_id=name)
            prompt_len = prompt["input_ids"].shape[1]
            room = context - prompt_len
            if room < min_columns:
                ref_cols = prompt["audio_input_ids"].shape[1] if "audio_input_ids" in prompt else 0
                raise GenerationError(
                    f"{name}: the prompt is {prompt_len} tokens ({ref_cols} of them reference audio, the rest text), "
                    f"but the model's context (max_position_embeddings) is {context} and one frame of audio needs "
                    f"{min_columns} more. Shorten the text (split it into sentences) or use a shorter reference clip."
                )
            limit = min(options.max_new_tokens, room)
            if limit < options.max_new_tokens:
                logger.info("%s: max_new_tokens %d capped to %d by the model's context of %d tokens", name, options.max_new_tokens, limit, context)
            gen_config = options.generation_config(model.generation_config, limit)
            prompt = {k: v.to(device) for k, v in prompt.items()}
            prompt_columns = prompt["audio_input_ids"].shape[1] if "audio_input_ids" in prompt else 0
            # A seeded request runs in a forked RNG (the caller's streams are untouched); without a
            # seed it draws from the global RNG like any other sampling code.
            seeded = options.seed is not None
            rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seeded else contextlib.nullcontext()
            with rng, torch.inference_mode():
                if seeded:
                    torch.manual_seed(options.seed + i)
                out = model.generate(**prompt, generation_config=gen_config)
            audio = out.audio_sequences[0].cpu()  # (N_prompt + N_generated, K)
            generated = audio[prompt_columns:]
            stopped = bool(generated.shape[0] > 0 and (generated[-1] == tokens.stream_eos).all())
            # A stream BOS the model draws after the forced opening has no codec meaning; like
            # HiggsAudioV2Processor.batch_decode, clip it into the code range.
            codes = generated_codes(audio, prompt_columns, tokens).clamp(0, tokens.stream_bos - 1)
            wav = decode_codes(codec, codes, codec_device)
            results.append(
                GenerationResult(
                    codes=codes,
                    wav=wav,
                    stopped=stopped,
                    num_frames=int(codes.shape[1]),
                    sample_rate=sample_rate,
                    id=req.id,
                    prompt_tokens=prompt_len,
                    num_columns=int(generated.shape[0]),
                    max_new_tokens=limit,
                )
            )
    finally:
        model.train(was_training)
    return results


def decode_codes(codec, codes: torch.Tensor, device=None) -> np.ndarray:
    """(K, T) codes -> (T * hop,) float32 waveform with the audio tokenizer; T = 0 gives an empty array."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    device = device if device is not None else next(codec.parameters()).device
    with torch.inference_mode():
        audio = codec.decode(codes[None].to(device), return_dict=False)  # (1, 1, N)
    return audio.reshape(-1).float().cpu().numpy()


# ----------------------------------------------------------------------------- audio files
def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM mono WAV; samples are clipped to [-1, 1]. Parent folders are created."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
    sf.write(str(path), data, int(sample_rate), subtype="PCM_16", format="WAV")
    return path


def load_codec_audio(path: str | Path, sample_rate: int, what: str = "reference audio") -> np.ndarray:
    """Read any soundfile-readable clip -> (N,) float32 mono at `sample_rate` (data.audio's path)."""
    from higgs_tune.data.audio import AudioReadError, read_audio, to_codec_input

    path = Path(path)
    try:
        samples, sr = read_audio(path)
    except AudioReadError as e:
        fix = "check the path (relative paths are relative to the current folder, or to the JSONL file in --batch)" if str(e) == "file not found" else "re-export it as WAV or FLAC"
        raise DataError(f"{what} {path}: {e}. Fix: {fix}.") from None
    if samples.shape[0] == 0:
        raise DataError(f"{what} {path} has no samples. Fix: use a clip of speech (a few seconds).")
    return to_codec_input(samples, sr, sample_rate)


def encode_reference(processor, path: str | Path) -> torch.Tensor:
    """A reference clip -> (K, T) long codes, encoded alone (as the processor does at inference)."""
    from higgs_tune.data.prepare import encode_batch

    codec = processor.audio_tokenizer
    wave = load_codec_audio(path, codec.config.sample_rate)
    return torch.from_numpy(encode_batch(codec, [wave])[0].astype(np.int64))


# ----------------------------------------------------------------------------- loading
@dataclass
class InferenceStack:
    model: object  # HiggsAudioV2ForConditionalGeneration or PeftModel
    processor: object  # HiggsAudioV2Processor
    tokens: SpecialTokens
    base: str  # the base model folder / id
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)

    @property
    def sample_rate(self) -> int:
        return self.processor.audio_tokenizer.config.sample_rate


def _adapter_base_from_checkpoint(adapter: Path) -> str | None:
    """model.name_or_path from a higgs-tune checkpoint's config.yaml beside the adapter, if any."""
    import yaml

    path = adapter / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelLoadError(f"{path} is not valid YAML ({e}). Pass the base model with --model.") from None
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("name_or_path") if isinstance(model, dict) else None


def _same_source(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_fits(base_model, adapter_dir: Path, base_name: str) -> list[str]:
    """Compare the adapter's tensors with the base model's module shapes before loading.

    Raises ModelLoadError naming the first tensors that do not fit (an adapter trained on
    another base model). Returns notes (e.g. the recorded base differs but the shapes fit).
    """
    from safetensors import safe_open

    cfg_path = adapter_dir / "adapter_config.json"
    try:
        adapter_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e}). Re-save the adapter.") from None
    recorded = adapter_cfg.get("base_model_name_or_path")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors. Point --adapter at a complete adapter folder (checkpoint-N/ or final/ of a run).")

    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters())
    # audio self-attention blocks are created from the layer's own shapes when the adapter needs them
    alias = {".audio_attn.": ".self_attn.", ".audio_post_audio_attn_layer_norm": ".audio_input_layernorm"}
    wrong, unknown = [], []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for a, b in alias.items():
                name = name.replace(a, b)
            if ".lora_A." in name or ".lora_B." in name:
                module_name = name.split(".lora_")[0]
                module = modules.get(module_name)
                if module is None or not hasattr(module, "in_features"):
                    unknown.append(key)
                    continue
                want_dim = module.in_features if ".lora_A." in name else module.out_features
                got_dim = shape[1] if ".lora_A." in name else shape[0]
                if got_dim != want_dim:
                    wrong.append(f"{key} {shape} (base {module_name} is {module.out_features}x{module.in_features})")
            elif ".lora_" in name:
                continue  # DoRA magnitudes and other LoRA variants: checked by PEFT itself
            else:
                base_param = params.get(name.replace(".modules_to_save.default.", "."))
                if base_param is None:
                    unknown.append(key)
                elif tuple(base_param.shape) != shape:
                    wrong.append(f"{key} {shape} (base has {tuple(base_param.shape)})")
    if wrong or unknown:
        details = "; ".join(wrong[:4] + [f"{k} (no such module in the base model)" for k in unknown[:4]])
        more = len(wrong) + len(unknown) - min(len(wrong), 4) - min(len(unknown), 4)
        raise ModelLoadError(
            f"the adapter {adapter_dir} does not fit the base model {base_name}: {details}"
            f"{f' (and {more} more)' if more > 0 else ''}. It was trained on "
            f"{recorded!r} (adapter_config.json base_model_name_or_path). Load it onto that base model (--model)."
        )
    notes = []
    if recorded and not _same_source(recorded, base_name):
        notes.append(
            f"the adapter records base model {recorded!r}, you loaded {base_name!r}; the shapes fit, so it is used, "
            "but if these are different models the output will be wrong."
        )
    return notes


def _adapter_needs_text_head(adapter: Path) -> bool:
    """True when the trained weights include the text head (LoRA modules_to_save, or full weights)."""
    from higgs_tune.model.load import TEXT_HEAD_KEY, checkpoint_keys

    cfg_path = adapter / "adapter_config.json"
    if cfg_path.is_file():
        to_save = json.loads(cfg_path.read_text(encoding="utf-8")).get("modules_to_save") or []
        return any("text_lm_head" in m for m in to_save)
    return TEXT_HEAD_KEY in checkpoint_keys(adapter)


def load_inference_stack(
    model: str | Path | None,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    audio_tokenizer: str | Path | None = None,
    use_text_head: bool | None = None,
) -> InferenceStack:
    """Base model (+ adapter folder written by training: LoRA or full weights) ready to generate.

    `model` may be None when `adapter` is a higgs-tune checkpoint folder: its config.yaml
    names the base model. `dtype` "auto" = bfloat16 on CUDA, float32 otherwise.
    `use_text_head` None: only when the adapter trained it (generation never uses it).
    """
    from higgs_tune.config import ModelConfig
    from higgs_tune.model.audio_attention import AUDIO_ATTN_KEY_PARTS
    from higgs_tune.model.load import check_higgs_checkpoint, load_model, load_processor, resolve_checkpoint
    from higgs_tune.model.lora import load_trainable

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ModelLoadError(f"adapter folder {adapter_dir} does not exist. Pass a run's checkpoint-N/ or final/ folder (or a PEFT adapter folder).")
        if not (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").is_file():
            raise ModelLoadError(
                f"{adapter_dir} holds neither adapter_config.json (LoRA adapter) nor config.json (full fine-tune weights). "
                "Pass a run's checkpoint-N/ or final/ folder."
            )
    if model is None:
        recorded = _adapter_base_from_checkpoint(adapter_dir) if adapter_dir is not None else None
        if recorded is None:
            raise ModelLoadError("no base model: pass --model (the base model folder or Hub id, or a merged export).")
        model = recorded
    model = str(model)
    folder = resolve_checkpoint(model)
    _, keys = check_higgs_checkpoint(folder)
    has_audio_attn = any(any(p in k for p in AUDIO_ATTN_KEY_PARTS) for k in keys)
    if use_text_head is None:
        use_text_head = adapter_dir is not None and _adapter_needs_text_head(adapter_dir)
    cfg = ModelConfig(
        name_or_path=model,
        audio_tokenizer=str(audio_tokenizer) if audio_tokenizer is not None else None,
        dtype=dtype,
        use_text_head=use_text_head,
        audio_self_attention=has_audio_attn,
    )
    net = load_model(cfg)
    notes: list[str] = []
    if adapter_dir is not None:
        if (adapter_dir / "adapter_config.json").is_file():
            notes += check_adapter_fits(net, adapter_dir, model)
        try:
            net = load_trainable(net, adapter_dir)
        except RuntimeError as e:  # torch's load_state_dict size mismatch, for shapes the pre-check cannot see
            raise ModelLoadError(f"the weights in {adapter_dir} do not fit the base model {model}: {str(e).splitlines()[0]}. Load them onto the base model they were trained from (--model).") from e
    net = net.to(device).eval()
    processor = load_processor(folder, audio_tokenizer)
    processor.audio_tokenizer.to(device)
    tokens = SpecialTokens.from_tokenizer(processor.tokenizer, net.config)
    return InferenceStack(net, processor, tokens, base=model, adapter=str(adapter_dir) if adapter_dir else None, notes=notes)


# ----------------------------------------------------------------------------- request files
@dataclass
class FileRequest:
    """A request read from the command line or a JSON Lines batch file (paths resolved)."""

    text: str
    out: Path
    ref_audio: Path | None = None
    ref_text: str | None = None
    id: str = ""
    scene: str | None = None


def read_batch_file(path: str | Path) -> list[FileRequest]:
    """JSON Lines rows {text, ref_audio, ref_text, out [, id, scene]}; paths relative to the file's folder.

    Every row is checked first; one DataError lists all problems (file:line, field, fix).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"batch file {path} not found. Fix: give a JSON Lines file with one {{text, ref_audio, ref_text, out}} object per line.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"batch file {path} is not UTF-8 ({e.reason} at byte {e.start}). Fix: save it as UTF-8.") from None
    root = path.parent
    problems: list[str] = []
    out: list[FileRequest] = []
    outs: dict[Path, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: a JSON {type(row).__name__}, expected an object")
            continue
        unknown = sorted(set(row) - set(REQUEST_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(REQUEST_KEYS)})")
        bad = [k for k in REQUEST_KEYS if k in row and row[k] is not None and not isinstance(row[k], str)]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} must be strings")
            continue
        for key in ("text", "out"):
            if not (row.get(key) or "").strip():
                problems.append(f"{where}: {key!r} is missing or empty")
        if bool(row.get("ref_audio")) != bool(row.get("ref_text")):
            problems.append(f"{where}: ref_audio and ref_text go together (voice cloning needs both; plain TTS neither)")
        ref_audio = root / row["ref_audio"] if row.get("ref_audio") else None
        if ref_audio is not None and not ref_audio.is_file():
            problems.append(f"{where}: ref_audio {row['ref_audio']!r} not found (looked for {ref_audio})")
        if not (row.get("text") or "").strip() or not (row.get("out") or "").strip():
            continue
        target = root / row["out"]
        if target in outs:
            problems.append(f"{where}: out {row['out']!r} is also the output of line {outs[target]}")
        outs[target] = number
        out.append(FileRequest(text=row["text"], out=target, ref_audio=ref_audio, ref_text=row.get("ref_text"), id=row.get("id") or target.stem, scene=row.get("scene")))
    if not problems and not out:
        problems.append(f"{path}: no rows")
    if problems:
        raise DataError(f"batch file {path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems) + "\nFix the rows above.")
    return out


def pick_speaker_reference(manifest: str | Path, speaker: str) -> tuple[Path, str, str]:
    """A reference clip of `speaker` from a manifest: the row whose id sorts first -> (audio, text, id).

    Deterministic and independent of the manifest's order. Rows with their own ref_audio are
    candidates like any other (their `audio` is still a clip of that speaker).
    """
    manifest = Path(manifest)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"manifest {manifest} not found. Fix: give the JSON Lines manifest that lists the speaker's clips.") from None
    candidates: list[tuple[str, Path, str]] = []
    speakers: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}:{number}: not valid JSON ({e.msg}). Fix: validate the manifest with `higgs-tune inspect`.") from None
        if not isinstance(row, dict):
            continue
        speakers.add(str(row.get("speaker")))
        if row.get("speaker") == speaker and row.get("audio") and row.get("text"):
            ident = row.get("id") or Path(row["audio"]).stem
            candidates.append((ident, manifest.parent / row["audio"], row["text"]))
    if not candidates:
        known = ", ".join(sorted(speakers)[:20]) or "none"
        raise DataError(f"speaker {speaker!r} has no clip in {manifest} (speakers there: {known}). Fix: pick one of those speakers.")
    ident, audio, text = min(candidates)
    return audio, text, ident


def default_output_name(index: int, text: str) -> str:
    """`out-01-hello-world.wav` style names for texts given on the command line."""
    stem = "".join(c if c.isalnum() else "-" for c in text.lower())[:32].strip("-")
    stem = "-".join(filter(None, stem.split("-")))
    return f"out-{index:02d}{'-' + stem if stem else ''}.wav"

