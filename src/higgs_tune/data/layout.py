"""The Higgs Audio v2 sample layout: one code path for training samples and generation prompts.

A sample is a Llama-3 chat rendered as the chat template in `resources/chat_template.jinja`
does (and as `HiggsAudioV2Processor.apply_chat_template` does with it), tokenized once, with
every `<|AUDIO_OUT|>` expanded into the placeholders of one delay-patterned audio segment:

    system [+ scene] -> (user: reference text -> assistant: reference audio) -> user: text
                     -> assistant: target audio

`build_sample` returns the whole conversation with labels; `build_prompt` returns the same
token sequence cut right after the target turn's `<|audio_out_bos|>`, which is exactly what
`apply_chat_template(..., add_generation_prompt=True)` gives and what `model.generate` continues.

Audio segment of T frames, K codebooks (delay pattern on, `delay_pattern`)
-------------------------------------------------------------------------
- input columns: T + 2 + (K - 1); row k = (k+1) x stream BOS, the T codes, (K-k) x stream EOS,
  i.e. `HiggsAudioV2Processor.build_delay_pattern` applied to [BOS, codes, EOS].
- text placeholders: (T + 2) x `<|AUDIO_OUT|>` then (K - 1) x `<|reserved_special_token_6|>`
  (the model swaps in the audio embedding at both tokens: `get_placeholder_mask`).

Labels (-100 = no loss). The model's loss shifts internally: position t predicts label t+1.
- target audio segment: row k = (k+1) x -100, the T codes, ONE stream EOS, (K-1-k) x -100.
  BOS is never a label (generation forces it); each codebook's first EOS is (that is how the
  model learns to stop; the rest of the EOS fill is forced by generation's delay-pattern logits
  processor once the first one is out). Column 0 is all -100, so the text position before the
  segment (`<|audio_out_bos|>`) never learns audio, and a shift never crosses two segments.
- reference audio segment: all -100 (the reference is context, never a target).
- text labels: only the target turn's `<|audio_out_bos|>`, `<|audio_eos|>` and `<|eot_id|>`
  carry their own id; system, scene, user turns, headers, placeholders and the reference turn
  are all -100.

Worked example: target T = 2 frames, K = 3 codebooks, codes a0 a1 / b0 b1 / c0 c1 (B = 1024 =
stream BOS, E = 1025 = stream EOS, AO = `<|AUDIO_OUT|>`, D = delay token, . = -100)::

    text tokens    ... \\n\\n  <|audio_out_bos|>  AO  AO  AO  AO  D   D   <|audio_eos|>  <|eot_id|>
    text labels    ...   .   <|audio_out_bos|>  .   .   .   .   .   .   <|audio_eos|>  <|eot_id|>
    audio column                            0   1   2   3   4   5
    audio input    row 0                    B   a0  a1  E   E   E
                   row 1                    B   B   b0  b1  E   E
                   row 2                    B   B   B   c0  c1  E
    audio labels   row 0                    .   a0  a1  E   .   .
                   row 1                    .   .   b0  b1  E   .
                   row 2                    .   .   .   c0  c1  E

The `transformers` processor's `output_labels=True` differs from this on purpose: it masks the
stream EOS (a model trained on it never stops), labels the reference codes, and labels every
text token except `<|AUDIO_OUT|>`/`<|audio_out_bos|>`/pad (system and user turns included).

Tokenization: the rendered string is tokenized once with `add_special_tokens=False` (it starts
with `<|begin_of_text|>` already). The tokenizer splits added special tokens out before BPE, so
the text between two special tokens is tokenized on its own; the length of a voice-cloning
sample is therefore the TTS length plus `reference_lengths` of its reference turns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from higgs_tune.errors import DataError, ModelLoadError

IGNORE_INDEX = -100

# audio_roles values (per audio column); the collator pads with ROLE_PAD.
ROLE_PAD = 0
ROLE_REFERENCE = 1
ROLE_TARGET = 2

DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
AUDIO_OUT_BOS = "<|audio_out_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_OUT = "<|AUDIO_OUT|>"
AUDIO_DELAY = "<|reserved_special_token_6|>"
SCENE_START = "<|scene_desc_start|>"
SCENE_END = "<|scene_desc_end|>"


# ----------------------------------------------------------------------------- special tokens
@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the chat markup, the audio placeholders and the audio stream markers."""

    begin_of_text: int
    start_header: int
    end_header: int
    eot: int
    audio_out_bos: int
    audio_eos: int
    audio_out: int
    audio_delay: int
    pad: int
    stream_bos: int
    stream_eos: int
    num_codebooks: int

    @classmethod
    def from_tokenizer(cls, tokenizer, model_config_or_processor) -> SpecialTokens:
        """Read the ids from the text tokenizer; stream BOS/EOS and K from the model config or processor.

        `model_config_or_processor` is a `HiggsAudioV2Config` (K = `num_codebooks`) or a
        `HiggsAudioV2Processor` (K = its audio tokenizer's `num_quantizers`). The ids the config
        or processor records for the placeholders must agree with the tokenizer's: a stack whose
        parts disagree would put audio embeddings at the wrong positions.
        """
        from transformers import (
            HiggsAudioV2Config,
            HiggsAudioV2Processor,
        )  # lazy: `higgs-tune --help` imports this module

        names = {
            "begin_of_text": BEGIN_OF_TEXT,
            "start_header": START_HEADER,
            "end_header": END_HEADER,
            "eot": EOT,
            "audio_out_bos": AUDIO_OUT_BOS,
            "audio_eos": AUDIO_EOS,
            "audio_out": AUDIO_OUT,
            "audio_delay": AUDIO_DELAY,
        }
        ids, problems = {}, []
        for field_name, token in names.items():
            encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                problems.append(f"{token} is not a single token (encodes to {encoded})")
            else:
                ids[field_name] = encoded[0]
        if problems:
            raise ModelLoadError(
                "The text tokenizer is not a Higgs Audio v2 tokenizer: "
                + "; ".join(problems)
                + ". Load the tokenizer saved with the checkpoint."
            )

        source = model_config_or_processor
        if isinstance(source, HiggsAudioV2Config):
            recorded = {
                "audio_out": source.audio_token_id,
                "audio_out_bos": source.audio_bos_token_id,
                "audio_delay": source.audio_delay_token_id,
            }
            stream_bos, stream_eos = source.audio_stream_bos_id, source.audio_stream_eos_id
            num_codebooks = source.num_codebooks
            config_pad = source.pad_token_id
            if source.codebook_size <= stream_eos:
                raise ModelLoadError(
                    f"Model config codebook_size={source.codebook_size} leaves no embedding row for stream "
                    f"EOS id {stream_eos}: it must be the audio codebook size + 2 (1026 for 1024 codes)."
                )
        elif isinstance(source, HiggsAudioV2Processor):
            recorded = {
                "audio_out": source.audio_token_id,
                "audio_out_bos": source.audio_bos_token_id,
                "audio_eos": source.audio_eos_token_id,
                "audio_delay": source.audio_delay_token_id,
            }
            stream_bos, stream_eos = source.audio_stream_bos_id, source.audio_stream_eos_id
            num_codebooks = source.audio_tokenizer.config.num_quantizers
            config_pad = None
        else:
            raise TypeError(
                f"model_config_or_processor must be a HiggsAudioV2Config or HiggsAudioV2Processor, "
                f"got {type(source).__name__}."
            )
        wrong = [f"{k}: config {v} vs tokenizer {ids[k]}" for k, v in recorded.items() if v != ids[k]]
        if wrong:
            raise ModelLoadError(
                "The model/processor and the text tokenizer disagree on special-token ids ("
                + "; ".join(wrong)
                + "). Use the tokenizer saved with the checkpoint."
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config_pad
        if pad is None:
            raise ModelLoadError(
                "The text tokenizer has no pad token and the model config names none; set tokenizer.pad_token."
            )
        return cls(pad=pad, stream_bos=stream_bos, stream_eos=stream_eos, num_codebooks=num_codebooks, **ids)

    def num_columns(self, num_frames: int) -> int:
        """Audio columns (= placeholders) of a T-frame segment: T + 2 (BOS, EOS) + K - 1 (delay)."""
        return num_frames + 2 + self.num_codebooks - 1

    @property
    def structural_ids(self) -> frozenset[int]:
        """Tokens whose positions define the layout; transcripts must not contain them."""
        return frozenset(
            (
                self.begin_of_text,
                self.start_header,
                self.end_header,
                self.eot,
                self.audio_out_bos,
                self.audio_eos,
                self.audio_out,
                self.audio_delay,
            )
        )


# ----------------------------------------------------------------------------- delay pattern
def delay_pattern(codes: torch.Tensor, bos: int, eos: int) -> torch.Tensor:
    """(K, T) codes -> (K, T + 2 + K - 1): row k = (k+1) x bos, the T codes, (K-k) x eos.

    Equal to `HiggsAudioV2Processor.build_delay_pattern` applied to [bos, codes, eos].
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (K, T), got shape {tuple(codes.shape)}")
    k_books, t_frames = codes.shape
    out = torch.full((k_books, t_frames + k_books + 1), eos, dtype=torch.long)
    for k in range(k_books):
        out[k, : k + 1] = bos
        out[k, k + 1 : k + 1 + t_frames] = codes[k]
    return out


def revert_delay_pattern(delayed: torch.Tensor) -> torch.Tensor:
    """(K, S) delay-patterned columns -> (K, S - K + 1) aligned frames (inverse of `delay_pattern`).

    For a whole segment the result is [bos, codes, eos] per row; row k of frame j is
    `delayed[k, k + j]`, so only frames complete in every codebook are returned.
    """
    k_books, columns = delayed.shape
    if columns < k_books:
        raise ValueError(f"a delay pattern over {k_books} codebooks needs >= {k_books} columns, got {columns}")
    frames = columns - k_books + 1
    return torch.stack([delayed[k, k : k + frames] for k in range(k_books)])


def target_audio_labels(codes: torch.Tensor, eos: int) -> torch.Tensor:
    """(K, T) codes -> (K, T + K + 1) labels: row k = (k+1) x -100, codes, ONE eos, (K-1-k) x -100."""
    k_books, t_frames = codes.shape
    labels = torch.full((k_books, t_frames + k_books + 1), IGNORE_INDEX, dtype=torch.long)
    for k in range(k_books):
        labels[k, k + 1 : k + 1 + t_frames] = codes[k]
        labels[k, k + 1 + t_frames] = eos
    return labels


def generated_codes(audio_sequence: torch.Tensor, prompt_columns: int, tokens: SpecialTokens) -> torch.Tensor:
    """Codes a generation produced: (N_total, K) or (1, N_total, K) -> (K, T).

    `audio_sequence` is what `model.generate` returns (prompt columns + generated columns);
    `prompt_columns` is the prompt's `audio_input_ids.shape[1]` (0 without a reference). The
    generated columns are reverted from the delay pattern, the leading stream-BOS frame is
    dropped and the frames are cut at the first frame holding a stream EOS.
    """
    if audio_sequence.dim() == 3:
        if audio_sequence.shape[0] != 1:
            raise ValueError(f"one sequence at a time, got batch {audio_sequence.shape[0]}")
        audio_sequence = audio_sequence[0]
    generated = audio_sequence[prompt_columns:].T  # (K, S)
    if generated.shape[1] < tokens.num_codebooks:
        return generated.new_zeros((tokens.num_codebooks, 0))
    frames = revert_delay_pattern(generated)  # (K, F) = [BOS, codes..., EOS...]
    if bool((frames[:, 0] == tokens.stream_bos).all()):
        frames = frames[:, 1:]
    has_eos = (frames == tokens.stream_eos).any(dim=0)
    end = int(has_eos.nonzero()[0, 0]) if bool(has_eos.any()) else frames.shape[1]
    return frames[:, :end]


# ----------------------------------------------------------------------------- conversation
def _header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def render_user_turn(text: str) -> str:
    """A user turn as the chat template writes it (text trimmed like Jinja's `trim`)."""
    return _header("user") + text.strip() + EOT


def render_audio_turn() -> str:
    """An assistant audio turn before expansion: one `<|AUDIO_OUT|>` stands for the whole clip."""
    return _header("assistant") + AUDIO_OUT_BOS + AUDIO_OUT + AUDIO_EOS + EOT


def render_reference_turns(ref_text: str) -> str:
    """The voice-cloning prefix: user reference transcript, then assistant reference audio."""
    return render_user_turn(ref_text) + render_audio_turn()


@dataclass(frozen=True)
class Conversation:
    """The text side of one sample: plain TTS (`ref_text is None`) or voice cloning.

    The audio codes are passed separately to `build_sample` / `build_prompt`, so lengths can
    be computed from frame counts alone. An empty or whitespace-only scene means no scene.
    """

    text: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    scene: str | None = None
    ref_text: str | None = None

    @classmethod
    def tts(cls, text: str, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT, scene: str | None = None) -> Conversation:
        """system [+ scene] -> user: text -> assistant: target audio."""
        return cls(text=text, system_prompt=system_prompt, scene=scene)

    @classmethod
    def voice_clone(
        cls, text: str, ref_text: str, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT, scene: str | None = None
    ) -> Conversation:
        """system [+ scene] -> user: ref_text -> assistant: ref audio -> user: text -> assistant: target audio."""
        return cls(text=text, system_prompt=system_prompt, scene=scene, ref_text=ref_text)

    @property
    def task(self) -> str:
        return "tts" if self.ref_text is None else "voice_clone"

    @property
    def has_scene(self) -> bool:
        return self.scene is not None and bool(self.scene.strip())

    def render(self, *, generation_prompt: bool = False) -> str:
        """The chat-template string; with `generation_prompt` it ends after the target `<|audio_out_bos|>`."""
        parts = [BEGIN_OF_TEXT, _header("system"), self.system_prompt.strip()]
        if self.has_scene:
            parts += ["\n\n", SCENE_START, "\n", self.scene.strip(), "\n", SCENE_END]
        parts.append(EOT)
        if self.ref_text is not None:
            parts.append(render_reference_turns(self.ref_text))
        parts.append(render_user_turn(self.text))
        parts.append(_header("assistant") + AUDIO_OUT_BOS if generation_prompt else render_audio_turn())
        return "".join(parts)

    def messages(self, *, ref_audio=None, target_audio=None) -> list[dict]:
        """The conversation in `HiggsAudioV2Processor.apply_chat_template` format.

        `ref_audio` / `target_audio` are whatever the processor accepts as audio (a waveform);
        without `target_audio` the list ends with the target user turn (add a generation prompt).
        """

        def text(t):
            return [{"type": "text", "text": t}]

        out = [{"role": "system", "content": text(self.system_prompt)}]
        if self.has_scene:
            out.append({"role": "scene", "content": text(self.scene)})
        if self.ref_text is not None:
            if ref_audio is None:
                raise ValueError("a voice-cloning conversation needs ref_audio")
            out.append({"role": "user", "content": text(self.ref_text)})
            out.append({"role": "assistant", "content": [{"type": "audio", "audio": ref_audio}]})
        out.append({"role": "user", "content": text(self.text)})
        if target_audio is not None:
            out.append({"role": "assistant", "content": [{"type": "audio", "audio": target_audio}]})
        return out


# ----------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Segment:
    """Where one audio clip sits: `input_ids[token_start:token_end]` are its placeholders,
    `audio_input_ids[audio_start:audio_end]` its columns (same count)."""

    role: int  # ROLE_REFERENCE or ROLE_TARGET
    num_frames: int
    token_start: int
    token_end: int
    audio_start: int
    audio_end: int


class Sample(TypedDict):
    """One training sample, as `build_sample` returns it and the collator consumes it."""

    sample_id: str
    task: str  # "tts" or "voice_clone"
    reference: str | None  # id (or cache key) of the reference clip, None for TTS
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, -100 except the target turn's aob / audio_eos / eot
    audio_input_ids: torch.Tensor  # (N, K) long, N = total placeholders in input_ids
    audio_labels: torch.Tensor  # (N, K) long
    audio_roles: torch.Tensor  # (N,) long, ROLE_REFERENCE / ROLE_TARGET
    segments: list[Segment]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The rendered strings already start with <|begin_of_text|>: never let the tokenizer add one.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _expected_structure(conv: Conversation | None, tokens: SpecialTokens) -> list[int]:
    """The structural token ids, in order, that rendering `conv` (full sample) must produce;
    `conv=None`: those of `render_reference_turns` alone."""
    t = tokens
    user = [t.start_header, t.end_header, t.eot]
    audio = [t.start_header, t.end_header, t.audio_out_bos, t.audio_out, t.audio_eos, t.eot]
    if conv is None:
        return user + audio
    out = [t.begin_of_text, t.start_header, t.end_header, t.eot]
    if conv.ref_text is not None:
        out += user + audio
    return out + user + audio


def _markup_in_text(ids: list[int], expected: list[int], tokens: SpecialTokens, tokenizer) -> list[str]:
    """Names of structural tokens found beyond the template's own ([] when the layout is intact)."""
    found = [i for i in ids if i in tokens.structural_ids]
    if found == expected:
        return []
    surplus = Counter(found) - Counter(expected)
    return sorted(tokenizer.convert_ids_to_tokens(i) for i in surplus) or ["markup tokens"]


def _markup_error(bad: list[tuple[str, list[str]]]) -> DataError:
    """Transcripts that contain chat markup or audio placeholders would shift every label."""
    shown = "; ".join(f"{sample_id!r}: {', '.join(names)}" for sample_id, names in bad[:20])
    return DataError(
        f"{len(bad)} sample(s) contain Higgs chat markup in their text, which would break the sample layout "
        f"({shown}{' ...' if len(bad) > 20 else ''}). Remove these tokens from the transcript, reference "
        "transcript, scene or system prompt."
    )


def _check_codes(codes: torch.Tensor, tokens: SpecialTokens, what: str, sample_id: str) -> None:
    if codes.dim() != 2 or codes.shape[0] != tokens.num_codebooks or codes.shape[1] == 0:
        raise DataError(
            f"Sample {sample_id!r}: {what} codes have shape {tuple(codes.shape)}, expected "
            f"({tokens.num_codebooks}, T>0). Re-run `higgs-tune prepare` with this model's audio tokenizer."
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= tokens.stream_bos):
        raise DataError(
            f"Sample {sample_id!r}: {what} codes hold values outside 0..{tokens.stream_bos - 1} "
            f"(min {int(codes.min())}, max {int(codes.max())}). Re-run `higgs-tune prepare`."
        )


def _assemble(
    conv: Conversation,
    tokenizer,
    tokens: SpecialTokens,
    *,
    ref_codes: torch.Tensor | None,
    target_codes: torch.Tensor | None,
    sample_id: str,
) -> dict:
    """Shared by build_sample and build_prompt. `target_codes=None` cuts after the target `<|audio_out_bos|>`."""
    if (conv.ref_text is None) != (ref_codes is None):
        raise ValueError(
            f"Sample {sample_id!r}: ref_codes must be given exactly when the conversation has a reference "
            f"(task {conv.task}, ref_codes {'given' if ref_codes is not None else 'missing'})."
        )
    clips: list[tuple[int, torch.Tensor]] = []
    if ref_codes is not None:
        _check_codes(ref_codes, tokens, "reference", sample_id)
        clips.append((ROLE_REFERENCE, ref_codes.long()))
    if target_codes is not None:
        _check_codes(target_codes, tokens, "target", sample_id)
        clips.append((ROLE_TARGET, target_codes.long()))

    ids = _encode(tokenizer, [conv.render()])[0]
    markup = _markup_in_text(ids, _expected_structure(conv, tokens), tokens, tokenizer)
    if markup:
        raise _markup_error([(sample_id, markup)])
    aob_positions = [i for i, t in enumerate(ids) if t == tokens.audio_out_bos]
    target_aob = aob_positions[-1]
    if target_codes is None:
        # The generation prompt: identical to the full sample up to the target <|audio_out_bos|>.
        ids = ids[: target_aob + 1]

    k_books = tokens.num_codebooks
    input_ids: list[int] = []
    text_labels: list[int] = []
    audio_inputs, audio_labels, audio_roles, segments = [], [], [], []
    clip_iter = iter(clips)
    audio_cursor = 0
    target_start = None
    for pos, tok in enumerate(ids):
        if tok != tokens.audio_out:
            if pos == target_aob:
                target_start = len(input_ids)
            input_ids.append(tok)
            text_labels.append(IGNORE_INDEX)
            continue
        role, codes = next(clip_iter)
        t_frames = codes.shape[1]
        n_cols = tokens.num_columns(t_frames)
        token_start = len(input_ids)
        input_ids += [tokens.audio_out] * (t_frames + 2) + [tokens.audio_delay] * (k_books - 1)
        text_labels += [IGNORE_INDEX] * n_cols
        audio_inputs.append(delay_pattern(codes, tokens.stream_bos, tokens.stream_eos).T)  # (n_cols, K)
        if role == ROLE_TARGET:
            audio_labels.append(target_audio_labels(codes, tokens.stream_eos).T)
        else:
            audio_labels.append(torch.full((n_cols, k_books), IGNORE_INDEX, dtype=torch.long))
        audio_roles.append(torch.full((n_cols,), role, dtype=torch.long))
        segments.append(Segment(role, t_frames, token_start, token_start + n_cols, audio_cursor, audio_cursor + n_cols))
        audio_cursor += n_cols

    if target_codes is not None:
        # Text labels: the target turn's <|audio_out_bos|>, <|audio_eos|>, <|eot_id|>; the two
        # closing tokens follow the target placeholders directly.
        target = segments[-1]
        for pos in (target_start, target.token_end, target.token_end + 1):
            text_labels[pos] = input_ids[pos]

    def cat(parts, empty_shape):
        return torch.cat(parts) if parts else torch.empty(empty_shape, dtype=torch.long)

    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(text_labels, dtype=torch.long),
        "audio_input_ids": cat(audio_inputs, (0, k_books)),
        "audio_labels": cat(audio_labels, (0, k_books)),
        "audio_roles": cat(audio_roles, (0,)),
        "segments": segments,
    }


def build_sample(
    conv: Conversation,
    tokenizer,
    tokens: SpecialTokens,
    *,
    target_codes: torch.Tensor,
    ref_codes: torch.Tensor | None = None,
    sample_id: str = "",
    reference: str | None = None,
) -> Sample:
    """A training sample: input_ids (L,), labels (L,), audio_input_ids / audio_labels (N, K), audio_roles (N,).

    `target_codes` / `ref_codes` are (K, T) codes in 0..1023 (`ref_codes` exactly when
    `conv.ref_text` is set). `reference` only names the reference clip in the sample.
    """
    parts = _assemble(conv, tokenizer, tokens, ref_codes=ref_codes, target_codes=target_codes, sample_id=sample_id)
    return Sample(sample_id=sample_id, task=conv.task, reference=reference, **parts)


def build_prompt(
    conv: Conversation,
    tokenizer,
    tokens: SpecialTokens,
    *,
    ref_codes: torch.Tensor | None = None,
    sample_id: str = "",
) -> dict[str, torch.Tensor]:
    """The generation prompt for `model.generate(**prompt)`, batch of one.

    input_ids / attention_mask (1, L) long; with a reference also audio_input_ids (1, N, K) long
    and audio_input_ids_mask (1, N) bool. Without a reference the audio keys are absent, as in
    the processor's output (generate cannot start from an empty audio tensor).
    """
    parts = _assemble(conv, tokenizer, tokens, ref_codes=ref_codes, target_codes=None, sample_id=sample_id)
    input_ids = parts["input_ids"][None]
    prompt = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if parts["audio_input_ids"].shape[0]:
        prompt["audio_input_ids"] = parts["audio_input_ids"][None]
        prompt["audio_input_ids_mask"] = torch.ones(prompt["audio_input_ids"].shape[:2], dtype=torch.bool)
    return prompt


# ----------------------------------------------------------------------------- lengths
def sample_lengths(
    convs: Sequence[Conversation],
    tokenizer,
    tokens: SpecialTokens,
    target_frames: Sequence[int],
    ref_frames: Sequence[int | None] | None = None,
    sample_ids: Sequence[str] | None = None,
) -> list[int]:
    """len(input_ids) of `build_sample` for each conversation, from frame counts only (batched).

    Raises one DataError naming every sample whose text contains chat markup (as build_sample would).
    """
    ref_frames = ref_frames if ref_frames is not None else [None] * len(convs)
    sample_ids = sample_ids if sample_ids is not None else [str(i) for i in range(len(convs))]
    encoded = _encode(tokenizer, [c.render() for c in convs]) if convs else []
    out, bad = [], []
    for ids, conv, t_frames, r_frames, sample_id in zip(
        encoded, convs, target_frames, ref_frames, sample_ids, strict=True
    ):
        if (conv.ref_text is None) != (r_frames is None):
            raise ValueError("ref_frames must be given exactly for the voice-cloning conversations")
        markup = _markup_in_text(ids, _expected_structure(conv, tokens), tokens, tokenizer)
        if markup:
            bad.append((sample_id, markup))
        n = len(ids) + tokens.num_columns(t_frames) - 1  # one <|AUDIO_OUT|> becomes num_columns
        if r_frames is not None:
            n += tokens.num_columns(r_frames) - 1
        out.append(n)
    if bad:
        raise _markup_error(bad)
    return out


def reference_lengths(
    ref_texts: Sequence[str],
    ref_frames: Sequence[int],
    tokenizer,
    tokens: SpecialTokens,
    sample_ids: Sequence[str] | None = None,
) -> list[int]:
    """Tokens the reference turns add to a sample (user ref text + expanded assistant ref audio)."""
    sample_ids = sample_ids if sample_ids is not None else [str(i) for i in range(len(ref_texts))]
    encoded = _encode(tokenizer, [render_reference_turns(t) for t in ref_texts]) if ref_texts else []
    expected = _expected_structure(None, tokens)
    bad = [
        (i, m)
        for i, ids in zip(sample_ids, encoded, strict=True)
        if (m := _markup_in_text(ids, expected, tokens, tokenizer))
    ]
    if bad:
        raise _markup_error(bad)
    return [len(ids) + tokens.num_columns(f) - 1 for ids, f in zip(encoded, ref_frames, strict=True)]
