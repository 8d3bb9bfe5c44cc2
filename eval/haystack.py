"""Haystacks and needles for the video needle tasks (eval/tasks/): where the frames come from and how needles look.

A haystack is `n` frames (H, W, 3) uint8 with a time in seconds each, from one of three sources
(`HaystackConfig`): smooth random colour fields (synthetic, no downloads), a folder of images (sorted by name,
cycled), or a local video file sampled at `fps` with the processor's own plan (model/processing/geometry.py) and
decoder (model/processing/video_decode.py), so frame times are the container's and the prompt's `<t seconds>`
equal what the processor assigns to the same file. Needles are rendered text frames (`text_frame`) or an image
file. A needle is inserted as a PAIR of frames starting at an even index: two consecutive frames share one temporal
group (temporal_patch_size = 2), so a one-frame needle would be fused with a haystack neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model.processing.prompt import timestamp_text
from model.processing.video_sampling import group_timestamps


@dataclass
class HaystackConfig:
    """Where haystack frames come from: `video` (a local file, sampled at `fps`), else `frames_dir`, else synthetic.

    Args:
        video: path of a local video file; fps: sampling rate (frames per second; synthetic / folder frames are
            placed at i / fps seconds); frames_dir: a folder of .png / .jpg frames; frame_size: side in pixels of
            every frame (and needle) handed to the processor; needle_image: an image file shown as the needle
            (tasks that ask for a number still render its text under the image).
    """

    video: str | None = None
    fps: float = 1.0
    frames_dir: str | None = None
    frame_size: int = 64
    needle_image: str | None = None

    def __post_init__(self):
        from model.config import ConfigError

        if not (isinstance(self.fps, (int, float)) and not isinstance(self.fps, bool) and self.fps > 0):
            raise ConfigError(f"config: haystack.fps={self.fps!r} is invalid; expected a number > 0")
        if not (isinstance(self.frame_size, int) and self.frame_size >= 1):
            raise ConfigError(f"config: haystack.frame_size={self.frame_size!r} is invalid; expected an int >= 1")


def haystack(n: int, cfg: HaystackConfig, rng: np.random.Generator, proc=None) -> tuple[list[np.ndarray], list[float]]:
    """n frames (H, W, 3) uint8 of side cfg.frame_size and their times in seconds."""
    s = cfg.frame_size
    if cfg.video:
        return video_frames(cfg.video, n, cfg.fps, s, proc)
    times = [i / cfg.fps for i in range(n)]
    if cfg.frames_dir:
        files = sorted(p for p in Path(cfg.frames_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"frames_dir {cfg.frames_dir} holds no .png/.jpg frames")
        return [np.array(Image.open(files[i % len(files)]).convert("RGB").resize((s, s))) for i in range(n)], times
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [np.array(Image.fromarray(c).resize((s, s), Image.BICUBIC)) for c in coarse], times


def video_frames(path: str, n: int, fps: float, size: int, proc) -> tuple[list[np.ndarray], list[float]]:
    """The first n frames of `path` sampled at `fps` by the processor's plan at its size for size x size, and their
    container times (frame index / stream rate, as the processor times them)."""
    from model.processing.video import plan_video_file
    from model.processing.video_decode import read_frames
    from model.processing.video_sampling import effective_fps

    opts = {"fps": fps, "max_frames": 1 << 30, "resized_height": size, "resized_width": size}
    meta, plan = plan_video_file(str(path), proc.video_config, rule=proc.video_rule, fps=fps,
                                 min_frames=proc.min_frames, max_frames=1 << 30, options=opts)
    if len(plan.frame_indices) < n:
        raise ValueError(f"haystack video {path}: {len(plan.frame_indices)} frames at {fps} fps, the cell needs {n}")
    idx = plan.frame_indices[:n]
    from model.processing.video import uses_uint8_kernel

    # (n, 3, h, w) uint8 at the planned size (the processor's kernel; size x size raised to its pixel floor), so
    # the processor's own resize of these frames is a no-op and the rows equal its rows for the file
    frames = read_frames(str(path), idx, size=plan.size, uint8_kernel=uses_uint8_kernel(proc.video_rule))
    vfps = effective_fps(meta.fps)
    return [f.permute(1, 2, 0).numpy() for f in frames], [i / vfps for i in idx]


def _font(px: int):
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"), px)
    except (ImportError, OSError):
        return ImageFont.load_default()


def text_frame(text: str, size: int, colour: str = "black", image: str | None = None) -> np.ndarray:
    """A white frame with `text` in large letters of `colour` (under `image`, scaled to the top half, if given)."""
    img = Image.new("RGB", (size, size), "white")
    top = 0
    if image:
        pic = Image.open(image).convert("RGB").resize((size, size // 2))
        img.paste(pic, (0, 0))
        top = size // 2
    draw = ImageDraw.Draw(img)
    font = _font(max(6, size // 9))
    lines = []
    for w in text.split():  # greedy line wrap
        if lines and draw.textlength(lines[-1] + " " + w, font=font) < size * 0.9:
            lines[-1] += " " + w
        else:
            lines.append(w)
    y = max(top, (top + size) // 2 - len(lines) * size // 18)
    for line in lines:
        draw.text((size * 0.05, y), line, fill=colour, font=font)
        y += size // 8
    return np.array(img)


def needle_slot(depth: float, n_frames: int) -> int:
    """First frame of a two-frame needle at relative `depth`: an even index, so the pair is one temporal group."""
    if n_frames < 2:
        raise ValueError(f"a video needle needs a haystack of at least 2 frames, got {n_frames}")
    groups = n_frames // 2
    return 2 * min(groups - 1, int(round(depth * (groups - 1))))


def other_slots(taken: list[int], k: int, n_frames: int, rng: np.random.Generator) -> list[int]:
    """k needle slots (even frame indices) not in `taken`, spread at random over the haystack."""
    free = [2 * g for g in range(n_frames // 2) if 2 * g not in taken]
    if len(free) < k:
        raise ValueError(f"a haystack of {n_frames} frames has {len(free)} free needle slots, {k} are needed")
    return sorted(int(s) for s in rng.choice(free, size=k, replace=False))


def video_case(proc, n_frames: int, rng: np.random.Generator, cfg, needles: list[dict], question: str,
               answer: str, kind: str, values: list, tolerance: float = 0.0, timestamps: bool = True):
    """Build a `Case` from a haystack and needles.

    Args:
        needles: {"slot": first frame (even), "image": (H, W, 3) uint8, "value": ..., "target": bool} per needle;
            each is written into frames slot and slot + 1.
        question: asked after the video; answer / kind / values / tolerance: as `eval.tasks.Case`.
        timestamps: False drops the `<t seconds>` text before each temporal group (the ablation of a model
            without text timestamps; positions are recomputed from the shorter prompt).
    """
    from .tasks import Case

    frames, times = haystack(n_frames, cfg.haystack, rng, proc)
    h, w = frames[0].shape[:2]
    for nd in needles:  # at the haystack's size (a video file's frames come at the processor's planned size)
        img = nd["image"] if nd["image"].shape[:2] == (h, w) else np.array(Image.fromarray(nd["image"]).resize((w, h)))
        frames[nd["slot"]] = frames[nd["slot"] + 1] = img
    s = cfg.haystack.frame_size
    item = {"type": "video", "video": frames, "timestamps": times, "resized_height": s, "resized_width": s}
    conv = [{"role": "user", "content": [item, {"type": "text", "text": question}]}]
    inputs = proc(messages=[conv], add_generation_prompt=True)
    # the processor's per-group times (the batch drops them): the mean of each group's first and last frame time
    inputs["video_timestamps"] = [group_timestamps(times, proc.video_config.temporal_patch_size)]
    if not timestamps:
        inputs = strip_timestamps(inputs, proc)
    recorded = [{"frame": nd["slot"], "group": nd["slot"] // 2, "value": nd["value"], "target": nd["target"],
                 "image": frames[nd["slot"]]} for nd in needles]
    return Case(inputs, answer, kind, values, tolerance, n_frames, recorded)


def strip_timestamps(inputs: dict, proc) -> dict:
    """The same prompt without the `<t seconds>` text before each video group (release layout)."""
    ids = inputs["input_ids"][0].tolist()
    out, g = [], 0
    stamps = [proc.tokenizer.encode(timestamp_text(t)) for t in inputs["video_timestamps"][0]]
    i = 0
    while i < len(ids):
        if g < len(stamps) and ids[i:i + len(stamps[g])] == stamps[g] and \
                i + len(stamps[g]) < len(ids) and ids[i + len(stamps[g])] == proc.vision_start_token_id:
            i += len(stamps[g])
            g += 1
            continue
        out.append(ids[i])
        i += 1
    if g != len(stamps):
        raise ValueError(f"found {g} of {len(stamps)} video timestamps in the prompt")
    return {**inputs, "input_ids": torch.tensor([out]), "attention_mask": torch.ones(1, len(out), dtype=torch.long)}
