"""Long-video engine benchmark: stream a synthetic video into a 256K / 512K / 1M-token KV cache and ask it
questions, ours vs transformers' generate on the same inputs, on one GPU.

Per length: ingest time (frames/s, tokens/s; decode + patchify + vision tower + chunked prefill), peak GPU memory
and peak host RSS, first-answer and follow-up latency from the cache (a 20-token question, 32 new tokens), decode
ms/token at that cache length with the bf16 cache and after converting it to FP8 (KVCache.convert), next to the
time one read of the cache takes at the HBM bandwidth measured here (a device-to-device copy). transformers runs
`generate` on the one-shot processor's inputs (its time, or "OOM").

    python scripts/bench_long_video.py --preset 2b --lengths 262144 524288 1048576 --json runs/lv.json
    python scripts/bench_long_video.py --preset 8b --lengths 1048576 --cache-dtype fp8 --ingest-limit-s 240
    python scripts/bench_long_video.py --smoke      # CPU, tiny preset, a 300-frame video: checks the script runs

--ingest-limit-s stops the ingest after that many seconds and fills the rest of the cache with quantised random
keys (reported as such: "filled_tokens"), so that memory fit, follow-up latency and decode speed at the full length
can be measured when a full ingest would not fit one run; the ingest rate is then that of the part ingested.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import threading
import time
from pathlib import Path

import torch
from _bench import decode_ms, device_name, hf_twin, peak_memory_gib, reset_peak_memory

from model import Qwen3VL, load_processor, preset
from model.generation import FP8, KVCache, quantize_kv



class RSSPeak:
    """Peak resident set size of this process between start() and stop(), sampled every 50 ms (GiB)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def write_video(path: Path, seconds: int, fps: int, size=(480, 640)):
    """A synthetic video: a gradient that drifts, a bar that moves, the second number as a grey level band."""
    import av
    import numpy as np

    h, w = size
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([(xx // 3) % 256, (yy // 2) % 256, ((xx + yy) // 4) % 256], -1).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "30"})
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        s.thread_type = "AUTO"
        for i in range(seconds * fps):
            img = np.roll(base, i * 5, axis=1)
            img[:, (i * 13) % w: (i * 13) % w + 12] = 255
            img[: h // 10] = (i * 37) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def hbm_gbps(device) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), GB/s: the 'one read of the cache' yardstick."""
    if torch.device(device).type != "cuda":
        return 0.0
    x = torch.empty(4 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    del x, y
    return 2 * 4 * 2**30 / dt / 1e9


def fill_random(cache: KVCache, upto: int, seed: int = 0):
    """Fill [length, upto) with random keys/values of unit scale (quantised for FP8) and advance; positions
    continue one per token. Used only when the ingest was cut short (--ingest-limit-s)."""
    g = torch.Generator(device=cache.device).manual_seed(seed)
    n, step = cache.length, 65536
    while n < upto:
        e = min(upto, n + step)
        for i in range(cache.num_layers):
            for buf, sc in ((cache.k, cache.k_scale), (cache.v, cache.v_scale)):
                x = torch.randn(cache.batch, e - n, cache.num_kv_heads, cache.head_dim, generator=g,
                                device=cache.device, dtype=torch.bfloat16)
                if sc is None:
                    buf[i][:, n:e] = x.to(cache.dtype)
                else:
                    buf[i][:, n:e], sc[i][:, n:e] = quantize_kv(x)
        cache._pending = e - n
        pos = cache.next_position.view(1, 1, 1) + torch.arange(e - n, device=cache.device).view(1, 1, -1)
        cache.advance(torch.full((1, e - n), 1000), pos.expand(3, 1, -1))
        n = e


@torch.no_grad()
def warmup(model, chunk_size: int):
    """Compile and autotune the kernels the measured runs use (vision tower, chunked prefill, decode; bf16 and
    FP8 caches) on throwaway inputs, so the first measured length does not pay for it."""
    cfg = model.config
    n = 2 * chunk_size + 16
    for dtype in (None, FP8):
        cache = KVCache.for_model(model, 1, n + 8, dtype)
        ids = torch.randint(1000, 30000, (1, n), device=model.device)
        ids[0, 10:10 + 64] = cfg.video_token_id
        px = torch.randn(256, 3 * 2 * 16 * 16, device=model.device, dtype=model.dtype)
        model.prefill(ids, cache, chunk_size=chunk_size, pixel_values_videos=px,
                      video_grid_thw=torch.tensor([[1, 16, 16]], device=model.device))
        model.generate(ids[:, :4], past_key_values=cache, max_new_tokens=3, stop_token_ids=())
        del cache
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run_length(model, processor, video, length, args, bw):
    from ask_video import video_options

    from eval.video_qa import IndexInfo, VideoIndex
    from model.processing.stream import VideoStream

    reset_peak_memory()
    r = {"target_tokens": length}
    opts = video_options(processor, video, args.fps, length - args.room - 64, None)
    cache_dtype = FP8 if args.cache_dtype == "fp8" else None
    with RSSPeak() as rss:
        t0 = time.perf_counter()
        if args.ingest_limit_s:
            # ingest until the time limit, then fill the rest (reported)
            stream = VideoStream(processor, video, opts, groups_per_chunk=args.groups_per_chunk)
            cache = KVCache.for_model(model, 1, length, cache_dtype)
            prefix = stream.prompt_parts()[0].tolist()
            model.prefill(torch.tensor([prefix], device=model.device), cache, chunk_size=args.chunk_size)
            frames = 0
            for chunk in stream:
                model.prefill(chunk.input_ids.to(model.device)[None], cache, chunk_size=args.chunk_size,
                              pixel_values_videos=chunk.pixel_values.to(model.device),
                              video_grid_thw=torch.tensor([list(chunk.grid_thw)], device=model.device))
                frames += len(chunk.frame_indices)
                if time.perf_counter() - t0 > args.ingest_limit_s:
                    break
            torch.cuda.synchronize() if model.device.type == "cuda" else None
            ingest_s, ingested = time.perf_counter() - t0, cache.length
            total = len(prefix) + stream.num_tokens
            fill_random(cache, total)
            r |= {"filled_tokens": total - ingested}
            info = IndexInfo(video=str(video), video_bytes=os.path.getsize(video), options=opts,
                             grid_thw=list(stream.grid_thw), timestamps=list(stream.timestamps), prefix_len=total,
                             num_frames=frames, ingest_s=ingest_s,
                             stats={"tokens_per_s": ingested / ingest_s, "frames_per_s": frames / ingest_s})
            index = VideoIndex(model, processor, cache, info)
        else:
            index = VideoIndex.build(model, processor, video, options=opts, max_context=length,
                                     room=args.room, cache_dtype=cache_dtype, chunk_size=args.chunk_size,
                                     groups_per_chunk=args.groups_per_chunk, progress=args.progress)
            ingested = index.info.prefix_len
    r |= {"prompt_tokens": index.info.prefix_len, "ingested_tokens": ingested, "frames": index.info.num_frames,
          "grid_thw": index.info.grid_thw, "ingest_s": round(index.info.ingest_s, 2),
          "frames_per_s": round(index.info.stats["frames_per_s"], 2),
          "tokens_per_s": round(index.info.stats["tokens_per_s"], 1),
          "peak_gpu_gib_ingest": round(peak_memory_gib(), 2), "peak_host_rss_gib_ingest": round(rss.gib, 2),
          "cache_gib": round(index.cache.nbytes() / 2**30, 2), "cache_dtype": str(index.cache.dtype)}
    print(json.dumps(r), flush=True)
    q = " ".join(["When does the bar reach the right edge of the frame for the second time?"])
    q = processor.tokenizer.decode(processor.tokenizer.encode(q)[:20])
    kw = dict(max_new_tokens=args.new_tokens, stop_token_ids=())
    a1 = index.ask(q, **kw)
    a2 = index.ask(q.replace("second", "third"), **kw)
    r |= {"question_tokens": a1.question_tokens, "new_tokens": a2.new_tokens,
          "first_answer_s": round(a1.seconds, 3), "follow_up_s": round(a2.seconds, 3)}
    index.cache.truncate(index.info.prefix_len)
    ms = decode_ms(model, index.cache)
    r[f"decode_ms_{args.cache_dtype}_eager"] = round(decode_ms(model, index.cache, static=False), 3)
    read_ms = index.cache.nbytes() * index.cache.length / index.cache.max_len / (bw * 1e9) * 1e3 if bw else 0.0
    r |= {f"decode_ms_{args.cache_dtype}": round(ms, 3), f"read_ms_{args.cache_dtype}": round(read_ms, 3)}
    if args.cache_dtype != "fp8":
        index.cache.convert(FP8)
        ms8 = decode_ms(model, index.cache)
        read8 = index.cache.nbytes() * index.cache.length / index.cache.max_len / (bw * 1e9) * 1e3 if bw else 0.0
        r |= {"decode_ms_fp8": round(ms8, 3), "read_ms_fp8": round(read8, 3)}
    r["peak_gpu_gib"] = round(peak_memory_gib(), 2)
    print(json.dumps(r), flush=True)
    del index
    gc.collect()
    reset_peak_memory()
    return r, opts


def run_hf(model, processor, video, opts, args, length):
    """transformers' generate on the one-shot processor's inputs: (seconds, peak GiB) or 'OOM'."""
    q = "When does the bar reach the right edge of the frame for the second time?"
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(video), **opts}, {"type": "text", "text": q}]}]
    t0 = time.perf_counter()
    b = processor(msgs)
    prep = time.perf_counter() - t0
    hf = hf_twin(model.config, model.device, model.dtype)
    inputs = {k: v.to(model.device) for k, v in b.items() if isinstance(v, torch.Tensor)}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.video_token_id).long() * 2
    if "pixel_values_videos" in inputs:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    reset_peak_memory()
    out = {"target_tokens": length, "tokens": int(b["input_ids"].shape[1]), "processor_s": round(prep, 1)}
    try:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        out |= {"generate_s": round(time.perf_counter() - t0, 2), "peak_gpu_gib": round(peak_memory_gib(), 2)}
    except torch.OutOfMemoryError:
        out |= {"generate_s": "OOM", "peak_gpu_gib": round(peak_memory_gib(), 2)}
    del hf, inputs, b
    gc.collect()
    reset_peak_memory()
    print(json.dumps({"transformers": out}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[262144, 524288, 1048576])
    ap.add_argument("--seconds", type=int, default=7200, help="synthetic video duration")
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--video", type=Path, help="use this video instead of a synthetic one")
    ap.add_argument("--cache-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--groups-per-chunk", type=int, default=32)
    ap.add_argument("--room", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--yarn-factor", type=float, default=3.0)
    ap.add_argument("--ingest-limit-s", type=float, default=0.0)
    ap.add_argument("--hf", type=int, nargs="*", default=[], help="lengths at which to also run transformers")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.preset, args.lengths, args.seconds, args.fps = "tiny", [3000], 30, 4.0
        args.chunk_size, args.groups_per_chunk, args.new_tokens, args.room = 512, 8, 4, 128
        args.hf = args.hf or [3000]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Qwen3VL(preset(args.preset, attn_backend="triton" if device.type == "cuda" else "torch"))
    model = model.to(device=device, dtype=dtype).eval()
    if args.yarn_factor:
        model.set_rope_scaling("yarn", args.yarn_factor, 262144)
    processor = load_processor()
    video = args.video
    if video is None:
        video = Path(os.environ.get("TMPDIR", "/tmp")) / f"synthetic_{args.seconds}s.mp4"
        if not video.exists():
            t0 = time.perf_counter()
            write_video(video, args.seconds, 10 if args.smoke else 1, (96, 128) if args.smoke else (480, 640))
            print(f"wrote {video} ({args.seconds} s) in {time.perf_counter() - t0:.1f} s", flush=True)
    bw = hbm_gbps(device)
    t0 = time.perf_counter()
    warmup(model, args.chunk_size)
    print(f"warm-up (kernel compilation and autotuning) {time.perf_counter() - t0:.1f} s", flush=True)
    results = {"device": device_name(device), "preset": args.preset, "hbm_copy_gbps": round(bw, 1),
               "yarn_factor": args.yarn_factor, "chunk_size": args.chunk_size, "runs": [], "transformers": []}
    for length in args.lengths:
        try:
            r, opts = run_length(model, processor, video, length, args, bw)
        except torch.OutOfMemoryError as e:
            r, opts = {"target_tokens": length, "error": f"OOM: {e}"[:300]}, None
            gc.collect()
            reset_peak_memory()
        results["runs"].append(r)
        if length in args.hf and opts is not None:
            try:
                results["transformers"].append(run_hf(model, processor, video, opts, args, length))
            except Exception as e:  # report, keep going
                results["transformers"].append({"target_tokens": length, "error": repr(e)[:300]})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"peak host RSS over the run (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
