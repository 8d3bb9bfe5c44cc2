"""Video frame sampling: which source frames to read, and the seconds each temporal group stands for.

Two rules, chosen with `rule=`:
- "transformers": transformers 5's `Qwen3VLVideoProcessor.sample_frames`:
  n = min(max(int(total / video_fps * fps), min_frames), max_frames, total), indices = round(linspace(0, total-1, n));
- "qwen-vl-utils": qwen-vl-utils 0.0.14 `smart_nframes` (even n in [ceil2(min_frames), floor2(min(max_frames,
  total))], float32 linspace) with optional `video_start` / `video_end` seconds (`calculate_video_frame_range`).
Frame i of a video shows time i / video_fps; a container that reports no frame rate is taken to run at 24 fps, as
transformers assumes (`effective_fps`). Text-Timestamp Alignment: each temporal group of `temporal_patch_size` frames
gets the mean of its first and last frame time (transformers' `Qwen3VLProcessor._calculate_timestamps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, RULES

ASSUMED_VIDEO_FPS = 24.0  # frame rate of a video whose container reports none (transformers' assumption)


def effective_fps(fps: float | None) -> float:
    """The frame rate to sample and time a video by: its own, or ASSUMED_VIDEO_FPS when unknown (None / 0)."""
    return fps or ASSUMED_VIDEO_FPS


@dataclass
class VideoMetadata:
    """What the container says about a video stream.

    Args:
        total_num_frames: frames in the stream; fps: average frame rate (None when unknown);
        height, width: coded size; path: source file.
    """

    total_num_frames: int
    fps: float | None
    height: int
    width: int
    path: str | None = None

    @property
    def duration(self) -> float:
        """Seconds, from the frame count and rate (0 when the rate is unknown)."""
        return self.total_num_frames / self.fps if self.fps else 0.0


def frame_range(total_frames: int, video_fps: float, start: float | None = None, end: float | None = None):
    """First and last frame index inside [start, end] seconds (qwen-vl-utils' calculate_video_frame_range).

    Returns:
        (start_frame, end_frame) inclusive.
    """
    if start is None and end is None:
        return 0, total_frames - 1
    if not video_fps or video_fps <= 0:
        raise ValueError("video_start / video_end need the video's fps, which is unknown")
    max_duration = total_frames / video_fps
    s = math.ceil(max(0.0, min(start, max_duration)) * video_fps) if start is not None else 0
    e = min(math.floor(max(0.0, min(end, max_duration)) * video_fps), total_frames - 1) if end is not None else total_frames - 1
    if s >= e:
        raise ValueError(f"empty time range [{start}, {end}] s for a {max_duration:.2f} s video ({total_frames} frames)")
    return s, e


def sample_frame_indices(
    total_frames: int,
    video_fps: float | None,
    *,
    rule: str = "transformers",
    fps: float | None = DEFAULT_FPS,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """Source frame indices to decode, by the transformers or the qwen-vl-utils rule.

    Args:
        total_frames: frames in the video; video_fps: its frame rate (None -> ASSUMED_VIDEO_FPS).
        fps: frames to sample per second; num_frames: fixed count instead (`nframes` in qwen-vl-utils).
        min_frames, max_frames: frame budget; start, end: optional time range in seconds.
    Returns:
        sorted list of frame indices.
    """
    if rule not in RULES:
        raise ValueError(f"unknown frame sampling rule {rule!r}; choose from {RULES}")
    if total_frames <= 0:
        raise ValueError("video has no frames")
    vfps = effective_fps(video_fps)
    s, e = frame_range(total_frames, vfps, start, end)
    count = e - s + 1
    if rule == "transformers":
        if num_frames is None:
            n = int(count / vfps * fps)
            n = min(max(n, min_frames), max_frames, count)
        else:
            n = min(num_frames, count)
        return np.linspace(s, e, n).round().astype(int).tolist()
    # qwen-vl-utils smart_nframes: an even count, float32 linspace as in its torch code.
    if num_frames is not None:
        n = round(num_frames / 2) * 2
    else:
        lo = math.ceil(min_frames / 2) * 2
        hi = math.floor(min(max_frames, count) / 2) * 2
        n = min(min(max(count / vfps * fps, lo), hi), count)
        n = math.floor(n / 2) * 2
    if not 2 <= n <= count:
        raise ValueError(f"cannot sample {n} frames from a video range of {count} frames (need 2 <= n <= {count})")
    return torch.linspace(s, e, n).round().long().tolist()


def group_timestamps(frame_times: list[float], temporal_patch_size: int = 2) -> list[float]:
    """Per temporal group, the mean of its first and last frame time (frames padded by repeating the last).

    Args:
        frame_times: seconds of each sampled frame.
    """
    t = list(frame_times)
    if pad := -len(t) % temporal_patch_size:
        t += [t[-1]] * pad
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]
