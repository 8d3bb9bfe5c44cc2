"""Ask questions about a long video: index it once into a KV cache (kept on disk), then answer at once.

    python scripts/ask_video.py --checkpoint /path/to/Qwen3-VL-2B-Instruct --video talk.mp4 --fps 1 \\
        --max-context 1000000 --yarn-factor 3 --cache-dtype fp8 --cache runs/talk.kv \\
        --question "When does the speaker mention the deadline?" --question "What is on the first slide?"
    python scripts/ask_video.py --checkpoint ... --video talk.mp4 --cache runs/talk.kv --question "Who speaks last?"
    python scripts/ask_video.py --preset 2b --video talk.mp4 --fps 1 --max-context 262144 --question "..."  # random
    python scripts/ask_video.py --smoke     # a generated 300-frame mp4, tiny preset, CPU, seconds

The first call streams the video into the cache (eval/video_qa.py: decode, patchify and encode a chunk of frames
at a time, chunked prefill; a progress bar shows tokens/s and frames/s) and saves it to --cache; later calls with
the same --cache load it and only prefill the question. The pixel budget is chosen so that the video fills
--max-context minus --room tokens (a lower --fps gives each frame more pixels). Past 256K positions enable YaRN
(--yarn-factor 2 or 3; docs/long_context.md explains why not 4). Answers are printed with the timestamps the
prompt gave the video.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from eval.video_qa import VideoIndex
from model import Qwen3VL, load_pretrained, load_processor, preset
from model.generation import FP8
from model.processing.video_decode import probe_video

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CACHE_DTYPES = {"model": None, "bf16": torch.bfloat16, "fp8": FP8}
TOKENS_PER_GROUP_OVERHEAD = 12  # "<12345.6 seconds>" + <|vision_start|> + <|vision_end|>, tokens per temporal group


def video_options(processor, video: str, fps: float, budget: int, max_frames: int | None) -> dict:
    """Sampling options that fill `budget` video tokens: fps as asked, every sampled frame kept, the whole-video
    pixel budget (transformers rule: `total_pixels` over all frames) sized so that the token count fits."""
    meta = probe_video(video)
    n_frames = max(2, int(meta.total_num_frames / max(meta.fps, 1e-6) * fps)) if meta.fps else meta.total_num_frames
    opts = {"fps": fps, "max_frames": max_frames or max(n_frames + 2, 4), "min_frames": 2}
    groups = (n_frames + 1) // 2
    pixels_per_token = processor.video_config.factor ** 2 * processor.video_config.temporal_patch_size
    for _ in range(4):  # planning rounds sizes down; shrink until the plan fits
        opts["total_pixels"] = int(max(budget - groups * TOKENS_PER_GROUP_OVERHEAD, groups * 4) * pixels_per_token)
        plan = processor.plan_video(video, opts)
        t, h, w = plan.grid_thw
        tokens = t * (h * w // processor.video_config.merge_size ** 2 + TOKENS_PER_GROUP_OVERHEAD)
        if tokens <= budget:
            return opts
        budget = int(budget * budget / tokens * 0.99)
    raise ValueError(f"cannot fit {video} at {fps} fps into {budget} tokens; lower --fps")


def build_model(args, device, dtype):
    if args.checkpoint:
        model = load_pretrained(args.checkpoint, dtype=dtype, device=device, attn_backend=args.attn_backend)
    else:
        torch.manual_seed(args.seed)
        model = Qwen3VL(preset(args.preset, attn_backend=args.attn_backend)).to(device=device, dtype=dtype)
    if args.yarn_factor:
        model.set_rope_scaling("yarn", args.yarn_factor, args.yarn_original)
    return model.eval()


def write_smoke_video(path: Path, frames: int = 300, size=(96, 128), fps: int = 10):
    """A small mp4 (PyAV, libx264): a moving bar over a gradient, frame number encoded in the colour."""
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = size[0], size[1], "yuv420p"
        yy, xx = np.mgrid[: size[0], : size[1]]
        for i in range(frames):
            img = np.stack([(xx * 2 + i) % 256, (yy * 2) % 256, np.full_like(xx, (i * 7) % 256)], -1).astype(np.uint8)
            img[:, (i * 3) % size[1]: (i * 3) % size[1] + 6] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Index a long video into a KV cache once; ask it many questions.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory (official safetensors layout)")
    src.add_argument("--preset", help="random weights from a preset (tiny, 2b, 8b, ...): a pipeline and speed check")
    ap.add_argument("--video", help="video file (decoded with PyAV)")
    ap.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    ap.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    ap.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames (default: no cap)")
    ap.add_argument("--max-context", type=int, default=262144, help="KV cache length in tokens")
    ap.add_argument("--room", type=int, default=1024, help="tokens kept free for questions and answers")
    ap.add_argument("--cache", type=Path, help="directory of the saved index: built on the first call, loaded after")
    ap.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="model",
                    help="KV cache storage: the model's dtype, bf16, or fp8 (e4m3, per token and head scales)")
    ap.add_argument("--chunk-size", type=int, default=8192, help="tokens per prefill pass")
    ap.add_argument("--groups-per-chunk", type=int, default=32, help="temporal groups decoded/encoded at a time")
    ap.add_argument("--yarn-factor", type=float, default=0.0, help="YaRN factor (0: off; 2-3 for 1M from 256K)")
    ap.add_argument("--yarn-original", type=int, default=262144, help="YaRN original_max_position_embeddings")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--attn-backend", choices=("torch", "triton"), default=None,
                    help="default: triton on GPU, torch on CPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the answers and timings here")
    ap.add_argument("--smoke", action="store_true", help="generated video, tiny preset, two questions, CPU")
    args = ap.parse_args(argv)

    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory()
        args.video = args.video or str(Path(tmp.name) / "smoke.mp4")
        if not Path(args.video).exists():
            write_smoke_video(Path(args.video))
        args.preset = args.preset or "tiny"
        args.fps, args.max_context, args.room, args.max_new_tokens = 2.0, 4096, 256, 6
        args.cache = args.cache or Path(tmp.name) / "index"
        args.groups_per_chunk = 4
        args.question = args.question or ["What colour is the bar?", "When does the bar reach the right edge?"]
    if not args.checkpoint and not args.preset:
        ap.error("give --checkpoint DIR or --preset NAME")
    if not args.video and not (args.cache and (args.cache / "video.json").exists()):
        ap.error("give --video FILE (or a --cache directory that already holds an index)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.attn_backend = args.attn_backend or ("triton" if device.type == "cuda" else "torch")
    processor = load_processor(args.checkpoint) if args.checkpoint else load_processor()
    model = build_model(args, device, dtype)

    if args.cache and (args.cache / "video.json").exists():
        t0 = time.perf_counter()
        index = VideoIndex.load(model, processor, args.cache, room=args.room, video=args.video)
        print(f"loaded the index from {args.cache} in {time.perf_counter() - t0:.1f} s")
    else:
        opts = video_options(processor, args.video, args.fps, args.max_context - args.room - 64, args.max_frames)
        index = VideoIndex.build(model, processor, args.video, options=opts, max_context=args.max_context,
                                 room=args.room, cache_dtype=CACHE_DTYPES[args.cache_dtype],
                                 chunk_size=args.chunk_size, groups_per_chunk=args.groups_per_chunk)
        st = index.info.stats
        print(f"ingested {index.info.num_frames} frames into {index.info.prefix_len} tokens in "
              f"{index.info.ingest_s:.1f} s ({st['frames_per_s']:.1f} frames/s, {st['tokens_per_s']:.0f} tokens/s)")
        if args.cache:
            index.save(args.cache)
            print(f"saved the index to {args.cache}")
            if args.smoke:  # the second call's path: load it back and answer from the loaded cache
                index = VideoIndex.load(model, processor, args.cache, room=args.room, video=args.video)
    print(f"video {index.info.video}: {index.timestamps_summary()}")
    results = []
    for q in args.question:
        a = index.ask(q, max_new_tokens=args.max_new_tokens)
        print(f"Q: {q}\nA: {a.text!r}  ({a.new_tokens} tokens in {a.seconds:.2f} s after the cached video)")
        results.append({"question": q, "answer": a.text, "tokens": a.new_tokens, "seconds": a.seconds})
    if args.json:
        args.json.write_text(json.dumps({"video": index.info.video, "prompt_tokens": index.info.prefix_len,
                                         "ingest_s": index.info.ingest_s, "answers": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
