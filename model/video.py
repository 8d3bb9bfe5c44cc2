"""Video preprocessing for Qwen3-VL: decode, sample frames by fps, resize, patchify, and Text-Timestamp Alignment.

Two frame-selection rules (SPEC.md section 5), chosen with `rule=`:
- "transformers": transformers 5's `Qwen3VLVideoProcessor.sample_frames` and video `smart_resize`:
  n = min(max(int(total / video_fps * fps), min_frames), max_frames, total), indices = round(linspace(0, total-1, n)),
  pixel budget over all frames from video_preprocessor_config.json (optionally capped per frame);
- "qwen-vl-utils": qwen-vl-utils 0.0.14 `smart_nframes` (even n in [ceil2(min_frames), floor2(min(max_frames,
  total))]), optional `video_start` / `video_end` seconds, per-frame budget min(768 tokens, 0.9 * 128000 tokens
  * 2 / n) floored at 1.05 * 128 tokens, and its smart_resize variant.
Frames are decoded with PyAV (frame threading, only the sampled frames converted to RGB, unneeded H.264
non-reference pictures never decoded, seeking past whole GOPs when a gap spans a keyframe), resized with bicubic +
antialias as each reference does it (transformers: torch's uint8 kernel, like torchvision v2; qwen-vl-utils: fp32
then clamp + round, like torchvision v1), then normalised and cut into rows of (C, t=2, 16, 16); an odd frame count
repeats the last frame.
Each temporal group of 2 frames gets the timestamp mean(t_first, t_last), t = frame_index / video_fps, rendered as
"<{t:.1f} seconds>" before that group's tokens.
"""
from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .image import OFFICIAL_VIDEO_CONFIG, VisionPreprocessConfig, load_image, resize
from .image import smart_resize as image_smart_resize

# transformers' Qwen3VLVideoProcessor defaults (also the official video_preprocessor_config.json values).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
# qwen-vl-utils 0.0.14 constants (in tokens of 32x32 pixels for Qwen3-VL, i.e. image_patch_size=16).
QVU_MIN_TOKENS_PER_FRAME = 128
QVU_MAX_TOKENS_PER_FRAME = 768
QVU_MODEL_SEQ_LEN = 128000
RULES = ("transformers", "qwen-vl-utils")


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


@dataclass
class VideoFeatures:
    """One preprocessed video.

    Args:
        pixel_values: (grid_t * grid_h * grid_w, 1536) fp32 rows; grid_thw: (grid_t, grid_h, grid_w);
        timestamps: seconds per temporal group (len grid_t); frame_indices: sampled source frames;
        metadata: the source stream's VideoMetadata (None for frame lists).
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: list[float]
    frame_indices: list[int]
    metadata: VideoMetadata | None = None
    frame_size: tuple[int, int] = field(default=(0, 0))


# --- frame selection -------------------------------------------------------------------------------------------
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
        total_frames: frames in the video; video_fps: its frame rate (None -> 24 as transformers assumes).
        fps: frames to sample per second; num_frames: fixed count instead (`nframes` in qwen-vl-utils).
        min_frames, max_frames: frame budget; start, end: optional time range in seconds.
    Returns:
        sorted list of frame indices.
    """
    if rule not in RULES:
        raise ValueError(f"unknown frame sampling rule {rule!r}; choose from {RULES}")
    if total_frames <= 0:
        raise ValueError("video has no frames")
    video_fps = video_fps or 24.0
    s, e = frame_range(total_frames, video_fps, start, end)
    count = e - s + 1
    if rule == "transformers":
        if num_frames is None:
            n = int(count / video_fps * fps)
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
        n = min(min(max(count / video_fps * fps, lo), hi), count)
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


def timestamp_text(t: float) -> str:
    """The TTA marker before a temporal group: "<{t:.1f} seconds>" (Python round-half-even formatting)."""
    return f"<{t:.1f} seconds>"


# --- frame size --------------------------------------------------------------------------------------------------
def video_smart_resize(num_frames: int, height: int, width: int, config: VisionPreprocessConfig,
                       max_pixels: int | None = None) -> tuple[int, int]:
    """transformers' video smart_resize: the pixel budget counts all frames (t * h * w).

    Args:
        num_frames: sampled frames; height, width: source size; max_pixels: overrides config.max_pixels.
    """
    factor, tf = config.factor, config.temporal_patch_size
    min_pixels, max_pixels = config.min_pixels, max_pixels or config.max_pixels
    if height < factor or width < factor:  # tiny videos are first scaled up so the short side is one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}")
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
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f}")
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
            return image_smart_resize(o["resized_height"], o["resized_width"], f, config.min_pixels, config.max_pixels)
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


# --- decoding ----------------------------------------------------------------------------------------------------
def _open(path: str):
    """Open a video container, turning PyAV errors into messages that name the file."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot open video {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"no video stream in {path}")
    return container


def _packet_table(container, stream) -> tuple[np.ndarray, np.ndarray, bool]:
    """Demux (no decoding): every frame's pts in presentation order, which are keyframes, and whether all had pts."""
    pts, key, complete = [], [], True
    for pkt in container.demux(stream):
        if pkt.size > 0:
            if pkt.pts is None:
                complete = False
                continue
            pts.append(pkt.pts)
            key.append(pkt.is_keyframe)
    if pts:  # rewind for decoding (an empty stream cannot seek, and needs no rewind)
        container.seek(0, stream=stream)
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    return np.asarray(pts, dtype=np.int64)[order], np.asarray(key, dtype=bool)[order], complete


def _h264_nal_length_size(stream) -> int | None:
    """NAL length-prefix size of an H.264 stream stored in AVCC form (mp4/mkv), None otherwise."""
    ctx = stream.codec_context
    extra = ctx.extradata
    if ctx.name != "h264" or not extra or len(extra) < 5 or extra[0] != 1:
        return None
    return (extra[4] & 3) + 1


def _h264_is_non_reference(data: bytes, nal_len: int) -> bool:
    """True if the access unit's first slice NAL has nal_ref_idc == 0: no other picture predicts from it."""
    i, n = 0, len(data)
    while i + nal_len < n:
        size = int.from_bytes(data[i : i + nal_len], "big")
        header = data[i + nal_len]
        if header & 0x1F in (1, 5):  # coded slice (non-IDR / IDR)
            return (header >> 5) & 3 == 0
        i += nal_len + size
    return False


def probe_video(path: str) -> VideoMetadata:
    """Frame count, frame rate and size of the first video stream (PyAV; as transformers' pyav reader reports them)."""
    import av

    path = path[len("file://") :] if path.startswith("file://") else path
    container = _open(path)
    try:
        s = container.streams.video[0]
        total = int(s.frames)
        if total <= 0:  # container without a frame count (e.g. some webm/mkv): count packets instead
            total = len(_packet_table(container, s)[0])
        fps = float(s.average_rate) if s.average_rate else None
        return VideoMetadata(total, fps, s.height, s.width, path)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    finally:
        container.close()


def read_frames(path: str, indices: list[int], size: tuple[int, int] | None = None, threads: bool = True,
                uint8_kernel: bool = True) -> torch.Tensor:
    """Decode the frames at `indices` (presentation order) with PyAV, resizing each as it arrives.

    Work avoided, without changing any returned pixel: only requested frames are converted to RGB; packets of
    H.264 non-reference pictures (nal_ref_idc 0) that are not requested are never sent to the decoder (nothing
    predicts from them); and when the next requested frame lies past a keyframe the demuxer has not reached yet,
    the reader seeks to that keyframe instead of decoding the gap. Resizes run in a thread pool beside the decoder;
    torch's intra-op thread count is set to 1 while this runs and restored afterwards.
    Args:
        path: video file; indices: sorted frame indices (repeats allowed);
        size: (h, w) to bicubic-resize every frame to (uint8), None keeps the source size;
        threads: let FFmpeg decode with frame/slice threads.
        uint8_kernel: resize kernel, see `model.image.resize`.
    Returns:
        (len(indices), 3, h, w) uint8.
    """
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        pts_sorted, is_key, complete = _packet_table(container, stream)
        wanted = sorted(set(int(i) for i in indices))
        if wanted and (wanted[0] < 0 or wanted[-1] >= max(len(pts_sorted), 1)):
            raise ValueError(f"frame index out of range for {path}: {wanted[-1]} (video has {len(pts_sorted)} frames)")
        wanted_set = set(wanted)
        out: dict[int, torch.Tensor] = {}
        pending: deque = deque()

        def convert(rgb):
            return resize(rgb, *size, uint8_kernel).contiguous() if size is not None else rgb.contiguous()

        def keep(idx, frame):
            if idx in wanted_set and idx not in out:
                # HWC -> CHW view (channels-last strides): the uint8 resize kernel is fastest on it, same result.
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                out[idx] = pool.submit(convert, rgb)
                pending.append(out[idx])
                while len(pending) > 2 * workers:  # bound the frames waiting for a resize
                    pending.popleft().result()

        # Resizes run in a small thread pool (torch releases the GIL) next to the decoder, each single-threaded:
        # frame-sized ops gain nothing from intra-op threads and lose a lot to them on a busy machine.
        workers = max(1, min(4, os.cpu_count() or 1))
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            _decode_wanted(container, stream, pts_sorted, is_key, complete, wanted, wanted_set, out, keep)
        finally:
            pool.shutdown(wait=True)
            torch.set_num_threads(prev_threads)
        out = {i: f.result() for i, f in out.items()}
        missing = [i for i in wanted if i not in out]
        if missing:
            raise ValueError(f"could not decode frames {missing[:5]}{'...' if len(missing) > 5 else ''} of {path}")
        return torch.stack([out[int(i)] for i in indices])
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    finally:
        container.close()


def _decode_wanted(container, stream, pts_sorted, is_key, complete, wanted, wanted_set, out, keep):
    """Drive the decoder over the wanted frames (see `read_frames`), handing each decoded frame to `keep`."""
    if not complete:  # no pts to map packets to frames: plain sequential decode, counting frames
        for idx, frame in enumerate(container.decode(stream)):
            keep(idx, frame)
            if len(out) == len(wanted_set):
                break
    else:
        pts_to_index = {int(p): i for i, p in enumerate(pts_sorted)}
        key_idx = np.flatnonzero(is_key)
        nal_len = _h264_nal_length_size(stream)
        next_w = 0  # wanted[next_w] is the first requested frame not decoded yet
        max_sent = -1  # largest frame index whose packet went to the decoder since the last seek
        while next_w < len(wanted):
            k = int(key_idx[np.searchsorted(key_idx, wanted[next_w], side="right") - 1]) if len(key_idx) else 0
            if k > max_sent + 1:  # the whole gap up to that keyframe can be skipped
                container.seek(int(pts_sorted[k]), stream=stream, backward=True, any_frame=False)
                max_sent = k - 1
            reseek = False
            for pkt in container.demux(stream):
                idx = pts_to_index.get(pkt.pts) if pkt.pts is not None else None
                if idx is not None:
                    if (nal_len and idx not in wanted_set and pkt.size
                            and _h264_is_non_reference(bytes(pkt), nal_len)):
                        continue
                    max_sent = max(max_sent, idx)
                for frame in stream.decode(pkt):
                    keep(pts_to_index.get(frame.pts, -1), frame)
                while next_w < len(wanted) and wanted[next_w] in out:
                    next_w += 1
                if next_w == len(wanted):
                    break
                nk = int(key_idx[np.searchsorted(key_idx, wanted[next_w], side="right") - 1]) if len(key_idx) else 0
                if nk > max_sent + 1:
                    reseek = True
                    break
            if not reseek:
                break  # end of stream (or done)


# --- the whole pipeline --------------------------------------------------------------------------------------------
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
        video: path to a video file, or a list / (T, H, W, C) / (T, C, H, W) array of frames (used as given).
        config: video pixel budget and normalisation (video_preprocessor_config.json).
        rule: "transformers" or "qwen-vl-utils" frame sampling and sizing.
        fps, min_frames, max_frames: sampling defaults, overridden by `options`.
        options: per-video keys from the message: fps, nframes, min_frames, max_frames, video_start, video_end,
            min_pixels, max_pixels, total_pixels, resized_height, resized_width; for frame lists `timestamps`
            (seconds per frame) or `sample_fps` (default 2: frame i at i / sample_fps).
    """
    o = dict(options or {})
    if isinstance(video, (str, os.PathLike)):
        path = str(video)
        path = path[len("file://") :] if path.startswith("file://") else path
        if "fps" in o and "nframes" in o:
            raise ValueError(f"video {path}: give either fps or nframes, not both")
        meta = probe_video(path)
        if meta.total_num_frames <= 0:
            raise ValueError(f"video {path} has no frames")
        indices = sample_frame_indices(
            meta.total_num_frames, meta.fps, rule=rule, fps=o.get("fps", fps), num_frames=o.get("nframes"),
            min_frames=o.get("min_frames", min_frames), max_frames=o.get("max_frames", max_frames),
            start=o.get("video_start"), end=o.get("video_end"),
        )
        try:
            h, w = frame_size(len(indices), meta.height, meta.width, config, rule=rule, options=o)
        except ValueError as e:
            raise ValueError(f"video {path}: {e}") from e
        # qwen-vl-utils resizes with torchvision's v1 (fp32) kernel, transformers 5 with v2's uint8 kernel.
        frames = read_frames(path, indices, size=(h, w), uint8_kernel=rule == "transformers")
        video_fps = meta.fps or 24.0
        times = [i / video_fps for i in indices]
    else:
        meta = None
        frames = _frames_from_list(video)
        n = frames.shape[0]
        indices = list(range(n))
        if "timestamps" in o:
            times = [float(t) for t in o["timestamps"]]
            if len(times) != n:
                raise ValueError(f"video frame list has {n} frames but {len(times)} timestamps")
        else:
            times = [i / float(o.get("sample_fps", 2.0)) for i in indices]
        h, w = frame_size(n, frames.shape[-2], frames.shape[-1], config, rule=rule, options=o)
        frames = resize(frames, h, w, uint8_kernel=rule == "transformers")
    pixel_values, grid = normalize_patchify(frames, config)
    return VideoFeatures(pixel_values, grid, group_timestamps(times, config.temporal_patch_size), list(indices), meta,
                         (h, w))


def normalize_patchify(frames: torch.Tensor, config: VisionPreprocessConfig, groups_per_chunk: int = 16):
    """`patchify(normalize(frames))` computed a few temporal groups at a time, straight into the output rows.

    Same numbers as the two-step version (uint8 -> fp32 copy, then in-place (x - 255*mean) / (255*std)), without
    materialising the whole normalised video: peak memory is the output plus one chunk.
    Args:
        frames: (T, C, H, W) uint8 or float, H and W multiples of patch * merge.
    Returns:
        pixel_values (grid_t * grid_h * grid_w, C * tp * p * p) fp32 and grid_thw.
    """
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    t, c, h, w = frames.shape
    if pad := -t % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch*merge = {p * m}")
    gt, gh, gw = t // tp, h // p, w // p
    out = torch.empty(gt * gh * gw, c * tp * p * p, dtype=torch.float32)
    # (gt, gh/m, gw/m, m, m, C, tp, p, p) view of the output rows; the source view is permuted to match.
    out_v = out.view(gt, gh // m, gw // m, m, m, c, tp, p, p)
    src = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    mean = torch.tensor(config.image_mean, dtype=torch.float32) * 255.0
    std = torch.tensor(config.image_std, dtype=torch.float32) * 255.0
    rows_per_group = gh * gw
    for g0 in range(0, gt, groups_per_chunk):
        g1 = min(gt, g0 + groups_per_chunk)
        out_v[g0:g1].copy_(src[g0:g1])
        chunk = out[g0 * rows_per_group : g1 * rows_per_group].view(-1, c, tp * p * p)
        chunk.sub_(mean[:, None]).div_(std[:, None])
    return out, (gt, gh, gw)


def _frames_from_list(video) -> torch.Tensor:
    """A list of frames (paths / PIL / arrays) or a 4-D array -> (T, 3, H, W) uint8 or float (0..255 scale)."""
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:
        video = list(video)
    if not isinstance(video, (list, tuple)) or len(video) == 0:
        raise ValueError("a video must be a file path or a non-empty list of frames")
    frames = [load_image(f, name=f"video frame {i}") for i, f in enumerate(video)]
    h, w = frames[0].shape[-2:]
    frames = [f if f.shape[-2:] == (h, w) else resize(f, h, w) for f in frames]
    return torch.stack(frames)
