"""Video preprocessing for Qwen3-VL: plan, decode the sampled frames, resize, patchify.

A video file is probed (`video_decode.probe_video`), planned from its metadata (`geometry.plan_video`: sampled
frame indices by the "transformers" or "qwen-vl-utils" rule, frame size, grid, per-group timestamps), decoded
(`video_decode.read_frames`, resizing each frame as it arrives with bicubic + antialias as each reference does it:
transformers with torch's uint8 kernel like torchvision v2, qwen-vl-utils with fp32 then clamp + round like
torchvision v1), then normalised and cut into rows (`patchify.patchify`; an odd frame count repeats the last frame).
A video given as a list of frames uses every frame, timed by the item's `timestamps` or `sample_fps`.
This holds the whole video's frames and rows at once; model/processing/stream.py streams a long one chunk by chunk.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, OFFICIAL_VIDEO_CONFIG, VisionPreprocessConfig
from .geometry import VideoPlan, check_video_options, plan_frame_list, plan_video
from .image import load_image, resize
from .media import local_path
from .patchify import patchify
from .video_decode import probe_video, read_frames
from .video_sampling import VideoMetadata


@dataclass
class VideoFeatures:
    """One preprocessed video.

    Args:
        pixel_values: (grid_t * grid_h * grid_w, 1536) fp32 rows; grid_thw: (grid_t, grid_h, grid_w);
        timestamps: seconds per temporal group (len grid_t); frame_indices: sampled source frames;
        metadata: the source stream's VideoMetadata (None for frame lists); frame_size: (h, w) after resizing.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: list[float]
    frame_indices: list[int]
    metadata: VideoMetadata | None = None
    frame_size: tuple[int, int] = field(default=(0, 0))


def preprocess_video(
    video,
    config: VisionPreprocessConfig = OFFICIAL_VIDEO_CONFIG,
    *,
    rule: str = "transformers",
    fps: float = DEFAULT_FPS,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    options: dict | None = None,
) -> VideoFeatures:
    """One video (file or frame list) -> rows, grid, per-group timestamps and the sampled frame indices.

    Args:
        video: path to a video file (optional `file://` prefix), or a list / (T, H, W, C) / (T, C, H, W) array of
            frames (used as given).
        config: video pixel budget and normalisation (video_preprocessor_config.json).
        rule: "transformers" or "qwen-vl-utils" frame sampling and sizing.
        fps, min_frames, max_frames: sampling defaults, overridden by `options`.
        options: per-video keys from the message: fps, nframes, min_frames, max_frames, video_start, video_end,
            min_pixels, max_pixels, total_pixels, resized_height, resized_width; for frame lists `timestamps`
            (seconds per frame) or `sample_fps` (default 2: frame i at i / sample_fps).
    """
    o = dict(options or {})
    if isinstance(video, (str, os.PathLike)):
        path = local_path(video)
        meta, plan = plan_video_file(path, config, rule=rule, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                     options=o)
        frames = read_frames(path, plan.frame_indices, size=plan.size, uint8_kernel=uses_uint8_kernel(rule))
    else:
        meta = None
        frames = load_frame_list(video)
        plan = plan_frame_list(frames.shape[0], frames.shape[-2], frames.shape[-1], config, rule=rule, options=o)
        frames = resize(frames, *plan.size, uint8_kernel=uses_uint8_kernel(rule))
    pixel_values, grid = patchify(frames, config)
    return VideoFeatures(pixel_values, grid, plan.timestamps, plan.frame_indices, meta, plan.size)


def uses_uint8_kernel(rule: str) -> bool:
    """The resize kernel of a rule: qwen-vl-utils resizes with torchvision's v1 (fp32) kernel, transformers 5 with
    v2's uint8 kernel (`model.processing.image.resize`)."""
    return rule == "transformers"


def plan_video_file(path: str, config: VisionPreprocessConfig = OFFICIAL_VIDEO_CONFIG, *, rule: str = "transformers",
                    fps: float = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES,
                    max_frames: int = DEFAULT_MAX_FRAMES,
                    options: dict | None = None) -> tuple[VideoMetadata, VideoPlan]:
    """Probe a video file and plan it (`geometry.plan_video`); every error names the file.

    Args: as `preprocess_video` (path: a local file).
    Returns:
        (the container's VideoMetadata, the VideoPlan).
    """
    o = options or {}
    try:
        check_video_options(o)
        meta = probe_video(path)
        if meta.total_num_frames <= 0:
            raise ValueError("no frames")
        if meta.height <= 0 or meta.width <= 0:  # e.g. a truncated mp4 whose header lists frames it does not hold
            raise ValueError(f"the header gives no frame size ({meta.height}x{meta.width}) for its "
                             f"{meta.total_num_frames} frames; a truncated or empty file?")
        plan = plan_video(meta, config, rule=rule, fps=fps, min_frames=min_frames, max_frames=max_frames, options=o)
    except ValueError as e:
        raise ValueError(f"video {path}: {e}") from e
    return meta, plan


def load_frame_list(video) -> torch.Tensor:
    """A list of frames (paths / PIL / arrays) or a 4-D array -> (T, 3, H, W) uint8 or float (0..255 scale)."""
    return torch.stack(list(iter_frame_list(video)))


def iter_frame_list(video) -> Iterator[torch.Tensor]:
    """The frames of a frame list one at a time, as `load_frame_list` stacks them: (3, H, W) uint8 or float, each
    at the first frame's size. `video`: a list / tuple / any sequence of frames (a lazy one is read in order, frame
    by frame, and never held whole) or a 4-D array."""
    if not isinstance(video, (np.ndarray, torch.Tensor, Sequence)) or isinstance(video, (str, bytes)) \
            or len(video) == 0 or (isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim != 4):
        raise ValueError("a video must be a file path or a non-empty list of frames")
    size = None
    for i, f in enumerate(video):
        f = load_image(f, name=f"video frame {i}")
        size = f.shape[-2:] if size is None else size
        yield f if f.shape[-2:] == size else resize(f, *size)
