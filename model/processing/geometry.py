"""Media geometry: resized sizes, patch grids (t, h, w) and per-group timestamps, planned before any pixel is read.

The one planner of this package: `plan_image` (image size -> resized size and grid) and `plan_video` /
`plan_frame_list` (video metadata or a frame count -> sampled frames, resized size, grid, timestamps). The
processor preprocesses by these plans, and the training data loader counts tokens with the same plans from image
headers and container metadata alone (`Qwen3VLProcessor.count_tokens`), so the two cannot disagree.

Sizing rules (all round sides to multiples of factor = patch_size * merge_size = 32):
- images: transformers' `smart_resize` (area within [min_pixels, max_pixels], aspect ratio kept);
- videos, rule "transformers": transformers 5's `Qwen3VLVideoProcessor` smart_resize, whose budget counts all
  frames (t * h * w), optionally capped per frame;
- videos, rule "qwen-vl-utils": qwen-vl-utils 0.0.14's per-frame budget min(768 tokens, 0.9 * 128000 tokens * 2 / n)
  floored at 1.05 * 128 tokens, and its smart_resize variant.
A grid has ceil(frames / temporal_patch_size) temporal groups (an image is one frame) of (h / patch) x (w / patch)
patches.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, RULES, VisionPreprocessConfig
from .video_sampling import VideoMetadata, effective_fps, group_timestamps, sample_frame_indices

MAX_ASPECT_RATIO = 200
# qwen-vl-utils 0.0.14 constants (in tokens of 32x32 pixels for Qwen3-VL, i.e. image_patch_size=16).
QVU_MIN_TOKENS_PER_FRAME = 128
QVU_MAX_TOKENS_PER_FRAME = 768
QVU_MODEL_SEQ_LEN = 128000


def _check_aspect_ratio(height: int, width: int):
    if min(height, width) < 1:  # a header that lists no picture size (e.g. a video cut before its first frame)
        raise ValueError(f"media size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width):.1f} ({height}x{width})")


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216):
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept (HF rule).

    Args:
        height, width: source size in pixels.
    Returns:
        (resized_height, resized_width) ints.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    _check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- frame size --------------------------------------------------------------------------------------------------
def video_smart_resize(num_frames: int, height: int, width: int, config: VisionPreprocessConfig,
                       max_pixels: int | None = None) -> tuple[int, int]:
    """transformers' video smart_resize: the pixel budget counts all frames (t * h * w).

    Args:
        num_frames: sampled frames; height, width: source size; max_pixels: overrides config.max_pixels.
    """
    factor, tf = config.factor, config.temporal_patch_size
    min_pixels, max_pixels = config.min_pixels, max_pixels or config.max_pixels
    _check_aspect_ratio(height, width)
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if height < factor or width < factor:  # tiny videos are first scaled up so the short side is one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / tf) * tf
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qvu_smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize (sides at least one factor after rounding, no lower clamp after flooring)."""
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be at least min_pixels ({min_pixels})")
    _check_aspect_ratio(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size(num_frames: int, height: int, width: int, config: VisionPreprocessConfig, *, rule: str = "transformers",
               options: dict | None = None) -> tuple[int, int]:
    """Resized (h, w) of every frame of a video under `rule`.

    Args:
        num_frames: sampled frame count; height, width: source size.
        options: per-video overrides from the message: `resized_height` + `resized_width`; for the transformers
            rule `min_pixels` and `max_pixels` / `total_pixels` are the whole-video budget (like `size`), plus
            `cap_pixels_per_frame`, `max_video_tokens`; for the qwen-vl-utils rule `min_pixels` / `max_pixels` are
            per frame and `total_pixels` is the whole-video budget, as in qwen-vl-utils.
    """
    o = options or {}
    f = config.factor
    if rule == "transformers":
        if "resized_height" in o and "resized_width" in o:
            return smart_resize(o["resized_height"], o["resized_width"], f, config.min_pixels, config.max_pixels)
        cfg = config
        if "min_pixels" in o or "max_pixels" in o or "total_pixels" in o:
            cfg = VisionPreprocessConfig(int(o.get("min_pixels", config.min_pixels)),
                                         int(o.get("total_pixels", o.get("max_pixels", config.max_pixels))),
                                         config.patch_size, config.temporal_patch_size, config.merge_size)
        max_pixels = cfg.max_pixels
        if o.get("cap_pixels_per_frame"):
            frame_cap = o.get("max_video_tokens", QVU_MAX_TOKENS_PER_FRAME) * f * f
            per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return video_smart_resize(num_frames, height, width, cfg, max_pixels)
    if rule != "qwen-vl-utils":
        raise ValueError(f"unknown frame sampling rule {rule!r}; choose from {RULES}")
    if "resized_height" in o and "resized_width" in o:
        return qvu_smart_resize(o["resized_height"], o["resized_width"], f, 4 * f * f, 16384 * f * f)
    min_pixels = o.get("min_pixels", QVU_MIN_TOKENS_PER_FRAME * f * f)
    total_pixels = o.get("total_pixels", QVU_MODEL_SEQ_LEN * f * f * 0.9)
    max_pixels = max(min(QVU_MAX_TOKENS_PER_FRAME * f * f, total_pixels / num_frames * 2), int(min_pixels * 1.05))
    max_pixels = min(o.get("max_pixels", max_pixels), max_pixels)
    return qvu_smart_resize(height, width, f, min_pixels, max_pixels)


def grid_thw(num_frames: int, height: int, width: int, config: VisionPreprocessConfig) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of `num_frames` frames of height x width (multiples of the factor)."""
    if height % config.factor or width % config.factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch*merge = {config.factor}")
    return -(-num_frames // config.temporal_patch_size), height // config.patch_size, width // config.patch_size


@dataclass(frozen=True)
class ImagePlan:
    """Geometry of one image: size (h, w) after resizing, grid_thw (1, h / patch, w / patch)."""

    size: tuple[int, int]
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class VideoPlan:
    """Geometry of one video: which frames, their resized size, the grid and one timestamp per temporal group.

    Args:
        frame_indices: sampled source frames; size: (h, w) of every frame after resizing;
        grid_thw: (groups, h / patch, w / patch); timestamps: seconds per temporal group (len grid_thw[0]).
    """

    frame_indices: list[int]
    size: tuple[int, int]
    grid_thw: tuple[int, int, int]
    timestamps: list[float]


def plan_image(height: int, width: int, config: VisionPreprocessConfig, options: dict | None = None) -> ImagePlan:
    """Resized size and grid of an image of height x width.

    Args:
        config: pixel budget and patch geometry (the checkpoint's preprocessor_config.json).
        options: the message item's `min_pixels` / `max_pixels` (override the budget) or `resized_height` +
            `resized_width` (explicit size, rounded to the factor; the budget is not applied).
    """
    o = options or {}
    if "resized_height" in o and "resized_width" in o:
        size = smart_resize(int(o["resized_height"]), int(o["resized_width"]), config.factor, 1, 1 << 62)
    else:
        if "min_pixels" in o or "max_pixels" in o:
            config = dataclasses.replace(config, min_pixels=int(o.get("min_pixels", config.min_pixels)),
                                         max_pixels=int(o.get("max_pixels", config.max_pixels)))
        size = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    return ImagePlan(size, grid_thw(1, *size, config))


def check_video_options(options: dict):
    """Refuse option sets the sampling rules cannot honour together."""
    if "fps" in options and "nframes" in options:
        raise ValueError("give either fps or nframes, not both")


def plan_video(meta: VideoMetadata, config: VisionPreprocessConfig, *, rule: str = "transformers",
               fps: float = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES, max_frames: int = DEFAULT_MAX_FRAMES,
               options: dict | None = None) -> VideoPlan:
    """Sampled frames, frame size, grid and timestamps of a video file from its metadata alone.

    Args:
        meta: frame count, rate and size of the stream (`probe_video`).
        config: video pixel budget and patch geometry (video_preprocessor_config.json).
        rule: "transformers" or "qwen-vl-utils"; fps, min_frames, max_frames: sampling defaults.
        options: per-video keys from the message (override the defaults): fps, nframes, min_frames, max_frames,
            video_start, video_end, and the size keys of `frame_size`.
    """
    o = options or {}
    check_video_options(o)
    indices = sample_frame_indices(
        meta.total_num_frames, meta.fps, rule=rule, fps=o.get("fps", fps), num_frames=o.get("nframes"),
        min_frames=o.get("min_frames", min_frames), max_frames=o.get("max_frames", max_frames),
        start=o.get("video_start"), end=o.get("video_end"),
    )
    vfps = effective_fps(meta.fps)
    return _plan_frames(indices, [i / vfps for i in indices], meta.height, meta.width, config, rule, o)


def plan_frame_list(num_frames: int, height: int, width: int, config: VisionPreprocessConfig, *,
                    rule: str = "transformers", options: dict | None = None) -> VideoPlan:
    """Geometry of a video given as frames (all used): times from `options["timestamps"]` (seconds per frame) or
    `options["sample_fps"]` (default 2: frame i at i / sample_fps)."""
    o = options or {}
    if "timestamps" in o:
        times = [float(t) for t in o["timestamps"]]
        if len(times) != num_frames:
            raise ValueError(f"video frame list has {num_frames} frames but {len(times)} timestamps")
    else:
        times = [i / float(o.get("sample_fps", 2.0)) for i in range(num_frames)]
    return _plan_frames(list(range(num_frames)), times, height, width, config, rule, o)


def _plan_frames(indices, times, height, width, config, rule, options) -> VideoPlan:
    if not indices:
        raise ValueError("no frames to sample (max_frames / nframes of 0?)")
    size = frame_size(len(indices), height, width, config, rule=rule, options=options)
    return VideoPlan(list(indices), size, grid_thw(len(indices), *size, config),
                     group_timestamps(times, config.temporal_patch_size))
