"""Evaluation metrics on plain Python values: text normalisation, WER/CER, cosine, durations.

Nothing here loads a model. WER and CER come from `jiwer`'s alignment of the normalised
texts (our normaliser, below; jiwer only aligns), which counts substitutions, deletions and
insertions separately, so a report can say *how* a transcript differs, not only by how much.

Normalisation follows the usual ASR-evaluation practice:
- English (and any language without its own rules): Unicode NFKC, lower case, punctuation
  and symbols removed, whitespace collapsed. Apostrophes inside words are kept
  ("don't" stays one word) because Whisper-style ASR writes them.
- Arabic: the above, plus diacritics (harakat, tanwin, shadda, sukun, superscript alef,
  Quranic marks) and tatweel removed; alef forms (أ إ آ ٱ) -> ا; hamza on waw/ya
  (ؤ ئ) -> و ي; ta marbuta ة -> ه; alef maqsura ى -> ي; Arabic-Indic digits -> 0-9.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

# Harakat, tanwin, shadda, sukun, maddah/hamza marks above/below (U+064B..U+065F),
# superscript alef (U+0670) and the Quranic annotation signs (U+06D6..U+06ED).
_AR_DIACRITICS = re.compile("[\u064b-\u065f\u0670\u06d6-\u06ed]")
_AR_TATWEEL = "\u0640"
_AR_LETTER_MAP = str.maketrans(
    {
        "\u0623": "\u0627",  # أ -> ا
        "\u0625": "\u0627",  # إ -> ا
        "\u0622": "\u0627",  # آ -> ا
        "\u0671": "\u0627",  # ٱ (alef wasla) -> ا
        "\u0624": "\u0648",  # ؤ -> و
        "\u0626": "\u064a",  # ئ -> ي
        "\u0629": "\u0647",  # ة -> ه
        "\u0649": "\u064a",  # ى -> ي
        **{chr(0x0660 + d): str(d) for d in range(10)},  # Arabic-Indic digits
        **{chr(0x06F0 + d): str(d) for d in range(10)},  # Extended Arabic-Indic (Persian) digits
    }
)
_APOSTROPHES = "'\u2019\u02bc"


def _strip_punctuation(text: str) -> str:
    """Replace every Unicode punctuation (P*) and symbol (S*) character by a space, except an
    apostrophe between two letters ("don't")."""
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch in _APOSTROPHES:
            inside = 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()
            out.append("'" if inside else " ")
        elif cat[0] in "PS":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def normalize_arabic(text: str) -> str:
    """Arabic letter normalisation only (diacritics, tatweel, alef/hamza, ta marbuta, alef maqsura, digits)."""
    text = _AR_DIACRITICS.sub("", text).replace(_AR_TATWEEL, "")
    return text.translate(_AR_LETTER_MAP)


def normalize_text(text: str, language: str | None) -> str:
    """Text as compared for WER/CER: see the module docstring for the rules per language.

    `language` is an ISO code ("en", "ar", ...) or None; Arabic rules apply to "ar" and "ar-*"."""
    text = unicodedata.normalize("NFKC", text)
    if language is not None and language.lower().split("-")[0].split("_")[0] == "ar":
        text = normalize_arabic(text)
    text = _strip_punctuation(text.lower())
    return " ".join(text.split())


@dataclass(frozen=True)
class EditCounts:
    """Alignment of a hypothesis against a reference with the minimum number of edits:
    errors = substitutions + deletions + insertions. Where several alignments have that
    minimum, the split between the three kinds is jiwer's (rapidfuzz opcodes) choice; the total
    is the same for all of them."""

    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def ref_length(self) -> int:
        return self.hits + self.substitutions + self.deletions

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    def rate(self) -> float:
        """errors / reference length. An empty reference gives 0.0 for an empty hypothesis and
        inf otherwise (every hypothesis token is an insertion against nothing)."""
        if self.ref_length == 0:
            return 0.0 if self.insertions == 0 else math.inf
        return self.errors / self.ref_length


def _as_token_lists(sentences: list) -> list[list[str]]:
    """jiwer transform: our sequences are tokenised already (words, or characters); keep them."""
    return [[str(t) for t in tokens] for tokens in sentences]


def align(ref: Sequence, hyp: Sequence) -> EditCounts:
    """Levenshtein alignment of two token sequences with unit costs (`jiwer.process_words`)."""
    out = jiwer.process_words([ref], [hyp], reference_transform=_as_token_lists, hypothesis_transform=_as_token_lists)
    return EditCounts(out.hits, out.substitutions, out.deletions, out.insertions)


def word_edits(ref: str, hyp: str, language: str | None = None) -> EditCounts:
    """Word alignment of two transcripts after `normalize_text`."""
    return align(normalize_text(ref, language).split(), normalize_text(hyp, language).split())


def char_edits(ref: str, hyp: str, language: str | None = None) -> EditCounts:
    """Character alignment after `normalize_text`; spaces are not counted as characters."""
    return align(normalize_text(ref, language).replace(" ", ""), normalize_text(hyp, language).replace(" ", ""))


def wer(ref: str, hyp: str, language: str | None = None) -> float:
    """Word error rate of one hypothesis: (S + D + I) / reference words."""
    return word_edits(ref, hyp, language).rate()


def cer(ref: str, hyp: str, language: str | None = None) -> float:
    """Character error rate of one hypothesis: (S + D + I) / reference characters (no spaces)."""
    return char_edits(ref, hyp, language).rate()


def corpus_rate(counts: Sequence[EditCounts]) -> float:
    """Corpus-level error rate: total edits over total reference length (not a mean of rates)."""
    total = EditCounts(0, 0, 0, 0)
    for c in counts:
        total = total + c
    return total.rate()


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine of two vectors of the same length; a zero vector has no direction -> ValueError."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"cosine_similarity: vectors have different lengths ({len(a)} and {len(b)}).")
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0.0 or nb == 0.0:
        raise ValueError("cosine_similarity: a zero vector has no direction.")
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def duration_ratio(output_s: float, reference_s: float) -> float:
    """Output duration over ground-truth duration (1.0 = same length)."""
    if reference_s <= 0:
        raise ValueError(f"duration_ratio: reference duration must be > 0, got {reference_s}.")
    return output_s / reference_s


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for an empty sequence (a metric with no data, not 0)."""
    values = list(values)
    return sum(values) / len(values) if values else None
