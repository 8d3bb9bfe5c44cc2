"""Text metrics for generated answers: character error rate (CER).

CER = total Levenshtein edit distance (insertions, deletions, substitutions; Levenshtein 1966) / total reference
characters, over the whole corpus, the usual OCR metric.
"""
from __future__ import annotations

from .ocr_metrics import levenshtein


def character_error_rate(predictions: list[str], references: list[str]) -> float:
    """Corpus CER: total Levenshtein edits / total reference characters.

    Args:
        predictions, references: equal-length lists of strings.
    """
    if len(predictions) != len(references):
        raise ValueError(f"CER: {len(predictions)} predictions vs {len(references)} references")
    edits = sum(levenshtein(p, r) for p, r in zip(predictions, references))
    return edits / max(1, sum(len(r) for r in references))

