"""Benchmark: host memory and time of streaming a long video (`VideoStream`) vs the one-shot processor (CPU).

Uses scripts/bench_video.py's synthetic 10-minute 1280x720 24 fps H.264 file (written once, cached in /tmp). Paths:

  one-shot     Qwen3VLProcessor.process_video: every sampled frame and every fp32 row at once
  stream gpc   model.processing.stream.VideoStream(groups_per_chunk=gpc): one decoding pass, a chunk at a time

Each path runs in its own fresh subprocess: imports and a warm-up on a 3-second clip first, then the peak RSS is
reset (/proc/self/clear_refs, Linux) and the path runs; reported are wall seconds, the peak RSS (VmHWM) above the
RSS before the run, the rows, the prompt tokens of the video and a float64 checksum of the rows, which must agree
across paths. (Not ru_maxrss: Linux carries the parent's high-water mark into a child through fork + exec.)

    python scripts/bench_video_stream.py [--fps 2] [--max-frames 1200] [--size 352x640] [--gpc 32 8]
    python scripts/bench_video_stream.py --smoke     # the 3-second 128x96 clip: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from bench_video import FULL, SMOKE, make_video

WARM = (128, 96, 3)


def _rss_mib(key: str) -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status[key].split()[0]) / 1024


def child(mode: str, path: str, warm: str, options: dict):
    """One path in this (fresh) process; prints a JSON line."""
    import torch

    from model import load_processor
    from model.processing.prompt import VIDEO_PAD, VISION_END, VISION_START
    from model.processing.stream import VideoStream

    proc = load_processor(None)

    def checksum(pv):  # float64 sum, 4096 rows at a time (a float64 copy of all rows would be the peak)
        return sum(float(pv[i:i + 4096].sum(dtype=torch.float64)) for i in range(0, len(pv), 4096))

    def run(video):
        if mode == "one-shot":
            feats = proc.process_video(video, options)
            text = proc.expand_text(VISION_START + VIDEO_PAD + VISION_END, [], [feats])
            return len(feats.pixel_values), len(proc.tokenizer.encode(text)), checksum(feats.pixel_values)
        stream = VideoStream(proc, video, options, groups_per_chunk=int(mode.split()[1]))
        rows, tokens, total = 0, 0, 0.0
        for chunk in stream:
            rows, tokens = rows + len(chunk.pixel_values), tokens + len(chunk.input_ids)
            total += checksum(chunk.pixel_values)
        return rows, tokens, total

    run(warm)
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    base = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    rows, tokens, checksum = run(path)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mib": _rss_mib("VmHWM") - base, "base_mib": base,
                      "rows": rows, "tokens": tokens, "checksum": checksum}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--max-frames", type=int, default=1200)
    ap.add_argument("--size", default="352x640", help="resized_height x resized_width of every frame")
    ap.add_argument("--gpc", type=int, nargs="+", default=[32, 8], help="groups_per_chunk values to stream with")
    ap.add_argument("--smoke", action="store_true", help=f"a {SMOKE[2]}-second {SMOKE[0]}x{SMOKE[1]} video")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    options = {"fps": args.fps, "max_frames": args.max_frames, "resized_height": h, "resized_width": w}
    if args.smoke:
        options = {"fps": args.fps}
    if args.child:
        return child(args.child, *args.paths, options)

    import av
    import torch

    t0 = time.perf_counter()
    path, warm = make_video(*(SMOKE if args.smoke else FULL)), make_video(*WARM)
    print(f"video: {path} ({os.path.getsize(path) / 1e6:.1f} MB, ready in {time.perf_counter() - t0:.1f} s); "
          f"options {options}")
    results = []
    for mode in ["one-shot"] + [f"stream {g}" for g in args.gpc]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--paths", path, warm]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print()
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"av {av.__version__}")
    print(f"command: python scripts/bench_video_stream.py {' '.join(sys.argv[1:])}")
    print()
    print("| path | rows | video tokens | seconds | peak RSS above start (MiB) | checksum equal |")
    print("|---|---|---|---|---|---|")
    ref = results[0]
    for r in results:
        # float64 sums in a different order: equal to ~1e-12 relative when the rows are the same
        same = (r["rows"], r["tokens"]) == (ref["rows"], ref["tokens"]) and abs(
            r["checksum"] - ref["checksum"]) <= 1e-9 * abs(ref["checksum"])
        print(f"| {r['mode']} | {r['rows']} | {r['tokens']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} "
              f"| {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
