"""Full-size model checks and long-video prefill benchmark on a GPU, ours vs transformers, in one process.

Builds a Qwen3-VL-2B-shaped model with random weights (bf16), copies the same weights into transformers'
`Qwen3VLForConditionalGeneration`, then
  1. correctness: logits of a video prompt, ours (attn_backend torch and triton) vs transformers (sdpa), relative
     error in bf16; and gradients of ours with triton vs torch attention;
  2. speed: video prefill (N frames at 448x448 with timestamps, logits for the last token only), tokens/s and
     peak memory, for each implementation (BENCHMARKS.md: transformers 33.2K tokens/s at 64 frames on H100).

    python scripts/bench_prefill.py --frames 64 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from model import Qwen3VL, preset  # noqa: E402
from timing import median_ms  # noqa: E402  (scripts/timing.py)

IMAGE, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653


def video_inputs(frames: int, side: int = 448, device="cuda", seed=0):
    """A release-layout video prompt: per temporal group '<t seconds>' text + vision_start + pads + vision_end."""
    g = torch.Generator().manual_seed(seed)
    t, h = frames // 2, side // 16
    ids = [151644, 872, 198]
    for k in range(t):
        ids += torch.randint(1000, 30000, (6,), generator=g).tolist()  # stands for "<12.3 seconds>"
        ids += [VSTART] + [VIDEO] * (h * h // 4) + [VEND]
    ids += torch.randint(1000, 30000, (20,), generator=g).tolist()
    input_ids = torch.tensor([ids], device=device)
    px = torch.randn(t * h * h, 1536, generator=g).to(device, torch.bfloat16)
    grid = torch.tensor([[t, h, h]], device=device)
    tt = (input_ids == VIDEO).long() * 2
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
    args = ap.parse_args()
    import transformers

    dev = args.device
    torch.manual_seed(0)
    cfg = preset(args.preset)
    ours = Qwen3VL(cfg).to(dev, torch.bfloat16).eval()
    ours_tri = Qwen3VL(cfg.replace(attn_backend="triton"), init_weights=False).to(dev, torch.bfloat16).eval()
    ours_tri.load_state_dict(ours.state_dict())
    hf_cfg = transformers.Qwen3VLConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        hf = transformers.Qwen3VLForConditionalGeneration(hf_cfg).to(torch.bfloat16).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__}

    def hf_forward(inp, tt):
        try:
            return hf(**inp, mm_token_type_ids=tt, logits_to_keep=1).logits
        except TypeError:
            return hf(**inp, logits_to_keep=1).logits

    # ---------------------------------------------------------------- correctness at full size
    inp, tt = video_inputs(args.check_frames, args.side, dev)
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
        inp8, _ = video_inputs(8, args.side, dev, seed=1)
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
        compiled = Qwen3VL(cfg, init_weights=False).to(dev, torch.bfloat16).eval()
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
        inp, tt = video_inputs(frames, args.side, dev)
        n = inp["input_ids"].shape[1]
        impls = [("transformers (sdpa)", lambda: hf_forward(inp, tt)),
                 ("ours (torch sdpa)", lambda: ours(**inp, logits_to_keep=1).logits),
                 ("ours (triton)", lambda: ours_tri(**inp, logits_to_keep=1).logits)]
        if compiled is not None:
            impls.append(("ours (torch sdpa, compiled blocks)", lambda: compiled(**inp, logits_to_keep=1).logits))
        for name, fn in impls:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    ms = median_ms(fn)
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
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
