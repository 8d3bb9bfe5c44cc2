"""OCR metrics (eval/ocr_metrics.py) against hand-computed values: CER / WER / exact / ANLS, ANLS's 0.5 threshold,
empty references, normalisation variants, grapheme clusters of several code points, bootstrap intervals."""
import pytest

from eval.metrics import character_error_rate
from eval.ocr_metrics import (anls, bootstrap_ci, corpus_metrics, graphemes, graphemes_approx, levenshtein,
                              score_sample, text_script)


def test_cer_wer_exact_hand_computed():
    # "kitten" -> "sitting": 3 edits over 6 reference graphemes (reference is "kitten")
    s = score_sample("sitting", "kitten")
    assert (s.char_edits, s.char_ref) == (3, 6) and s.cer == pytest.approx(0.5)
    # words: "the cat sat" vs "the hat sat on": 1 substitution + 1 deletion (ref has 4 words)
    s = score_sample("the hat sat", "the cat sat on")
    assert (s.word_edits, s.word_ref) == (2, 4) and s.wer == pytest.approx(0.5)
    assert s.exact == 0.0 and score_sample("abc", "abc").exact == 1.0


def test_corpus_cer_sums_edits_and_matches_training_cer():
    preds, refs = ["123", "4x", "", "99999"], ["1234", "45", "7", "9"]
    scores = [score_sample(p, r) for p, r in zip(preds, refs)]
    m = corpus_metrics(scores)
    # edits 1 + 1 + 1 + 4 = 7 over 4 + 2 + 1 + 1 = 8 reference characters (not the mean of per-sample rates)
    assert m["cer"] == pytest.approx(7 / 8)
    assert m["cer"] == pytest.approx(character_error_rate(preds, refs))
    assert m["exact"] == 0.0 and m["n"] == 4


@pytest.mark.parametrize("pred,refs,want", [
    ("abcd", ["abcd"], 1.0),
    ("abcx", ["abcd"], 0.75),            # NL = 1/4 < 0.5 -> 1 - 0.25
    ("abxx", ["abcd"], 0.0),             # NL = 2/4 = 0.5: at the threshold -> 0
    ("abcxy", ["abcde"], 0.6),           # NL = 2/5 = 0.4 -> 0.6
    ("abxx", ["zzzz", "abxd"], 0.75),    # max over references
    ("", [""], 1.0),                     # two empty strings are identical
    ("abc", [""], 0.0),                  # empty reference, non-empty answer: NL = 1
    ("", ["abc"], 0.0),
])
def test_anls_threshold_and_empty(pred, refs, want):
    assert anls(pred, refs) == pytest.approx(want)


def test_empty_reference_rates_do_not_divide_by_zero():
    s = score_sample("ab", "")
    assert (s.char_edits, s.char_ref, s.cer) == (2, 0, 2.0)
    assert score_sample("", "").cer == 0.0 and score_sample("", "").exact == 1.0


@pytest.mark.parametrize("norm,pred,ref,cer", [
    ("raw", "Hello, World", "hello world", 3 / 11),       # H/h, W/w substitutions + the comma
    ("case", "Hello, World", "hello world", 1 / 11),
    ("punct", "Hello, World", "hello world", 2 / 11),     # H/h, W/w
    ("all", "Hello,   World!", "hello world", 0.0),
    ("whitespace", " a  b ", "a b", 0.0),
    ("nfkc", "\uff21\uff22\ufb01", "ABfi", 0.0),           # full-width A, B and the fi ligature fold
    ("raw", "\uff21\uff22\ufb01", "ABfi", 1.0),            # 3 substitutions + 1 insertion over 4
])
def test_normalisation_variants(norm, pred, ref, cer):
    assert score_sample(pred, ref, norm).cer == pytest.approx(cer)


def test_graphemes_of_several_code_points():
    # Devanagari "नमस्ते": न म स्  ते -> UAX #29 clusters: न, म, स्, ते (virama and vowel sign attach)
    word = "\u0928\u092e\u0938\u094d\u0924\u0947"
    assert len(word) == 6
    g = graphemes(word)
    assert "".join(g) == word and len(g) < len(word)
    # decomposed "é" (e + U+0301): one grapheme; dropping the accent is one substitution, not one deletion of 2
    e_acute = "e\u0301"
    assert graphemes("caf" + e_acute) == ["c", "a", "f", e_acute]
    s = score_sample("cafe", "caf" + e_acute)
    assert (s.char_edits, s.char_ref) == (1, 4)             # code points would say 1 edit over 5
    assert character_error_rate(["cafe"], ["caf" + e_acute]) == pytest.approx(1 / 5)
    # the fallback (combining marks join the previous cluster) agrees on these
    assert graphemes_approx("caf" + e_acute) == ["c", "a", "f", e_acute]
    assert graphemes_approx("\u0924\u0947") == ["\u0924\u0947"]


def test_non_latin_cer_hand_computed():
    # Greek: "λόγος" vs "λογος" (no tonos, precomposed ό U+03CC): one substitution over 5
    assert score_sample("λογος", "λόγος").cer == pytest.approx(1 / 5)
    # Cyrillic word error: "быть он" vs "быть она": 1 of 2 words, 1 of 8 graphemes
    s = score_sample("быть он", "быть она")
    assert s.wer == pytest.approx(0.5) and s.cer == pytest.approx(1 / 8)
    assert levenshtein("быть", "бить") == 1


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    scores = [score_sample(p, r) for p, r in [("12", "12"), ("1", "12"), ("33", "34"), ("5", "5"), ("", "9")]]
    a, b = bootstrap_ci(scores, n_boot=200, seed=3), bootstrap_ci(scores, n_boot=200, seed=3)
    assert a == b
    m = corpus_metrics(scores)
    for k in ("cer", "exact", "anls"):
        lo, hi = a[k]
        assert lo <= m[k] <= hi and lo < hi
    assert bootstrap_ci(scores, n_boot=200, seed=4) != a
    # identical samples: every resample gives the same corpus value, so the interval is that point
    same = bootstrap_ci([score_sample("1x", "12")] * 7, n_boot=50)
    assert same["cer"] == (0.5, 0.5) and same["anls"] == (0.0, 0.0)  # NL = 1/2 is at the threshold: ANLS 0


@pytest.mark.parametrize("text,script", [("12 34", "Common"), ("word 12", "Latin"), ("λόγος", "Greek"),
                                         ("и в", "Cyrillic"), ("the и", "Mixed")])
def test_text_script(text, script):
    assert text_script(text) == script
