"""Multi-needle V-NIAH: k needles (`extra.k`, default 3), each a pair of frames "THE SECRET NUMBER IS ....", the
first at the cell's depth and the others at random other depths; the model lists every number in order of
appearance. Reported per cell: recall of all k (the cell's accuracy) and of each needle (in order of appearance).
"""
from __future__ import annotations

import numpy as np

from ..haystack import needle_slot, other_slots, text_frame, video_case
from . import register
from .vniah import secret


@register("multi_needle", unit="frames")
def multi_needle_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg):
    """One multi-needle prompt: k number frame pairs; the answer lists them in order of appearance."""
    hs = cfg.haystack
    k = int(cfg.extra.get("k", 3))
    first = needle_slot(depth, n_frames)
    slots = sorted([first] + other_slots([first], k - 1, n_frames, rng))
    values, needles = [], []
    for s in slots:
        a = secret(rng, values)
        values.append(a)
        needles.append({"slot": s, "value": a, "target": True,
                        "image": text_frame(f"THE SECRET NUMBER IS {a}", hs.frame_size, image=hs.needle_image)})
    question = (f"{k} frames of the video each show a secret number. List all {k} secret numbers in the order they "
                "appear, separated by commas.")
    return video_case(proc, n_frames, rng, cfg, needles, question, ", ".join(map(str, values)), "numbers", values,
                      timestamps=cfg.timestamps)
