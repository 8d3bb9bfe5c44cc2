"""Benchmark: decode + preprocess a 10-minute 720p video at fps 2, ours vs qwen-vl-utils + transformers (CPU).

Generates (once, cached in /tmp) a synthetic 1280x720, 24 fps, 600 s H.264 file with PyAV: a cheap moving pattern
(low complexity, so generation is fast), libx264 defaults apart from the `veryfast` preset (keyframe interval 250).
Then, on the same file and in the same process:

  ours-qvu   model.processing.preprocess_video(rule="qwen-vl-utils")  -- same frames and sizes as qwen-vl-utils
  ref-qvu    qwen_vl_utils.fetch_video (decord reader) + transformers Qwen3VLVideoProcessor(do_resize=False,
             do_sample_frames=False), the Qwen3-VL README recipe
  ours-hf    model.processing.preprocess_video(rule="transformers") with the official video budget
  ref-hf     transformers load_video(backend="pyav") + Qwen3VLVideoProcessor, the official budget

Each path produces pixel_values_videos (N, 1536) fp32 + grid. We check that the sampled frame indices and grids agree
(and for the transformers pair that the pixels are identical; decord and PyAV convert YUV->RGB with different
swscale settings, so the qwen-vl-utils pair is compared by max |diff| only), and print a Markdown table.

    python scripts/bench_video.py [--repeats 1] [--skip-ref-hf] [--threads N]
    python scripts/bench_video.py --smoke        # a 3-second 128x96 video: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from _bench import median_ms

FPS = 24
FULL = (1280, 720, 600)  # width, height, seconds
SMOKE = (128, 96, 3)


def make_video(W: int, H: int, seconds: int) -> str:
    """Write the synthetic video once (720p: about a minute on 2 cores): a scrolling gradient with a moving box."""
    import av

    path = os.path.join(tempfile.gettempdir(), f"qwen3vl_bench_{W}x{H}_{FPS}fps_{seconds}s.mp4")
    if os.path.exists(path):
        return path
    tmp = path + ".part.mp4"
    y = (np.add.outer(np.arange(H) // 3, np.arange(W) // 5) % 256).astype(np.uint8)
    u = np.full((H // 2, W // 2), 100, np.uint8)
    v = np.full((H // 2, W // 2), 150, np.uint8)
    with av.open(tmp, "w") as c:
        s = c.add_stream("libx264", rate=FPS, options={"preset": "veryfast"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(FPS * seconds):
            yy = np.roll(y, 4 * i, axis=1)
            box = min(100, H // 4)
            r, col = (i * 7) % (H - box), (i * 11) % (W - box)
            yy[r : r + box, col : col + box] = 255 - (i % 200)
            frame = av.VideoFrame.from_ndarray(np.concatenate([yy, u.reshape(-1, W), v.reshape(-1, W)]),
                                               format="yuv420p")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def ours(path, rule):
    from model.processing import OFFICIAL_VIDEO_CONFIG, preprocess_video

    f = preprocess_video(path, OFFICIAL_VIDEO_CONFIG, rule=rule, options={"fps": 2.0})
    return f.pixel_values, list(f.grid_thw), f.frame_indices


def _hf_video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
                                 temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def ref_qvu(path):
    from qwen_vl_utils import fetch_video

    video, meta = fetch_video({"video": path, "fps": 2.0}, image_patch_size=16, return_video_metadata=True)
    out = _hf_video_processor()(videos=[video], video_metadata=[meta], do_resize=False, do_sample_frames=False,
                                return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"][0].tolist(), [int(i) for i in meta["frames_indices"]]


def ref_hf(path):
    from transformers.video_utils import load_video

    vp = _hf_video_processor()
    frames, meta = load_video(path, backend="pyav",
                              sample_indices_fn=lambda metadata, **kw: vp.sample_frames(metadata, fps=2.0))
    out = vp(videos=[frames], video_metadata=[meta], do_sample_frames=False, cap_pixels_per_frame=False,
             return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"][0].tolist(), [int(i) for i in meta.frames_indices]


def timed(fn, *args, repeats=1):
    """(median seconds over `repeats` calls, the last call's result)."""
    out = {}
    ms = median_ms(lambda: out.__setitem__("r", fn(*args)), reps=repeats, warmup=0)
    return ms / 1e3, out["r"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-ref-hf", action="store_true", help="skip the slow transformers-only baseline")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--smoke", action="store_true", help=f"a {SMOKE[2]}-second {SMOKE[0]}x{SMOKE[1]} video")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    path = make_video(*(SMOKE if args.smoke else FULL))
    print(f"video: {path} ({os.path.getsize(path) / 1e6:.1f} MB, ready in {time.perf_counter() - t0:.1f} s)")
    # Warm the page cache and imports so the first timed path is not penalised.
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    import av, decord, qwen_vl_utils, transformers  # noqa: F401,E401

    rows = []
    pairs = [("qwen-vl-utils", ours, ref_qvu)] + ([] if args.skip_ref_hf else [("transformers", ours, ref_hf)])
    for rule, mine_fn, ref_fn in pairs:
        t_ref, (pv_ref, g_ref, idx_ref) = timed(ref_fn, path, repeats=args.repeats)
        ref_shape = tuple(pv_ref.shape)
        t_ours, (pv, g, idx) = timed(mine_fn, path, rule, repeats=args.repeats)
        same_frames = idx == idx_ref and g == g_ref
        diff = (pv - pv_ref).abs().max().item() if pv.shape == pv_ref.shape else float("nan")
        rows.append((rule, len(idx), g, ref_shape, t_ref, t_ours, same_frames, diff))
        del pv_ref, pv

    print()
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"torch {torch.__version__}, av {av.__version__}, decord {decord.__version__}, "
          f"transformers {transformers.__version__}, qwen-vl-utils 0.0.14")
    print(f"command: python scripts/bench_video.py {' '.join(sys.argv[1:])}")
    print()
    print("| sampling / sizing rule | frames | grid (t, h, w) | reference | reference s | ours s | speedup "
          "| same frames + grid | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"qwen-vl-utils": "qwen-vl-utils fetch_video (decord) + transformers processor",
             "transformers": "transformers load_video (pyav) + Qwen3VLVideoProcessor"}
    for rule, n, g, shape, t_ref, t_ours, same, diff in rows:
        print(f"| {rule} | {n} | {tuple(g)} | {names[rule]} | {t_ref:.1f} | {t_ours:.1f} | {t_ref / t_ours:.2f}x "
              f"| {'yes' if same else 'NO'} | {diff:.3g} |")


if __name__ == "__main__":
    main()
