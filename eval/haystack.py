"""Haystacks and needles for the video needle tasks (eval/tasks/): where the frames come from and how needles look.

A haystack is `n` frames (H, W, 3) uint8 with a time in seconds each, from one of three sources
(`HaystackConfig`): smooth random colour fields (synthetic, no downloads), a folder of images (sorted by name,
cycled), or a local video file sampled at `fps` with the processor's own plan (model/processing/geometry.py) and
decoder (model/processing/video_decode.py), so frame times are the container's and the prompt's `<t seconds>`
equal what the processor assigns to the same file. Needles are rendered text frames (`text_frame`) or an image
file. A needle is inserted as a PAIR of frames starting at an even index: two consecutive frames share one temporal
group (temporal_patch_size = 2), so a one-frame needle would be fused with a haystack neighbour.
The frames are a lazy sequence (`HaystackFrames`, made one at a time as they are read), so a streamed cell
(needle.stream, `video_case`) never holds the whole haystack.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class HaystackFrames(Sequence):
    """The n frames of a haystack, with needle frames inserted, made one at a time when they are read.

    A sequence of (H, W, 3) uint8 frames that never holds more than the frame asked for (a synthetic frame is
    drawn from its 4 x 4 colour seed, a folder frame read from its file, a video frame decoded on iteration), so a
    long haystack can be streamed to the processor chunk by chunk (model/processing/stream.py); `list(frames)`
    materialises it. `times` are the frames' times in seconds, `size` (H, W).

    Args:
        n: frames; cfg: where they come from (`HaystackConfig`); rng: draws the synthetic colour seeds (n x 48
            bytes, drawn here, so the generator's state afterwards does not depend on how the frames are read);
        proc: the processor (plans a video file haystack).
    """

    def __init__(self, n: int, cfg: HaystackConfig, rng: np.random.Generator, proc=None):
        s = cfg.frame_size
        self.n, self.cfg, self.needles = n, cfg, {}
        self._coarse = self._files = self._video = None
        if cfg.video:
            self._video = _plan_video_frames(cfg.video, n, cfg.fps, s, proc)  # (path, frame indices, size, uint8)
            self.size, self.times = self._video[2], self._video[4]
        else:
            self.size, self.times = (s, s), [i / cfg.fps for i in range(n)]
            if cfg.frames_dir:
                self._files = sorted(p for p in Path(cfg.frames_dir).iterdir()
                                     if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
                if not self._files:
                    raise FileNotFoundError(f"frames_dir {cfg.frames_dir} holds no .png/.jpg frames")
            else:
                self._coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)

    def insert(self, slot: int, image: np.ndarray) -> np.ndarray:
        """Show `image` (resized to the haystack's size) in frames slot and slot + 1; returns it as shown."""
        h, w = self.size
        img = image if image.shape[:2] == (h, w) else np.array(Image.fromarray(image).resize((w, h)))
        self.needles[slot] = self.needles[slot + 1] = img
        return img

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"haystack frame {i} out of range ({self.n} frames)")
        i %= self.n
        if i in self.needles:
            return self.needles[i]
        if self._video is not None:
            path, idx, size, uint8, _ = self._video
            from model.processing.video_decode import read_frames

            return read_frames(path, [idx[i]], size=size, uint8_kernel=uint8)[0].permute(1, 2, 0).numpy()
        return self._frame(i)

    def _frame(self, i: int) -> np.ndarray:
        s = self.cfg.frame_size
        if self._files is not None:
            return np.array(Image.open(self._files[i % len(self._files)]).convert("RGB").resize((s, s)))
        return np.array(Image.fromarray(self._coarse[i]).resize((s, s), Image.BICUBIC))

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every frame in order; a video file is decoded in one sequential pass."""
        if self._video is None:
            for i in range(self.n):
                yield self.needles[i] if i in self.needles else self._frame(i)
            return
        from model.processing.video_decode import iter_frames

        path, idx, size, uint8, _ = self._video
        frames = iter_frames(path, idx, size=size, uint8_kernel=uint8)
        try:
            for i, f in enumerate(frames):
                yield self.needles[i] if i in self.needles else f.permute(1, 2, 0).numpy()
        finally:
            frames.close()


def haystack(n: int, cfg: HaystackConfig, rng: np.random.Generator, proc=None) -> tuple[list[np.ndarray], list[float]]:
    """n frames (H, W, 3) uint8 of side cfg.frame_size and their times in seconds (`HaystackFrames`, materialised)."""
    frames = HaystackFrames(n, cfg, rng, proc)
    return list(frames), frames.times


def _plan_video_frames(path: str, n: int, fps: float, size: int, proc):
    """The first n frames of `path` sampled at `fps` by the processor's plan at its size for size x size:
    (path, frame indices, (h, w), uint8 resize kernel, container times (frame index / stream rate, as the
    processor times them)). Frames are decoded at the planned size (the processor's kernel; size x size raised to
    its pixel floor), so the processor's own resize of them is a no-op and the rows equal its rows for the file."""
    from model.processing.video import plan_video_file, uses_uint8_kernel
    from model.processing.video_sampling import effective_fps

    opts = {"fps": fps, "max_frames": 1 << 30, "resized_height": size, "resized_width": size}
    meta, plan = plan_video_file(str(path), proc.video_config, rule=proc.video_rule, fps=fps,
                                 min_frames=proc.min_frames, max_frames=1 << 30, options=opts)
    if len(plan.frame_indices) < n:
        raise ValueError(f"haystack video {path}: {len(plan.frame_indices)} frames at {fps} fps, the cell needs {n}")
    idx = plan.frame_indices[:n]
    vfps = effective_fps(meta.fps)
    return str(path), idx, tuple(plan.size), uses_uint8_kernel(proc.video_rule), [i / vfps for i in idx]


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

    With `cfg.streams` (needle.stream, eval/niah.py) the Case holds no pixel: `case.stream` is a
    `model.processing.stream.VideoStream` over the lazy frames (`HaystackFrames`) and `case.inputs` the prompt's
    input_ids, video_grid_thw and video_timestamps, built from the plan alone; the scorer (eval/scoring.py) then
    decodes, patchifies and prefills the video a chunk of temporal groups at a time. Both give the same ids,
    grid, timestamps and (concatenated over the chunks) pixel rows.

    Args:
        needles: {"slot": first frame (even), "image": (H, W, 3) uint8, "value": ..., "target": bool} per needle;
            each is written into frames slot and slot + 1.
        question: asked after the video; answer / kind / values / tolerance: as `eval.tasks.Case`.
        timestamps: False drops the `<t seconds>` text before each temporal group (the ablation of a model
            without text timestamps; positions are recomputed from the shorter prompt).
    """
    from .tasks import Case

    frames = HaystackFrames(n_frames, cfg.haystack, rng, proc)
    # at the haystack's size (a video file's frames come at the processor's planned size)
    shown = [frames.insert(nd["slot"], nd["image"]) for nd in needles]
    s = cfg.haystack.frame_size
    options = {"timestamps": frames.times, "resized_height": s, "resized_width": s}
    stream = None
    if getattr(cfg, "streams", False):
        from model.processing.stream import VideoStream

        stream = VideoStream(proc, frames, options)
        prefix, suffix = stream.prompt_parts(question)
        ids = torch.cat([prefix, stream.video_ids(), suffix])[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "video_grid_thw": torch.tensor([list(stream.grid_thw)])}
    else:
        conv = [{"role": "user", "content": [{"type": "video", "video": list(frames), **options},
                                             {"type": "text", "text": question}]}]
        inputs = proc(messages=[conv], add_generation_prompt=True)
    # the processor's per-group times (the batch drops them): the mean of each group's first and last frame time
    inputs["video_timestamps"] = [group_timestamps(frames.times, proc.video_config.temporal_patch_size)]
    if not timestamps:
        inputs = strip_timestamps(inputs, proc)
    recorded = [{"frame": nd["slot"], "group": nd["slot"] // 2, "value": nd["value"], "target": nd["target"],
                 "image": img} for nd, img in zip(needles, shown)]
    return Case(inputs, answer, kind, values, tolerance, n_frames, recorded, stream)


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
