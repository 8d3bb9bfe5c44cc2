"""Full-size model checks and long-video prefill benchmark on a GPU, ours vs transformers, in one process.

Builds a Qwen3-VL-2B-shaped model with random weights (bf16), copies the same weights into transformers'
`Qwen3VLForConditionalGeneration`, then
  1. correctness: logits of a video prompt, ours (attn_backend torch and triton) vs transformers (sdpa), relative
     error in bf16; and gradients of ours with triton vs torch attention;
  2. speed: video prefill (N frames at 448x448 with timestamps, logits for the last token only), tokens/s and
     peak memory, for each implementation (results in docs/benchmarks.md).

    python scripts/bench_prefill.py --frames 64 256
    python scripts/bench_prefill.py --smoke           # CPU, tiny preset and shapes: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit (the CPU smoke run)

import torch
from _bench import device_name, hf_twin, median_ms, peak_memory_gib, reset_peak_memory

from model import Qwen3VL, preset

USER_TURN = [151644, 872, 198]  # "<|im_start|>user\n": fixed text before the video, as a chat prompt starts


def video_inputs(cfg, frames: int, side: int = 448, device="cuda", seed=0, dtype=torch.bfloat16):
    """A release-layout video prompt: per temporal group '<t seconds>' text + vision_start + pads + vision_end."""
    g = torch.Generator().manual_seed(seed)
    t, h = frames // 2, side // 16
    ids = list(USER_TURN)
    for k in range(t):
        ids += torch.randint(1000, 30000, (6,), generator=g).tolist()  # stands for "<12.3 seconds>"
        ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * h // 4) + [cfg.vision_end_token_id]
    ids += torch.randint(1000, 30000, (20,), generator=g).tolist()
    input_ids = torch.tensor([ids], device=device)
    px = torch.randn(t * h * h, 1536, generator=g).to(device, dtype)
    grid = torch.tensor([[t, h, h]], device=device)
    tt = (input_ids == cfg.video_token_id).long() * 2
    return dict(input_ids=input_ids, pixel_values_videos=px, video_grid_thw=grid), tt


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--check-frames", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--compile", action="store_true", help="also time ours with train.parallel.apply_compile()")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32, 2 frames of 32x32: checks it runs")
    args = ap.parse_args()
    import transformers

    dtype = torch.bfloat16
    reps = dict(reps=5, warmup=2)
    if args.smoke:  # fp32: the Triton interpreter's bf16 dots are wrong
        args.preset, args.device, args.side, args.frames, args.check_frames = "tiny", "cpu", 32, [2], 2
        dtype, reps = torch.float32, dict(reps=1, warmup=0)
    dev = args.device
    torch.manual_seed(0)
    cfg = preset(args.preset)
    ours = Qwen3VL(cfg).to(dev, dtype).eval()
    ours_tri = Qwen3VL(cfg.replace(attn_backend="triton"), init_weights=False).to(dev, dtype).eval()
    ours_tri.load_state_dict(ours.state_dict())
    hf = hf_twin(cfg, dev, dtype, state_dict=ours.state_dict())
    results = {"device": device_name(dev), "torch": torch.__version__, "transformers": transformers.__version__}

    def hf_forward(inp, tt):
        try:
            return hf(**inp, mm_token_type_ids=tt, logits_to_keep=1).logits
        except TypeError:
            return hf(**inp, logits_to_keep=1).logits

    # ---------------------------------------------------------------- correctness at full size
    inp, tt = video_inputs(cfg, args.check_frames, args.side, dev, dtype=dtype)
    with torch.no_grad():
        full_ref = hf(**inp, mm_token_type_ids=tt).logits
        a = ours(**inp).logits
    results["check_tokens"] = inp["input_ids"].shape[1]
    results["rel_err_ours_torch_vs_hf"] = rel(a, full_ref)
    try:
        with torch.no_grad():
            b = ours_tri(**inp).logits
        results["rel_err_ours_triton_vs_hf"] = rel(b, full_ref)
        results["rel_err_triton_vs_torch"] = rel(b, a)
        # gradients (triton vs torch backends) on a shorter prompt
        inp8, _ = video_inputs(cfg, 8, args.side, dev, seed=1, dtype=dtype)
        grads = []
        for m in (ours, ours_tri):
            m.zero_grad(set_to_none=True)
            loss = m(**inp8).logits.float().logsumexp(-1).mean()
            loss.backward()
            grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
        errs = {n: rel(grads[1][n], grads[0][n]) for n in grads[0] if grads[0][n].norm() > 0}
        worst = max(errs, key=errs.get)
        results["grad_rel_err_triton_vs_torch_worst"] = [worst, errs[worst]]
        results["grad_rel_err_triton_vs_torch_median"] = statistics.median(errs.values())
    except Exception as e:  # report and go on with the benchmark
        results["triton_error"] = f"{type(e).__name__}: {e}"[:2000]
    ours.zero_grad(set_to_none=True), ours_tri.zero_grad(set_to_none=True)
    grads = None
    print(json.dumps(results, indent=1), flush=True)

    # ---------------------------------------------------------------- prefill speed
    compiled = None
    if args.compile:
        compiled = Qwen3VL(cfg, init_weights=False).to(dev, dtype).eval()
        compiled.load_state_dict(ours.state_dict())
        from train.parallel import apply_compile

        apply_compile(compiled, dynamic=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            c_out = compiled(**inp).logits
            results["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
        results["rel_err_compiled_vs_eager"] = rel(c_out, a)
        print({k: results[k] for k in ("compile_first_call_s", "rel_err_compiled_vs_eager")}, flush=True)
    rows = []
    for frames in args.frames:
        inp, tt = video_inputs(cfg, frames, args.side, dev, dtype=dtype)
        n = inp["input_ids"].shape[1]
        impls = [("transformers (sdpa)", lambda: hf_forward(inp, tt)),
                 ("ours (torch sdpa)", lambda: ours(**inp, logits_to_keep=1).logits),
                 ("ours (triton)", lambda: ours_tri(**inp, logits_to_keep=1).logits)][:2 if args.smoke else 3]
        if compiled is not None:
            impls.append(("ours (torch sdpa, compiled blocks)", lambda: compiled(**inp, logits_to_keep=1).logits))
        for name, fn in impls:
            reset_peak_memory()
            try:
                with torch.no_grad():
                    ms = median_ms(fn, **reps)
                peak = peak_memory_gib()
                rows.append(dict(impl=name, frames=frames, tokens=n, ms=round(ms, 1),
                                 tok_per_s=round(n / ms * 1000), peak_gib=round(peak, 2)))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(impl=name, frames=frames, tokens=n, ms=None, tok_per_s=None, peak_gib="OOM"))
            except Exception as e:
                rows.append(dict(impl=name, frames=frames, tokens=n, ms=None, tok_per_s=None,
                                 peak_gib=f"error {type(e).__name__}: {str(e)[:200]}"))
            print(rows[-1], flush=True)
    results["prefill"] = rows
    print("\n| impl | frames | tokens | ms | tokens/s | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['frames']} | {r['tokens']} | {r['ms']} | {r['tok_per_s']} | {r['peak_gib']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
