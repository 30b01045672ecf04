"""The Higgs Audio v3 sample layout: ONE function for training samples and generation prompts.

v3 has no chat template, no roles and no system prompt. A sample is one flat sequence
(the prompt the serving engines build, SGLang-Omni `text_tokenizer.py` / vLLM-Omni
`higgs_audio_v3_tokenizer.py`), followed by the target rows when training:

    <|tts|> [<|ref_text|> ref transcript] [<|ref_audio|> (T_ref + 7) slots] <|text|> text <|audio|>
    [(T + 7) target slots]

An audio *slot* is one position whose input embedding is the SUM of the 8 codebook rows of
one delayed audio row (the fused audio table, `model.py`); `input_ids` holds `AUDIO_SLOT`
(-100, the engines' placeholder id) there. The reference transcript is written only together
with reference audio (as both engines do).

Delay pattern (`delay_codes`), K = 8 codebooks, T frames -> T + K - 1 rows; codebook c holds
c x BOC (1024), its T codes, then EOC (1025) up to the last row. There is no stream BOS/EOS
row (v2 has T + 9 columns).

Labels sit at the slot that carries the row (the v2 convention): the model's loss shifts, so
the position before a slot predicts it; `<|audio|>` predicts target row 0. Only target rows
carry labels. BOC is never a label (generation forces it). The EOC fill is labelled:
`eoc_labels="all"` (default) labels every EOC row, because SGLang-Omni feeds the model's own
unforced EOC rows back; `eoc_labels="first"` labels one EOC per codebook (the v2 rule; codebook
7 then has none: its first EOC would be row T + 7, which is never generated). Boson's own v3
training labels are unknown; this is a documented choice, not a reproduction.

Worked example, T = 2 frames, K = 3 codebooks (a/b/c codes, B = BOC, E = EOC, . = -100):

    row            0   1   2   3
    input  cb0     a0  a1  E   E
           cb1     B   b0  b1  E
           cb2     B   B   c0  c1
    labels cb0     a0  a1  E   E      ("first": a0 a1 E .)
           cb1     .   b0  b1  E
           cb2     .   .   c0  c1

Text is tokenized as it is given (no trimming: the engines do not trim either), each piece on
its own with `add_special_tokens=False`. Empty or whitespace-only text and special tokens of
the tokenizer inside user text (control tags, `<|audio|>`, ...) are errors, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from higgs_tune.errors import DataError, ModelLoadError

IGNORE_INDEX = -100
AUDIO_SLOT = -100  # input_ids value at audio slots (the engines' AUDIO_PLACEHOLDER_ID)

NUM_CODEBOOKS = 8
NUM_CODES = 1024  # real codes per codebook
BOC = 1024  # begin-of-codebook filler (delay head)
EOC = 1025  # end-of-codebook filler (delay tail)
CODEBOOK_VOCAB = 1026  # codes + BOC + EOC: the rows per codebook in the fused table

# audio_roles values (per position); 0 = not an audio slot
ROLE_NONE = 0
ROLE_REFERENCE = 1
ROLE_TARGET = 2

TTS = "<|tts|>"
TEXT = "<|text|>"
AUDIO = "<|audio|>"
REF_AUDIO = "<|ref_audio|>"
REF_TEXT = "<|ref_text|>"

EocLabels = Literal["all", "first"]


# ----------------------------------------------------------------------------- special tokens
@dataclass(frozen=True)
class V3Tokens:
    """Ids of the v3 prompt markers, read from the tokenizer's added vocabulary (as the engines do).

    `special_ids` are all tokens of the added vocabulary (the prompt markers, control tags and
    any other markup, special-flagged or not): none may occur inside user text.
    """

    tts: int
    text: int
    audio: int
    ref_audio: int
    ref_text: int | None
    special_ids: frozenset[int]
    num_codebooks: int = NUM_CODEBOOKS

    @classmethod
    def from_tokenizer(cls, tokenizer, num_codebooks: int = NUM_CODEBOOKS) -> V3Tokens:
        vocab = dict(tokenizer.get_added_vocab())
        missing = [t for t in (TTS, TEXT, AUDIO, REF_AUDIO) if t not in vocab]
        if missing:
            raise ModelLoadError(
                f"The text tokenizer is not a Higgs Audio v3 tokenizer: {', '.join(missing)} missing from its "
                "added vocabulary. Load the tokenizer saved with the v3 checkpoint."
            )
        return cls(
            tts=vocab[TTS],
            text=vocab[TEXT],
            audio=vocab[AUDIO],
            ref_audio=vocab[REF_AUDIO],
            ref_text=vocab.get(REF_TEXT),
            special_ids=frozenset(int(i) for i in vocab.values()),
            num_codebooks=num_codebooks,
        )

    def num_rows(self, num_frames: int) -> int:
        """Delayed rows (= slots) of a T-frame clip: T + K - 1."""
        return num_frames + self.num_codebooks - 1


# ----------------------------------------------------------------------------- delay pattern
def delay_codes(codes: torch.Tensor) -> torch.Tensor:
    """(K, T) codes -> (T + K - 1, K) delayed rows: codebook c = c x BOC, its T codes, EOC fill."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (K, T), got shape {tuple(codes.shape)}")
    k_books, t_frames = codes.shape
    rows = torch.full((t_frames + k_books - 1, k_books), EOC, dtype=torch.long)
    for c in range(k_books):
        rows[:c, c] = BOC
        rows[c : c + t_frames, c] = codes[c]
    return rows


def undelay_rows(rows: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """(R, K) delayed rows -> (K, F) codes, F = num_frames or R - K + 1: codes[c, j] = rows[j + c, c]."""
    if rows.dim() != 2:
        raise ValueError(f"rows must be (R, K), got shape {tuple(rows.shape)}")
    n_rows, k_books = rows.shape
    frames = n_rows - k_books + 1 if num_frames is None else num_frames
    if frames < 0 or frames + k_books - 1 > n_rows:
        raise ValueError(f"{n_rows} delayed rows over {k_books} codebooks cannot hold {frames} frames")
    return torch.stack([rows[c : c + frames, c] for c in range(k_books)]) if frames else rows.new_zeros((k_books, 0))


def target_labels(codes: torch.Tensor, eoc_labels: EocLabels = "all") -> torch.Tensor:
    """(K, T) codes -> (T + K - 1, K) labels: the delayed rows with BOC -> -100; EOC fill per `eoc_labels`."""
    if eoc_labels not in ("all", "first"):
        raise ValueError(f"eoc_labels must be 'all' or 'first', got {eoc_labels!r}")
    labels = delay_codes(codes)
    labels[labels == BOC] = IGNORE_INDEX
    if eoc_labels == "first":
        k_books, t_frames = codes.shape
        for c in range(k_books):
            labels[c + t_frames + 1 :, c] = IGNORE_INDEX  # keep only row c + T (when it exists)
    return labels


# ----------------------------------------------------------------------------- samples
class V3Sample(TypedDict):
    """One sample, per position (length L). A generation prompt has no target rows."""

    sample_id: str
    task: str  # "tts" or "voice_clone"
    input_ids: torch.Tensor  # (L,) long; AUDIO_SLOT at audio slots
    audio_codes: torch.Tensor  # (L, K) long; the delayed row at each slot, 0 elsewhere (never read)
    audio_labels: torch.Tensor  # (L, K) long; -100 except target rows
    audio_roles: torch.Tensor  # (L,) long; ROLE_NONE / ROLE_REFERENCE / ROLE_TARGET
    prompt_length: int  # positions up to and including <|audio|>
    target_frames: int  # T (0 for a generation prompt)
    ref_frames: int  # T_ref (0 without a reference)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_text(text: str | None, what: str, tokenizer, tokens: V3Tokens, sample_id: str) -> list[int]:
    if text is None or not text.strip():
        raise DataError(
            f"Sample {sample_id!r}: the {what} is empty or whitespace only ({text!r}); give the words spoken."
        )
    ids = _encode(tokenizer, text)
    found = sorted({i for i in ids if i in tokens.special_ids})
    if found:
        names = ", ".join(tokenizer.convert_ids_to_tokens(found))
        raise DataError(
            f"Sample {sample_id!r}: the {what} contains special tokens of the v3 tokenizer ({names}); they would "
            "break the prompt layout. Remove them from the text."
        )
    return ids


def _check_codes(codes: torch.Tensor, tokens: V3Tokens, what: str, sample_id: str) -> torch.Tensor:
    if codes.dim() != 2 or codes.shape[0] != tokens.num_codebooks or codes.shape[1] == 0:
        raise DataError(
            f"Sample {sample_id!r}: {what} codes have shape {tuple(codes.shape)}, expected "
            f"({tokens.num_codebooks}, T>0) from the v3 codec."
        )
    if int(codes.min()) < 0 or int(codes.max()) >= NUM_CODES:
        raise DataError(
            f"Sample {sample_id!r}: {what} codes hold values outside 0..{NUM_CODES - 1} "
            f"(min {int(codes.min())}, max {int(codes.max())})."
        )
    return codes.long()


def build_v3_sample(
    tokenizer,
    tokens: V3Tokens,
    text: str,
    *,
    target_codes: torch.Tensor | None = None,
    ref_codes: torch.Tensor | None = None,
    ref_text: str | None = None,
    eoc_labels: EocLabels = "all",
    sample_id: str = "",
) -> V3Sample:
    """A training sample (`target_codes` (K, T) given) or a generation prompt (`target_codes=None`).

    The prompt part is identical in both: a generation prompt is a training sample cut right
    after `<|audio|>`. `ref_codes` (K, T_ref) makes it voice cloning; `ref_text` (its transcript)
    needs `ref_codes` and a tokenizer with `<|ref_text|>` (the engines drop it silently otherwise;
    we raise).
    """
    text_ids = _check_text(text, "text", tokenizer, tokens, sample_id)
    if ref_text is not None and ref_codes is None:
        raise DataError(f"Sample {sample_id!r}: a reference transcript was given without reference audio codes.")
    if ref_text is not None and tokens.ref_text is None:
        raise ModelLoadError("This v3 tokenizer has no <|ref_text|> token, so a reference transcript cannot be sent.")
    k = tokens.num_codebooks

    ids: list[int] = [tokens.tts]
    slot_rows: list[torch.Tensor] = []  # (n, K) rows, in order
    slot_labels: list[torch.Tensor] = []
    slot_roles: list[int] = []
    ref_frames = 0
    if ref_codes is not None:
        ref = _check_codes(ref_codes, tokens, "reference", sample_id)
        ref_frames = ref.shape[1]
        if ref_text is not None:
            ids += [tokens.ref_text] + _check_text(ref_text, "reference transcript", tokenizer, tokens, sample_id)
        ids.append(tokens.ref_audio)
        n = tokens.num_rows(ref_frames)
        ids += [AUDIO_SLOT] * n
        slot_rows.append(delay_codes(ref))
        slot_labels.append(torch.full((n, k), IGNORE_INDEX, dtype=torch.long))
        slot_roles += [ROLE_REFERENCE] * n
    ids += [tokens.text] + text_ids + [tokens.audio]
    prompt_length = len(ids)
    target_frames = 0
    if target_codes is not None:
        target = _check_codes(target_codes, tokens, "target", sample_id)
        target_frames = target.shape[1]
        n = tokens.num_rows(target_frames)
        ids += [AUDIO_SLOT] * n
        slot_rows.append(delay_codes(target))
        slot_labels.append(target_labels(target, eoc_labels))
        slot_roles += [ROLE_TARGET] * n

    input_ids = torch.tensor(ids, dtype=torch.long)
    slots = input_ids == AUDIO_SLOT
    audio_codes = torch.zeros((len(ids), k), dtype=torch.long)
    audio_labels = torch.full((len(ids), k), IGNORE_INDEX, dtype=torch.long)
    audio_roles = torch.zeros(len(ids), dtype=torch.long)
    if slot_rows:
        audio_codes[slots] = torch.cat(slot_rows)
        audio_labels[slots] = torch.cat(slot_labels)
        audio_roles[slots] = torch.tensor(slot_roles, dtype=torch.long)
    return V3Sample(
        sample_id=sample_id,
        task="tts" if ref_codes is None else "voice_clone",
        input_ids=input_ids,
        audio_codes=audio_codes,
        audio_labels=audio_labels,
        audio_roles=audio_roles,
        prompt_length=prompt_length,
        target_frames=target_frames,
        ref_frames=ref_frames,
    )


def collate_v3(samples: list[V3Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for `HiggsV3Model.forward`: input_ids / attention_mask (B, L), audio_codes /
    audio_labels (B, L, K). Padding positions are pad_id / 0 / -100."""
    length = max(s["input_ids"].shape[0] for s in samples)
    k = samples[0]["audio_codes"].shape[1]
    b = len(samples)
    batch = {
        "input_ids": torch.full((b, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, length), dtype=torch.long),
        "audio_codes": torch.zeros((b, length, k), dtype=torch.long),
        "audio_labels": torch.full((b, length, k), IGNORE_INDEX, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        batch["input_ids"][i, :n] = s["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["audio_codes"][i, :n] = s["audio_codes"]
        batch["audio_labels"][i, :n] = s["audio_labels"]
    return batch
