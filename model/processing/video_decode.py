"""Video decoding with PyAV: probe a container, read the sampled frames (resized as they arrive), as a stream
(`iter_frames`, one frame at a time in one pass) or all at once (`read_frames`).

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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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


def iter_frames(path: str, indices: list[int], size: tuple[int, int] | None = None, threads: bool = True,
                uint8_kernel: bool = True) -> Iterator[torch.Tensor]:
    """Decode the frames at `indices` (presentation order) with PyAV in one pass, yielding each as it is ready.

    Work avoided, without changing any returned pixel: only requested frames are converted to RGB; non-reference
    pictures that are not requested are dropped by the decoder (FFmpeg's `skip_frame`, set per packet); and when
    the next requested frame lies past a keyframe the demuxer has not reached yet, the reader seeks to that
    keyframe instead of decoding the gap. Resizes run in a thread pool beside the decoder, a few frames ahead of
    the consumer (so at most ~2 x workers frames are held); torch's intra-op thread count is 1 while the generator
    runs and the caller's value while the caller runs (between yields), and is restored when it ends or is closed.
    Args:
        path: video file; indices: non-decreasing frame indices (repeats allowed);
        size: (h, w) to bicubic-resize every frame to (uint8), None keeps the source size;
        threads: let FFmpeg decode with frame/slice threads.
        uint8_kernel: resize kernel, see `model.processing.image.resize`.
    Yields:
        (3, h, w) uint8 per entry of `indices`, in order (a repeated index yields the same tensor again).
    """
    import av

    indices = [int(i) for i in indices]
    if any(b < a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"iter_frames needs non-decreasing frame indices for {path}")
    container = _open(path)
    prev_threads = torch.get_num_threads()
    pool = None
    try:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        pts_sorted, is_key, complete = _packet_table(container, stream)
        if complete and len(pts_sorted) == 0:
            raise ValueError(f"video {path} holds no frames (its header may list some: a truncated file?)")
        wanted = sorted(set(indices))
        if wanted and (wanted[0] < 0 or wanted[-1] >= max(len(pts_sorted), 1)):
            raise ValueError(f"frame index out of range for {path}: {wanted[-1]} (video has {len(pts_sorted)} frames)")
        wanted_set, seen = set(wanted), set()
        ready: dict[int, Future] = {}  # decoded, wanted frames not yet handed out -> their resize

        def convert(rgb):
            return resize(rgb, *size, uint8_kernel).contiguous() if size is not None else rgb.contiguous()

        # Resizes run in a small thread pool (torch releases the GIL) next to the decoder, each single-threaded:
        # frame-sized ops gain nothing from intra-op threads and lose a lot to them on a busy machine.
        workers = max(1, min(4, os.cpu_count() or 1))
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(max_workers=workers)
        pos = 0  # indices[pos] is the next frame to hand out

        def hand_out(flush: bool):
            # In order: the frames whose resize is done, waiting for the oldest when too many are queued (or at the
            # end); the caller runs with its own thread count between frames.
            nonlocal pos
            while pos < len(indices) and indices[pos] in ready and (
                    flush or ready[indices[pos]].done() or len(ready) > 2 * workers):
                idx = indices[pos]
                out = ready.pop(idx).result()
                while pos < len(indices) and indices[pos] == idx:
                    pos += 1
                    torch.set_num_threads(prev_threads)
                    yield out
                    torch.set_num_threads(1)

        for idx, frame in _decode_wanted(container, stream, pts_sorted, is_key, complete, wanted):
            if idx in wanted_set and idx not in seen:
                seen.add(idx)
                # HWC -> CHW view (channels-last strides): the uint8 resize kernel is fastest on it, same result.
                ready[idx] = pool.submit(convert, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1))
            yield from hand_out(flush=False)
        yield from hand_out(flush=True)
        missing = [i for i in wanted if i not in seen]
        if missing:
            raise ValueError(f"could not decode frames {missing[:5]}{'...' if len(missing) > 5 else ''} of {path}")
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev_threads)
        container.close()


def read_frames(path: str, indices: list[int], size: tuple[int, int] | None = None, threads: bool = True,
                uint8_kernel: bool = True) -> torch.Tensor:
    """Decode the frames at `indices` (any order, repeats allowed) with PyAV, all at once (`iter_frames`).

    Args:
        path: video file; indices: frame indices in presentation order;
        size, threads, uint8_kernel: as in `iter_frames`.
    Returns:
        (len(indices), 3, h, w) uint8.
    """
    wanted = sorted(set(int(i) for i in indices))
    frames = list(iter_frames(path, wanted, size=size, threads=threads, uint8_kernel=uint8_kernel))
    where = {idx: k for k, idx in enumerate(wanted)}
    return torch.stack([frames[where[int(i)]] for i in indices])


def _decode_wanted(container, stream, pts_sorted, is_key, complete, wanted) -> Iterator[tuple[int, object]]:
    """Drive the decoder over the wanted frames (see `iter_frames`): yield (frame index, av.VideoFrame) for every
    picture it outputs (index -1 when its pts maps to no frame), until every wanted frame has come out."""
    wanted_set, got = set(wanted), set()
    if not complete:  # no pts to map packets to frames: plain sequential decode, counting frames
        for idx, frame in enumerate(container.decode(stream)):
            yield idx, frame
            if idx in wanted_set:
                got.add(idx)
                if len(got) == len(wanted_set):
                    return
        return
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
                idx = pts_to_index.get(frame.pts, -1)
                if idx in wanted_set:
                    got.add(idx)
                yield idx, frame
            while next_w < len(wanted) and wanted[next_w] in got:
                next_w += 1
            if next_w == len(wanted):
                break
            nk = int(key_idx[np.searchsorted(key_idx, wanted[next_w], side="right") - 1]) if len(key_idx) else 0
            if nk > max_sent + 1:
                reseek = True
                break
        if not reseek:
            break  # end of stream (or done)
