"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden at a relative depth in repeated filler text.
Sweep lengths count (approximate) prompt tokens; a 1M-token cell needs the chunked path (needle.chunk_size).
"""
from __future__ import annotations

import numpy as np

from . import Case, register

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@register("passkey", unit="tokens")
def passkey_case(proc, n_tokens: int, depth: float, rng: np.random.Generator, cfg):
    """Processor inputs and gold answer for one passkey cell (prompt of about n_tokens tokens)."""
    answer = str(rng.integers(10000, 100000))
    per = max(1, len(proc.tokenizer.encode(FILLER)))
    reps = max(1, n_tokens // per)
    cut = int(round(depth * reps))
    needle = f"The pass key is {answer}. Remember it. {answer} is the pass key. "
    text = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + FILLER * cut + needle + FILLER * (reps - cut) + "What is the pass key? Answer with the number only.")
    conv = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return Case(proc(messages=[conv], add_generation_prompt=True), answer, "number", [int(answer)])
