"""V-NIAH-D, V-NIAH with distractors (Wei et al. 2025, VideoRoPE, arXiv:2502.05173, section 5): besides the
needle, the haystack holds distractor frames that look like it -- the same "THE SECRET NUMBER IS ...." layout --
but differ in the attribute the question asks for (the text colour: the needle's is `extra.colour`, the
distractors' `extra.distractor_colour`), at other random depths. A model that retrieves "a number-like frame"
instead of the asked one answers a distractor's number. Options: extra.distractors (count, default 2).
"""
from __future__ import annotations

import numpy as np

from ..haystack import needle_slot, other_slots, text_frame, video_case
from . import register
from .vniah import secret


@register("vniah_d", unit="frames")
def vniah_d_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg):
    """One V-NIAH-D prompt: the needle pair at `depth` and `extra.distractors` look-alike pairs elsewhere."""
    hs, ex = cfg.haystack, cfg.extra
    colour, other = ex.get("colour", "red"), ex.get("distractor_colour", "blue")
    slot = needle_slot(depth, n_frames)
    a = secret(rng)
    needles = [{"slot": slot, "value": a, "target": True,
                "image": text_frame(f"THE SECRET NUMBER IS {a}", hs.frame_size, colour, hs.needle_image)}]
    used = {a}
    for s in other_slots([slot], int(ex.get("distractors", 2)), n_frames, rng):
        d = secret(rng, used)
        used.add(d)
        needles.append({"slot": s, "value": d, "target": False,
                        "image": text_frame(f"THE SECRET NUMBER IS {d}", hs.frame_size, other, hs.needle_image)})
    question = (f"Some frames show a secret number. What is the secret number written in {colour}? "
                "Answer with the number only.")
    return video_case(proc, n_frames, rng, cfg, needles, question, str(a), "number", [a], timestamps=cfg.timestamps)
