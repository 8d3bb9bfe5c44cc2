"""Video decoding with PyAV: probe a container, read the sampled frames (resized as they arrive).

Only the frames a plan asks for are converted to RGB; the container is demuxed once up front (no decoding) to map
every packet to its frame index in presentation order and to find the keyframes, so that the reader can seek over
whole GOPs that hold no requested frame, and can let FFmpeg drop the non-reference pictures it does not need
(`AVCodecContext.skip_frame`, set per packet through PyAV's `codec_context.skip_frame`).

Measured against the hand-parsed H.264 NAL headers (nal_ref_idc) this replaced, which kept unwanted
non-reference packets from the decoder: the same frames, bit for bit, in all 12 cases below, at the same cost.
Process CPU time of one `read_frames` call, best of 7 interleaved runs, without / with frame threads, on libx264
files from tests/test_video.py's `write_video` (wall times on the 2 shared cores of the machine were too noisy to
rank the two, in both directions by up to 2x):
    video (frames, GOP)        frames read      NAL headers        skip_frame
    640x360 (600, 250)         40 (fps 2)       694 / 707 ms       687 / 716 ms
    640x360 (600, 250)          8               506 / 564 ms       535 / 584 ms
    1280x720 (300, 250)        20 (fps 2)      1216 / 1327 ms     1291 / 1361 ms
    1280x720 (300, 250)         8              1070 / 1117 ms     1037 / 1085 ms
    320x240 (300, 12)          24 (fps 2)       323 / 351 ms       328 / 352 ms
    320x240 (300, 12)           8               134 / 151 ms       130 / 143 ms
The library also drops the non-reference pictures of codecs the header parser did not know (MPEG-4 part 2
B-frames, HEVC; tests/test_video_decode.py).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .image import resize
from .media import local_path
from .video_sampling import VideoMetadata


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


def probe_video(path: str) -> VideoMetadata:
    """Frame count, frame rate and size of the first video stream (PyAV; as transformers' pyav reader reports them)."""
    import av

    path = local_path(path)
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

    Work avoided, without changing any returned pixel: only requested frames are converted to RGB; non-reference
    pictures that are not requested are dropped by the decoder (FFmpeg's `skip_frame`, set per packet); and when
    the next requested frame lies past a keyframe the demuxer has not reached yet, the reader seeks to that
    keyframe instead of decoding the gap. Resizes run in a thread pool beside the decoder;
    torch's intra-op thread count is set to 1 while this runs and restored afterwards.
    Args:
        path: video file; indices: sorted frame indices (repeats allowed);
        size: (h, w) to bicubic-resize every frame to (uint8), None keeps the source size;
        threads: let FFmpeg decode with frame/slice threads.
        uint8_kernel: resize kernel, see `model.processing.image.resize`.
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
        ctx = stream.codec_context
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
                    # An unwanted picture that nothing predicts from need not be decoded: FFmpeg's decoder drops it
                    # (AVDISCARD_NONREF: H.264 nal_ref_idc 0, HEVC non-reference, MPEG-4 B-frames); the setting
                    # travels with this packet, also to frame-threaded decoding.
                    ctx.skip_frame = "DEFAULT" if idx in wanted_set else "NONREF"
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
