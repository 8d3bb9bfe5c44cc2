"""Prompt layout: vision placeholders expanded to pad runs, with a `<t seconds>` timestamp per video temporal group.

The chat template leaves one `<|vision_start|><|image_pad|><|vision_end|>` (or `...<|video_pad|>...`) per media
item. An image pad becomes grid_t * grid_h * grid_w / merge_size**2 pads. A video becomes, per temporal group,
`<t seconds><|vision_start|>` + `<|video_pad|>` x (grid_h * grid_w / merge_size**2) + `<|vision_end|>`
(Text-Timestamp Alignment, transformers' `Qwen3VLProcessor`). Two layouts of that expansion:
- "release" (release-time transformers 4.57 / vLLM, the default) replaces the whole
  `<|vision_start|><|video_pad|><|vision_end|>` triplet;
- "transformers5" replaces only the pad, keeping an outer `<|vision_start|>` ... `<|vision_end|>` around the groups.
"""
from __future__ import annotations

import re

LAYOUTS = ("release", "transformers5")
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


def timestamp_text(t: float) -> str:
    """The TTA marker before a temporal group: "<{t:.1f} seconds>" (Python round-half-even formatting)."""
    return f"<{t:.1f} seconds>"


def video_prompt(grid_thw, timestamps, merge_size: int) -> str:
    """The text replacing one video placeholder: per temporal group `<t seconds><|vision_start|>pads<|vision_end|>`.

    Args:
        grid_thw: (t, h, w) patch grid; timestamps: seconds per temporal group (len t).
    """
    per_group = grid_thw[1] * grid_thw[2] // merge_size ** 2
    return "".join(timestamp_text(t) + VISION_START + VIDEO_PAD * per_group + VISION_END for t in timestamps)


def expand_placeholders(text: str, image_grids: list, videos: list, *, image_merge_size: int, video_merge_size: int,
                        layout: str = "release", where: str = "text") -> str:
    """Replace image / video placeholders in `text` by their pad runs (and timestamps), checking counts.

    Args:
        image_grids: image_grid_thw rows (t, h, w) in placeholder order.
        videos: per video in order, anything with `grid_thw` and `timestamps` (a VideoPlan or VideoFeatures).
        layout: "release" or "transformers5" (module docstring).
        where: names the sample in error messages.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"video layout must be one of {LAYOUTS}, got {layout!r}")
    n_img, n_vid = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
    if n_img != len(image_grids) or n_vid != len(videos):
        raise ValueError(
            f"{where}: the prompt has {n_img} image and {n_vid} video placeholders but {len(image_grids)} images and "
            f"{len(videos)} videos were given")
    m2 = image_merge_size ** 2
    parts = text.split(IMAGE_PAD)
    text = parts[0] + "".join(IMAGE_PAD * (t * h * w // m2) + p for (t, h, w), p in zip(image_grids, parts[1:]))
    if layout == "release":
        pattern = re.escape(VISION_START + VIDEO_PAD + VISION_END) + "|" + re.escape(VIDEO_PAD)
    else:
        pattern = re.escape(VIDEO_PAD)
    parts = re.split(pattern, text)
    return parts[0] + "".join(video_prompt(v.grid_thw, v.timestamps, video_merge_size) + p
                              for v, p in zip(videos, parts[1:]))
