"""OCR metrics: CER, WER, exact match and ANLS, per sample and over a corpus, with normalisation variants and
seeded bootstrap confidence intervals.

- Edit distance is Levenshtein's (1966) over *grapheme clusters* (Unicode UAX #29 extended grapheme clusters,
  via the `regex` package's `\\X`), so a letter written as base + combining marks ("e" + U+0301, Devanagari
  consonant + vowel sign) counts as one character, as a reader sees it. Without `regex` a documented approximation
  is used: a code point of category M* (combining mark) joins the cluster before it. For text where every
  grapheme is one code point (digits, precomposed Latin / Greek / Cyrillic) both equal code-point CER, which is
  what training reports (eval/metrics.py).
- CER = edits / reference graphemes; WER the same over whitespace-split words. Corpus CER / WER sum the edits
  and the reference lengths over all samples (the usual OCR convention), not the mean of per-sample rates.
- ANLS (Biten et al. 2019, "Scene Text Visual Question Answering"; the DocVQA metric): per sample
  max over references of 1 - NL(pred, ref), where NL = edit distance / max(len(pred), len(ref)), set to 0 when
  NL >= 0.5 (the threshold tau = 0.5); the corpus score is the mean. DocVQA lower-cases and strips; here that is
  the `normalise` choice of the caller (the "docvqa" variant).
- Normalisation variants (NORMALISERS): raw; nfkc (Unicode NFKC: full-width and ligature forms fold);
  case (casefold); whitespace (collapse runs, strip); punct (drop Unicode P* characters; symbols S* such as
  $ + = stay); all (nfkc + case + punct + whitespace).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

try:
    import regex as _regex  # UAX #29 grapheme clusters via \X
except ImportError:  # pragma: no cover - the approximation below is tested directly
    _regex = None

ANLS_THRESHOLD = 0.5


# ----------------------------------------------------------------------------------------------- normalisation
def _nfkc(s: str) -> str:
    return unicodedata.normalize("NFKC", s)


def _whitespace(s: str) -> str:
    return " ".join(s.split())


def _punct(s: str) -> str:
    return "".join(c for c in s if not unicodedata.category(c).startswith("P"))


def _all(s: str) -> str:
    return _whitespace(_punct(_nfkc(s).casefold()))


NORMALISERS: dict[str, Callable[[str], str]] = {
    "raw": lambda s: s,
    "nfkc": _nfkc,
    "case": str.casefold,
    "whitespace": _whitespace,
    "punct": _punct,
    "all": _all,
}


# ----------------------------------------------------------------------------------------------- edit distance
def graphemes(s: str) -> list[str]:
    """Extended grapheme clusters of `s` (UAX #29 via `regex`; else base + following combining marks)."""
    if _regex is not None:
        return _regex.findall(r"\X", s)
    return graphemes_approx(s)


def graphemes_approx(s: str) -> list[str]:
    """The fallback clustering: each code point of category M* (Mn, Mc, Me) or a zero-width joiner / variation
    selector joins the previous cluster. Misses Hangul jamo sequences, emoji ZWJ sequences' joined pictographs and
    regional-indicator pairs, which UAX #29 groups."""
    out: list[str] = []
    for c in s:
        if out and (unicodedata.category(c).startswith("M") or c == "\u200d" or "\ufe00" <= c <= "\ufe0f"
                    or (out[-1].endswith("\u200d"))):
            out[-1] += c
        else:
            out.append(c)
    return out


def levenshtein(a: list | str, b: list | str) -> int:
    """Levenshtein distance (unit insert / delete / substitute) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------------------------- per sample
@dataclass(frozen=True)
class SampleScore:
    """One sample under one normalisation: edit counts (for corpus rates) and the per-sample scores.

    char_edits / char_ref: grapheme edits and reference graphemes; word_edits / word_ref: the same over words;
    cer / wer: per-sample rates (edits / max(1, ref length)); exact: 1.0 if equal; anls: the DocVQA score."""
    char_edits: int
    char_ref: int
    word_edits: int
    word_ref: int
    cer: float
    wer: float
    exact: float
    anls: float


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one answer: max over references of 1 - NL (0 where NL >= threshold); NL over graphemes.

    Two empty strings score 1 (identical); an empty reference against a non-empty answer scores 0."""
    best = 0.0
    p = graphemes(prediction)
    for ref in references:
        r = graphemes(ref)
        n = max(len(p), len(r))
        nl = levenshtein(p, r) / n if n else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def score_sample(prediction: str, references: str | list[str], normalise: str = "raw") -> SampleScore:
    """Score one prediction against its reference(s) after the named normalisation.

    CER / WER / exact use the first reference (OCR has one transcription); ANLS takes the max over all.
    Args:
        prediction: model output.  references: one string or a list (ANLS).  normalise: a key of NORMALISERS.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("score_sample: no reference")
    f = NORMALISERS[normalise]
    p, rs = f(prediction), [f(r) for r in refs]
    pg, rg = graphemes(p), graphemes(rs[0])
    pw, rw = p.split(), rs[0].split()
    ce, we = levenshtein(pg, rg), levenshtein(pw, rw)
    return SampleScore(char_edits=ce, char_ref=len(rg), word_edits=we, word_ref=len(rw),
                       cer=ce / max(1, len(rg)), wer=we / max(1, len(rw)), exact=float(p == rs[0]),
                       anls=anls(p, rs))


# ----------------------------------------------------------------------------------------------- corpus
def corpus_metrics(scores: list[SampleScore]) -> dict[str, float]:
    """Corpus CER / WER (summed edits / summed reference lengths), mean exact match and mean ANLS."""
    if not scores:
        return {"cer": float("nan"), "wer": float("nan"), "exact": float("nan"), "anls": float("nan"), "n": 0}
    n = len(scores)
    return {"cer": sum(s.char_edits for s in scores) / max(1, sum(s.char_ref for s in scores)),
            "wer": sum(s.word_edits for s in scores) / max(1, sum(s.word_ref for s in scores)),
            "exact": sum(s.exact for s in scores) / n, "anls": sum(s.anls for s in scores) / n, "n": n}


def bootstrap_ci(scores: list[SampleScore], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (Efron 1979) confidence intervals of `corpus_metrics`: resample the samples with
    replacement `n_boot` times (seeded numpy Generator) and take the alpha/2 and 1 - alpha/2 quantiles
    (numpy's default linear interpolation) of each metric."""
    import numpy as np

    if not scores or n_boot <= 0:
        return {}
    cols = {k: np.array([getattr(s, k) for s in scores], dtype=np.float64)
            for k in ("char_edits", "char_ref", "word_edits", "word_ref", "exact", "anls")}
    idx = np.random.default_rng(seed).integers(0, len(scores), size=(n_boot, len(scores)))  # (n_boot, n)
    sums = {k: v[idx].sum(1) for k, v in cols.items()}                                     # (n_boot,) each
    draws = {"cer": sums["char_edits"] / np.maximum(1, sums["char_ref"]),
             "wer": sums["word_edits"] / np.maximum(1, sums["word_ref"]),
             "exact": sums["exact"] / len(scores), "anls": sums["anls"] / len(scores)}
    return {k: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) for k, v in draws.items()}


# ----------------------------------------------------------------------------------------------- scripts
_SCRIPT_NAME = re.compile(r"^([A-Z]+)")
_SCRIPT_ALIASES = {"HANGUL": "Hangul", "CJK": "Han", "HIRAGANA": "Hiragana", "KATAKANA": "Katakana"}


def char_script(c: str) -> str | None:
    """The script of a letter from its Unicode name's first word ("GREEK SMALL LETTER ALPHA" -> "Greek");
    None for digits, punctuation, spaces and symbols (the Common script)."""
    if not unicodedata.category(c).startswith(("L", "M")):
        return None
    name = unicodedata.name(c, "")
    m = _SCRIPT_NAME.match(name)
    if not m:
        return None
    word = m.group(1)
    return _SCRIPT_ALIASES.get(word, word.capitalize())


def text_script(s: str) -> str:
    """The script label of a reference: its one letter script, "Mixed" for several, "Common" for none
    (digits / punctuation only)."""
    found = {char_script(c) for c in s} - {None}
    if not found:
        return "Common"
    return found.pop() if len(found) == 1 else "Mixed"

