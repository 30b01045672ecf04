"""Evaluation metrics on known inputs: edit alignment, WER/CER, normalisation, cosine, duration."""

from __future__ import annotations

import math

import pytest

from higgs_tune.infer.metrics import (
    EditCounts,
    align,
    cer,
    char_edits,
    corpus_rate,
    cosine_similarity,
    duration_ratio,
    mean,
    normalize_arabic,
    normalize_text,
    wer,
    word_edits,
)


# ----------------------------------------------------------------------------- alignment
def test_align_counts_each_kind_of_edit():
    assert align("the cat sat on the mat".split(), "the cat sit on mat".split()) == EditCounts(4, 1, 1, 0)
    assert align("a b c".split(), "a x b c".split()) == EditCounts(3, 0, 0, 1)
    assert align("a b c".split(), "a b c".split()) == EditCounts(3, 0, 0, 0)
    assert align("a b c".split(), []) == EditCounts(0, 0, 3, 0)
    assert align([], "a b".split()) == EditCounts(0, 0, 0, 2)
    # one substitution is cheaper than a deletion + an insertion
    assert align(["x"], ["y"]) == EditCounts(0, 1, 0, 0)
    # classic Levenshtein example: kitten -> sitting = 2 substitutions + 1 insertion
    assert align("kitten", "sitting") == EditCounts(4, 2, 0, 1)


def test_rates_and_empty_reference():
    assert EditCounts(4, 1, 1, 0).rate() == pytest.approx(2 / 6)
    assert EditCounts(0, 0, 0, 0).rate() == 0.0
    assert EditCounts(0, 0, 0, 2).rate() == math.inf
    assert EditCounts(4, 1, 1, 0).errors == 2 and EditCounts(4, 1, 1, 0).ref_length == 6


def test_wer_of_fixed_strings():
    assert wer("The cat sat on the mat.", "the cat sit on mat") == pytest.approx(2 / 6)  # 1 sub + 1 del
    assert wer("Please close the window.", "please please close the window") == pytest.approx(1 / 4)  # 1 ins
    assert wer("Hello, World!", "hello world") == 0.0  # case and punctuation are normalised away
    assert wer("one two three", "") == 1.0
    assert wer("one two", "three four five six") == pytest.approx(4 / 2)  # WER can exceed 1
    assert word_edits("The cat sat.", "a cat sat down") == EditCounts(2, 1, 0, 1)


def test_cer_of_fixed_strings():
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert cer("ab c", "abc") == 0.0  # spaces are not characters
    assert cer("Hello!", "hallo") == pytest.approx(1 / 5)
    assert char_edits("kitten", "sitting") == EditCounts(4, 2, 0, 1)


def test_corpus_rate_is_total_edits_over_total_length():
    counts = [EditCounts(9, 1, 0, 0), EditCounts(0, 1, 0, 0)]  # 1/10 and 1/1
    assert corpus_rate(counts) == pytest.approx(2 / 11)
    assert mean([c.rate() for c in counts]) == pytest.approx(0.55)
    assert corpus_rate([]) == 0.0


# ----------------------------------------------------------------------------- normalisation
def test_english_normalisation():
    assert normalize_text("Hello, World!  It's 5 o'clock...", "en") == "hello world it's 5 o'clock"
    assert normalize_text("“Quoted” — dash; (parens) & $100", "en") == "quoted dash parens 100"
    assert normalize_text("'single quotes'", "en") == "single quotes"  # not inside a word: removed
    assert normalize_text("ＦＵＬＬ width", "en") == "full width"  # NFKC
    assert normalize_text("Tab\tand\nnewline", None) == "tab and newline"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("أَهْلاً وَسَهْلاً", "اهلا وسهلا"),  # harakat and tanwin removed, hamza-alef unified
        ("إسلام", "اسلام"),
        ("آمن", "امن"),
        ("ٱلله", "الله"),  # alef wasla
        ("مسؤول", "مسوول"),  # hamza on waw
        ("سائل", "سايل"),  # hamza on ya
        ("مدرسة", "مدرسه"),  # ta marbuta -> ha
        ("على", "علي"),  # alef maqsura -> ya
        ("جـــميل", "جميل"),  # tatweel
        ("مُحَمَّدٌ", "محمد"),  # shadda, damma, tanwin
        ("كم عمرك؟ ٣٤ سنة، تقريباً!", "كم عمرك 34 سنه تقريبا"),  # Arabic punctuation and digits
    ],
)
def test_arabic_normalisation(raw, expected):
    assert normalize_text(raw, "ar") == expected


def test_arabic_rules_only_for_arabic():
    assert normalize_arabic("مدرسة") == "مدرسه"
    assert normalize_text("مدرسة", "en") == "مدرسة"  # not Arabic: letters untouched
    assert normalize_text("مدرسة", "ar-EG") == "مدرسه"  # regional codes count as Arabic


def test_arabic_wer_ignores_orthographic_variants():
    assert wer("شكرا لك على المساعدة.", "شكراً لك علي المساعده", "ar") == 0.0
    assert wer("أين وضعت مفاتيح السيارة؟", "اين وضعت مفتاح السياره", "ar") == pytest.approx(1 / 4)
    assert cer("أين وضعت مفاتيح السيارة؟", "اين وضعت مفتاح السياره", "ar") == pytest.approx(
        2 / 20
    )  # مفاتيح -> مفتاح: 1 del + 1 sub


# ----------------------------------------------------------------------------- vectors and durations
def test_cosine_of_known_vectors():
    assert cosine_similarity([1, 0], [0, 1]) == 0.0
    assert cosine_similarity([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert cosine_similarity([1, 0], [-1, 0]) == pytest.approx(-1.0)
    assert cosine_similarity([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="zero vector"):
        cosine_similarity([0, 0], [1, 0])
    with pytest.raises(ValueError, match="different lengths"):
        cosine_similarity([1, 0, 0], [1, 0])


def test_duration_ratio_and_mean():
    assert duration_ratio(3.0, 2.0) == 1.5
    with pytest.raises(ValueError, match="must be > 0"):
        duration_ratio(1.0, 0.0)
    assert mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert mean([]) is None
