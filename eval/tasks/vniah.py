"""V-NIAH, needle in a video haystack (Zhang et al. 2024, LongVA, arXiv:2406.16852; the protocol Qwen3-VL reports
as a length x depth heatmap): a haystack of frames sampled at `haystack.fps`, one needle -- a rendered frame
"THE SECRET NUMBER IS 4821", inserted as a pair of frames (one temporal group, eval/haystack.py) -- at a relative
depth, and a question only the needle answers. Sweep lengths count frames.
"""
from __future__ import annotations

import numpy as np

from ..haystack import needle_slot, text_frame, video_case
from . import register


def secret(rng: np.random.Generator, avoid=()) -> int:
    """A 4-digit secret number not in `avoid`."""
    while (a := int(rng.integers(1000, 10000))) in avoid:
        pass
    return a


@register("vniah", unit="frames")
def vniah_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg):
    """One V-NIAH prompt: the needle pair at `depth`, the question `cfg.question`."""
    hs = cfg.haystack
    a = secret(rng)
    needle = {"slot": needle_slot(depth, n_frames), "value": a, "target": True,
              "image": text_frame(f"THE SECRET NUMBER IS {a}", hs.frame_size, image=hs.needle_image)}
    return video_case(proc, n_frames, rng, cfg, [needle], cfg.question, str(a), "number", [a],
                      timestamps=cfg.timestamps)
