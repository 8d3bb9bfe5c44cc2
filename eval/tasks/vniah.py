"""V-NIAH, needle in a video haystack (Zhang et al. 2024, LongVA; the protocol Qwen3-VL reports as a length x depth
heatmap): a haystack of frames sampled at `cfg.fps`, one needle frame inserted at a relative depth, a question whose
answer only the needle holds. The haystack is synthetic (smooth random colour fields, no downloads) and the needle
is a rendered frame "THE SECRET NUMBER IS 4821"; bring your own haystack frames with `needle.frames_dir`.
Sweep lengths count frames. Options: needle.frame_size, fps, frames_dir, question.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import register


def haystack_frames(n: int, size: int, rng: np.random.Generator, frames_dir: str | None = None) -> list[np.ndarray]:
    """n frames (H, W, 3) uint8: from frames_dir (cycled) or smooth random colour fields."""
    if frames_dir:
        files = sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"frames_dir {frames_dir} holds no .png/.jpg frames")
        return [np.array(Image.open(files[i % len(files)]).convert("RGB").resize((size, size))) for i in range(n)]
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [np.array(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse]


def needle_frame(text: str, size: int) -> np.ndarray:
    """A white frame with `text` in large black letters."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    try:
        import matplotlib

        font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"), size // 9)
    except (ImportError, OSError):
        font = ImageFont.load_default()
    words, lines = text.split(), []
    for w in words:  # greedy line wrap
        if lines and draw.textlength(lines[-1] + " " + w, font=font) < size * 0.9:
            lines[-1] += " " + w
        else:
            lines.append(w)
    y = size // 2 - len(lines) * size // 18
    for line in lines:
        draw.text((size * 0.05, y), line, fill="black", font=font)
        y += size // 8
    return np.array(img)


@register("vniah", unit="frames")
def video_case(proc, n_frames: int, depth: float, rng: np.random.Generator, cfg):
    """Processor inputs and gold answer for one V-NIAH cell."""
    frames = haystack_frames(n_frames, cfg.frame_size, rng, cfg.frames_dir)
    answer = str(rng.integers(1000, 10000))
    pos = min(n_frames - 1, int(round(depth * (n_frames - 1))))
    frames[pos] = needle_frame(f"THE SECRET NUMBER IS {answer}", cfg.frame_size)
    item = {"type": "video", "video": frames, "timestamps": [i / cfg.fps for i in range(n_frames)],
            "resized_height": cfg.frame_size, "resized_width": cfg.frame_size}
    conv = [{"role": "user", "content": [item, {"type": "text", "text": cfg.question}]}]
    return proc(messages=[conv], add_generation_prompt=True), answer
