"""Sparse video reading (model/processing/video_decode.py) beyond H.264: FFmpeg's skip_frame drops the unwanted
non-reference pictures of other codecs too (MPEG-4 part 2 B-frames, HEVC), and the returned frames must equal a full
sequential decode. (H.264 with seeks and skips: tests/test_video.py::test_sparse_reader_returns_the_same_frames.)
Frame choices come from random.Random(SEED)."""
import random

import numpy as np
import pytest
import torch

from model.processing import read_frames

SEED = 7


def _write(path, codec, options, b_frames=0):
    import av

    base = np.random.default_rng(SEED).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25, options=options)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        if b_frames:
            s.codec_context.max_b_frames = b_frames
        for i in range(100):
            for p in s.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.mark.parametrize("codec,options,b_frames",
                         [("mpeg4", {}, 2), ("libx265", {"x265-params": "log-level=none"}, 0)],
                         ids=["mpeg4-bframes", "hevc"])
def test_sparse_reads_equal_full_decode(tmp_path, codec, options, b_frames):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    path = _write(tmp_path / f"{codec}.mp4", codec, options, b_frames)
    with av.open(path) as c:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in c.decode(video=0)]
    with av.open(path) as c:  # the stream must hold pictures the decoder may drop, or the test means nothing
        s = c.streams.video[0]
        s.codec_context.skip_frame = "NONREF"
        assert len(frames) - sum(1 for _ in c.decode(s)) > 10
    rng = random.Random(SEED)
    for _ in range(4):
        idx = sorted(rng.sample(range(len(frames)), 9))
        torch.testing.assert_close(read_frames(path, idx), torch.stack([frames[i] for i in idx]), rtol=0, atol=0)
