"""Video preprocessing tests against transformers 5's Qwen3VLVideoProcessor and qwen-vl-utils' fetch_video.

Synthetic mp4 files are written with PyAV (fresh random content each run; libx264 for even sizes, mpeg4 for odd
ones, since libx264 refuses odd yuv420p sizes). transformers decodes with its own PyAV reader (`load_video(...,
backend="pyav")` with the video processor's `sample_frames` as the sampling function); qwen-vl-utils reads with
decord (its automatic choice here: torchcodec has no FFmpeg libraries on this machine, torchvision >= 0.26 dropped
video decoding).
Tolerance for pixel_values: exact (0) -- YUV->RGB conversions agree (PyAV and decord give identical RGB for even sizes), the
resize kernels are the ones each reference uses (torch's uint8 bicubic-antialias kernel as in torchvision v2 for
transformers; fp32 interpolate + clamp + round as in torchvision v1 for qwen-vl-utils), and the normalisation is
the same fp32 (x - 127.5) / 127.5.
"""
import math
import random

import numpy as np
import pytest
import torch

from model.processing import (OFFICIAL_VIDEO_CONFIG, group_timestamps, preprocess_video, probe_video, read_frames,
                              sample_frame_indices, timestamp_text)

# (width, height, fps, seconds, codec)
VIDEOS = {
    "64x48-24fps-1.0s": (64, 48, 24, 1.0, "libx264"),
    "98x62-30fps-2.5s": (98, 62, 30, 2.5, "libx264"),
    "75x51-25fps-1.3s-odd": (75, 51, 25, 1.3, "mpeg4"),
    "200x120-25fps-4.0s": (200, 120, 25, 4.0, "libx264"),
    "131x77-30fps-3.1s-odd": (131, 77, 30, 3.1, "mpeg4"),
}


def write_video(path, w, h, fps, seconds, codec, gop=None):
    """A moving random texture (fresh each run), so every frame differs."""
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for i in range(int(round(fps * seconds))):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {name: write_video(d / f"{name}.mp4", *spec) for name, spec in VIDEOS.items()}


@pytest.fixture(scope="module")
def hf_video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # Official video_preprocessor_config.json values (released with the checkpoints), not the class defaults.
    return Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
                                 temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def hf_video(path, vp, fps=2.0, cap=False):
    """transformers: decode + sample with its PyAV reader and sample_frames, then preprocess."""
    from transformers.video_utils import load_video

    frames, meta = load_video(path, backend="pyav",
                              sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, fps=fps))
    out = vp(videos=[frames], video_metadata=[meta], do_sample_frames=False, cap_pixels_per_frame=cap,
             return_tensors="pt")
    return out, meta


@pytest.mark.parametrize("name", list(VIDEOS))
@pytest.mark.parametrize("fps", [2.0, 3.3])
def test_matches_transformers(videos, hf_video_processor, name, fps):
    out, meta = hf_video(videos[name], hf_video_processor, fps=fps)
    mine = preprocess_video(videos[name], OFFICIAL_VIDEO_CONFIG, rule="transformers", fps=fps)
    assert mine.frame_indices == [int(i) for i in meta.frames_indices]
    assert list(mine.grid_thw) == out["video_grid_thw"][0].tolist()
    torch.testing.assert_close(mine.pixel_values, out["pixel_values_videos"], rtol=0, atol=0)
    # Timestamps: transformers' processor helper on the same indices.
    from transformers import Qwen3VLProcessor

    ref_t = Qwen3VLProcessor._calculate_timestamps(None, list(meta.frames_indices), meta.fps, 2)
    assert [timestamp_text(t) for t in mine.timestamps] == [f"<{t:.1f} seconds>" for t in ref_t]


def test_matches_transformers_with_per_frame_cap(videos, hf_video_processor):
    path = videos["200x120-25fps-4.0s"]
    out, _ = hf_video(path, hf_video_processor, cap=True)
    mine = preprocess_video(path, OFFICIAL_VIDEO_CONFIG, options={"cap_pixels_per_frame": True})
    assert list(mine.grid_thw) == out["video_grid_thw"][0].tolist()
    torch.testing.assert_close(mine.pixel_values, out["pixel_values_videos"], rtol=0, atol=0)


QVU_OPTIONS = {
    "default": {"fps": 2.0},
    "fps4": {"fps": 4.0},
    "start-end": {"fps": 2.0, "video_start": 0.3, "video_end": 0.95},
    "min6-max8": {"fps": 2.0, "min_frames": 6, "max_frames": 8},
    "nframes6": {"nframes": 6},
    "small-budget": {"fps": 2.0, "total_pixels": 20000, "min_pixels": 1024},
    "max-pixels": {"fps": 2.0, "max_pixels": 200000},
}


@pytest.fixture(scope="module")
def qwen_vl_utils_fetch():
    qvu = pytest.importorskip("qwen_vl_utils")
    # qwen-vl-utils needs a reader: torchcodec (needs system FFmpeg libraries) or decord; torchvision >= 0.26 has
    # no video decoding left. decord's wheel bundles FFmpeg, so it is the one that works everywhere.
    pytest.importorskip("decord", reason="qwen-vl-utils has no usable video reader (pip install decord)")
    return qvu.fetch_video


@pytest.mark.parametrize("name", list(VIDEOS))
@pytest.mark.parametrize("opt", list(QVU_OPTIONS))
def test_matches_qwen_vl_utils(videos, qwen_vl_utils_fetch, hf_video_processor, name, opt):
    ele = {"video": videos[name], **QVU_OPTIONS[opt]}
    (ref, meta), _ = qwen_vl_utils_fetch(ele, image_patch_size=16, return_video_metadata=True,
                                         return_video_sample_fps=True)
    mine = preprocess_video(videos[name], OFFICIAL_VIDEO_CONFIG, rule="qwen-vl-utils", options=ele)
    assert mine.frame_indices == [int(i) for i in meta["frames_indices"]]
    assert mine.frame_size == tuple(ref.shape[-2:])
    n = len(mine.frame_indices)
    assert mine.grid_thw == (math.ceil(n / 2), ref.shape[-2] // 16, ref.shape[-1] // 16)
    assert mine.timestamps == group_timestamps([i / meta["fps"] for i in meta["frames_indices"]])
    # Pixels: the Qwen3-VL README recipe feeds these frames to the transformers processor with do_resize=False.
    # Odd-sized frames are skipped: decord's own YUV->RGB conversion differs from FFmpeg's (PyAV) for odd sizes
    # (up to 54 levels here), a decord artefact, not part of qwen-vl-utils' rules.
    w, h = VIDEOS[name][:2]
    if w % 2 or h % 2:
        return
    out = hf_video_processor(videos=[ref], video_metadata=[meta], do_resize=False, do_sample_frames=False,
                             return_tensors="pt")
    torch.testing.assert_close(mine.pixel_values, out["pixel_values_videos"], rtol=0, atol=0)


def test_sampling_rules_match_references_on_random_lengths():
    """Frame-index rules alone, over fresh random frame counts / rates, against the libraries' own functions."""
    from qwen_vl_utils.vision_process import smart_nframes
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    vp = Qwen3VLVideoProcessor()
    rng = random.Random()
    for _ in range(200):
        total, vfps, fps = rng.randint(4, 5000), rng.choice([23.976, 24, 25, 29.97, 30, 60, 7.5]), rng.choice([0.5, 1, 2, 4])
        ref = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=vfps), fps=fps)
        assert sample_frame_indices(total, vfps, rule="transformers", fps=fps) == ref.tolist()
        n = smart_nframes({"fps": fps}, total_frames=total, video_fps=vfps)
        ref = torch.linspace(0, total - 1, n).round().long().tolist()
        assert sample_frame_indices(total, vfps, rule="qwen-vl-utils", fps=fps) == ref


def test_timestamp_text_rounding():
    # transformers' Qwen3VLProcessor: group time = mean of first and last frame time; Python formatting (0.25 -> "0.2").
    assert group_timestamps([0.0, 0.5, 1.0]) == [0.25, 1.0]
    assert [timestamp_text(t) for t in group_timestamps([0.0, 0.5, 1.0])] == ["<0.2 seconds>", "<1.0 seconds>"]
    assert timestamp_text(0.75) == "<0.8 seconds>"


@pytest.mark.parametrize("gop", [7, 250], ids=["gop7-seeks", "gop250-skips-nonref"])
def test_sparse_reader_returns_the_same_frames(tmp_path, gop):
    """Sparse indices (the reader seeks and skips non-reference B-frames) equal a full sequential decode."""
    import av

    path = write_video(tmp_path / "gop.mp4", 66, 40, 25, 6.0, "libx264", gop=gop)
    with av.open(path) as c:
        all_frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in c.decode(video=0)]
    with av.open(path) as c:  # the file must contain skippable pictures for this test to mean anything
        s = c.streams.video[0]
        s.codec_context.skip_frame = "NONREF"
        n_nonref = len(all_frames) - sum(1 for _ in c.decode(s))
    assert n_nonref > 10
    n = len(all_frames)
    idx = sorted(random.sample(range(n), 9)) + [n - 1]
    got = read_frames(path, idx)
    torch.testing.assert_close(got, torch.stack([all_frames[i] for i in idx]), rtol=0, atol=0)
    assert probe_video(path).total_num_frames == n


def test_frame_list_with_explicit_timestamps():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(5)]
    feats = preprocess_video(frames, OFFICIAL_VIDEO_CONFIG, options={"timestamps": [0.0, 0.4, 0.9, 1.5, 2.1]})
    assert feats.grid_thw[0] == 3  # 5 frames -> padded to 6 -> 3 temporal groups
    assert feats.timestamps == pytest.approx([0.2, 1.2, 2.1])
    # Padding repeats the last frame: the last group's two time slices are identical.
    rows = feats.pixel_values.view(-1, 3, 2, 16, 16)
    per_group = feats.grid_thw[1] * feats.grid_thw[2]
    last = rows[-per_group:]
    torch.testing.assert_close(last[:, :, 0], last[:, :, 1], rtol=0, atol=0)
    assert not torch.equal(rows[:per_group, :, 0], rows[:per_group, :, 1])
    with pytest.raises(ValueError, match="5 frames but 2 timestamps"):
        preprocess_video(frames, OFFICIAL_VIDEO_CONFIG, options={"timestamps": [0.0, 1.0]})
