"""Second-level temporal localisation: "at what time does the frame showing X appear?" (Qwen3-VL's text-timestamp
alignment claim, arXiv:2511.21631). A needle pair (one temporal group) with a rendered word sits at a relative depth;
the gold answer is the time the processor assigns to that group -- the mean of its two frame times, the `<t seconds>`
text the release prompt layout writes before it. A generated answer is right when |error| <= 1 s and <= one
sampling interval (1 / haystack.fps); the sweep also reports the mean absolute error. `needle.timestamps=false`
removes the timestamp text (the ablation of a model without it; the question states the sampling rate, so the
time is still answerable by counting groups).
"""
from __future__ import annotations

import numpy as np

from ..haystack import needle_slot, text_frame, video_case
from . import register

WORDS = ("GIRAFFE", "LIGHTHOUSE", "VOLCANO", "TELESCOPE", "PINEAPPLE", "SUBMARINE", "WINDMILL", "CACTUS")


@register("temporal", unit="frames")
def temporal_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg):
    """One localisation prompt: a word frame pair at `depth`; the answer is its group's time in seconds."""
    hs = cfg.haystack
    word = WORDS[int(rng.integers(len(WORDS)))]
    slot = needle_slot(depth, n_frames)
    needle = {"slot": slot, "value": None, "target": True,
              "image": text_frame(f"THE WORD IS {word}", hs.frame_size, image=hs.needle_image)}
    question = (f"The video is sampled at {hs.fps:g} frames per second. At what time, in seconds from the start, "
                f"does the frame showing the word {word} appear? Answer with the number of seconds only.")
    case = video_case(proc, n_frames, rng, cfg, [needle], question, "", "time", [],
                      tolerance=min(1.0, 1.0 / hs.fps), timestamps=cfg.timestamps)
    t = float(case.inputs["video_timestamps"][0][slot // 2])
    case.answer, case.values = f"{t:.1f}", [t]
    case.needles[0]["value"] = t
    return case
