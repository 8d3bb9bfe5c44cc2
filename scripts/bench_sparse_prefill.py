"""Block-sparse prefill attention vs dense on one GPU: one decoder layer's causal attention at the Qwen3-VL-2B shape
(16 query heads, 8 key/value heads, head_dim 128, bf16) over a whole prompt of N tokens.

For each N: dense = cuDNN through SDPA (`scaled_dot_product_attention(is_causal=True, enable_gqa=True)` under the
cuDNN backend, falling back to flash when cuDNN is unavailable), and for each estimator (kernels/attention/
sparse_patterns.py: xattention, vertical_slash, window) the estimator's time, the block-sparse kernel's time
(kernels/attention/sparse.py), their sum, the speedup of the sum over dense and the block density (the share of the
causal blocks computed). Also the error of the sparse output against dense (relative Frobenius).

q, k, v come from `--data`:
  random: i.i.d. normal (attention is near uniform: a worst case for the adaptive estimators' density);
  local:  keys follow a slowly drifting random walk and queries are keys plus noise, so scores peak near the
          diagonal with a few sink tokens (a stand-in for the local and sink structure of trained models);
  text / video: q, k, v captured from layer --layer of a trained checkpoint (--checkpoint DIR, model/ loader)
          on a text (random token) or video (random frames) prompt of N tokens, through Qwen3VL.prefill with a
          forward hook. The issue's target (>= 8x dense at 1M, >= 4x at 256K, estimator included) is judged on these.
With --engine the whole model's chunked prefill (Qwen3VL.prefill, the long-video engine) is timed per method
instead (every layer, estimator included; --checkpoint, or the 2B preset with random weights).

    python scripts/bench_sparse_prefill.py --lengths 131072 262144 524288 1048576 --data local \
        --out docs/bench_sparse_prefill.md
    python scripts/bench_sparse_prefill.py --data text --checkpoint /ckpt/qwen3vl-2b --lengths 131072 262144
    python scripts/bench_sparse_prefill.py --engine --data video --checkpoint /ckpt/qwen3vl-2b --lengths 262144
    python scripts/bench_sparse_prefill.py --smoke   # CPU, Triton interpreter, tiny shapes: checks the script runs
Results go to docs/benchmarks.md ("Block-sparse prefill").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit (the CPU smoke run)

import torch
import torch.nn.functional as F
from _bench import device_name, markdown_table

from kernels.attention import sparse_attention
from kernels.attention.sparse_patterns import ESTIMATORS, block_density

HQ, HKV, D = 16, 8, 128  # Qwen3-VL-2B text decoder attention (config.json of Qwen/Qwen3-VL-2B-Instruct)


def synthetic(n: int, kind: str, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "random":
        q = torch.randn(1, n, HQ, D, device=device, generator=g)
        k = torch.randn(1, n, HKV, D, device=device, generator=g)
    else:  # local: a random walk over positions (nearby keys alike) + a strong shared direction on 4 sink tokens
        step = torch.randn(1, n, HKV, D, device=device, generator=g) * 0.05
        k = step.cumsum(1)
        k = k - k.mean(1, keepdim=True)
        k[:, :4] += 3.0
        k = F.normalize(k, dim=-1) * 4.0
        q = k.repeat_interleave(HQ // HKV, dim=2) + 0.5 * torch.randn(1, n, HQ, D, device=device, generator=g)
    v = torch.randn(1, n, HKV, D, device=device, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def prompt(n: int, kind: str, cfg, device):
    """A text (random tokens) or video (temporal groups of 448 x 448 frames: 196 merged tokens and 5 text tokens
    each, random pixels) prompt of about n tokens: (input_ids (1, L), visual inputs)."""
    if kind == "text":
        return torch.randint(1000, 30000, (1, n), device=device), {}
    groups = max(1, n // 201)
    ids = []
    for _ in range(groups):
        ids += [1000] * 3 + [cfg.vision_start_token_id] + [cfg.video_token_id] * 196 + [cfg.vision_end_token_id]
    media = dict(pixel_values_videos=torch.randn(groups * 784, 1536, device=device, dtype=torch.bfloat16),
                 video_grid_thw=torch.tensor([[groups, 28, 28]], device=device))
    return torch.tensor([ids], device=device), media


def load_model(checkpoint: str | None, device):
    """The trained checkpoint (model/ loader), or the 2B preset with random weights, bf16."""
    if checkpoint:
        from model import load_pretrained

        return load_pretrained(checkpoint, device=device, dtype=torch.bfloat16).eval()
    from model import Qwen3VL, preset

    return Qwen3VL(preset("2b")).to(device, torch.bfloat16).eval()


def captured(n: int, kind: str, checkpoint: str, layer: int, device):
    """q, k, v of one decoder layer on a text or video prompt of n tokens (a dense chunked prefill with a hook)."""
    from model.generation import KVCache
    from model.rope import apply_rotary

    model = load_model(checkpoint, device)
    ids, media = prompt(n, kind, model.config, device)
    got = []

    def hook(mod, args, kwargs, out):  # the layer's queries, recomputed from its input (k, v: from the cache)
        x, cos, sin = args[0], args[1], args[2]
        B, L, _ = x.shape
        got.append(apply_rotary(mod.q_norm(mod.q_proj(x).view(B, L, mod.hq, mod.hd)), cos, sin))

    h = model.model.language_model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    cache = KVCache.for_model(model, 1, ids.shape[1])
    with torch.no_grad():
        model.prefill(ids, cache, chunk_size=8192, **media)
    h.remove()
    L = ids.shape[1]
    return torch.cat(got, 1).bfloat16(), cache.k[layer][:, :L].bfloat16(), cache.v[layer][:, :L].bfloat16()


def engine(args, dev):
    """Whole-model chunked prefill (Qwen3VL.prefill, the long-video engine) per method: seconds and speedup."""
    from model.generation import KVCache

    model = load_model(args.checkpoint, dev)
    rows = []
    for n in args.lengths:
        ids, media = prompt(n, "video" if args.data == "video" else "text", model.config, dev)
        base = None
        for m in ["none"] + args.methods:
            sp = None if m == "none" else dict(method=m, block_size=args.block, params=METHOD_PARAMS[m])
            cache = KVCache.for_model(model, 1, ids.shape[1])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.prefill(ids, cache, chunk_size=args.chunk_size, sparsity=sp, **media)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            base = base or t
            rows.append(dict(tokens=ids.shape[1], method=m, seconds=t, speedup=base / t))
            print(f"N={ids.shape[1]} {m}: {t:.1f} s ({base / t:.2f}x)", flush=True)
            cache = None
            torch.cuda.empty_cache()
    src = args.checkpoint or "random 2B weights"
    text = (f"Chunked prefill (Qwen3VL.prefill, chunk {args.chunk_size}), {args.data} prompt, {src}, block "
            f"{args.block}, {device_name(dev)}, torch {torch.__version__}\n\n`{' '.join(sys.argv)}`\n\n"
            "| tokens | attn_sparsity | prefill s | speedup |\n|---|---|---|---|\n")
    text += "".join(f"| {r['tokens']:,} | {r['method']} | {r['seconds']:.1f} | {r['speedup']:.2f}x |\n" for r in rows)
    return text, rows


def timed(fn, reps=3):
    if not torch.cuda.is_available():  # the CPU smoke run
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2], out


def dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)


METHOD_PARAMS = {"xattention": dict(stride=16, threshold=0.9), "vertical_slash": {},
                 "window": dict(window=4096, num_global=128)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    ap.add_argument("--methods", nargs="+", default=list(METHOD_PARAMS), choices=list(METHOD_PARAMS))
    ap.add_argument("--data", default="local", choices=["random", "local", "text", "video"])
    ap.add_argument("--checkpoint", default=None, help="model directory for --data text / video")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--block", type=int, default=128, choices=[64, 128])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine", action="store_true",
                    help="time the whole model's chunked prefill per method instead of one layer's attention")
    ap.add_argument("--chunk-size", type=int, default=8192, help="--engine: prefill chunk")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, 256 tokens, block 64, fp32 inputs")
    args = ap.parse_args()
    if args.smoke:
        global HQ, HKV, D
        args.lengths, args.block, args.reps = [256], 64, 1
        HQ, HKV, D = 2, 1, 16  # the interpreter runs every program in Python
        METHOD_PARAMS["window"] = dict(window=64, num_global=16)
        METHOD_PARAMS["vertical_slash"] = dict(vertical_size=16, slash_size=16)
    elif not torch.cuda.is_available():
        sys.exit("bench_sparse_prefill.py needs CUDA (or --smoke)")
    if args.data in ("text", "video") and not args.checkpoint and not args.engine:
        sys.exit("--data text / video needs --checkpoint")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.engine:
        if not torch.cuda.is_available():
            sys.exit("--engine needs CUDA")
        text, rows = engine(args, dev)
        print(text)
        write(args, text, rows)
        return
    bs = (args.block, args.block)
    rows = []
    for n in args.lengths:
        if args.data in ("text", "video"):
            q, k, v = captured(n, args.data, args.checkpoint, args.layer, dev)
        else:
            q, k, v = synthetic(n, args.data, dev)
            if not q.is_cuda:  # the interpreter's bf16 dot is wrong: fp16 on the CPU
                q, k, v = q.half(), k.half(), v.half()
        n = q.shape[1]
        t_dense, o_dense = timed(lambda: dense(q, k, v), args.reps)
        print(f"N={n}: dense {t_dense:.3f} s", flush=True)
        rows.append(dict(tokens=n, method="dense (cuDNN SDPA)", estimator_s=0.0, kernel_s=t_dense, total_s=t_dense,
                         speedup=1.0, density=1.0, rel_err=0.0))
        for m in args.methods:
            est = ESTIMATORS[m]
            t_est, mask = timed(lambda: est(q, k, bs, causal=True, **METHOD_PARAMS[m]), args.reps)
            t_kern, o = timed(lambda: sparse_attention(q, k, v, mask, block_size=bs, causal=True), args.reps)
            err = float((o.float() - o_dense.float()).norm() / o_dense.float().norm())
            dens = block_density(mask, n, n, bs, causal=True)
            rows.append(dict(tokens=n, method=m, estimator_s=t_est, kernel_s=t_kern, total_s=t_est + t_kern,
                             speedup=t_dense / (t_est + t_kern), density=dens, rel_err=err))
            print(f"  {m}: estimator {t_est:.3f} s + kernel {t_kern:.3f} s = {t_dense / (t_est + t_kern):.2f}x, "
                  f"density {dens:.3f}, rel err {err:.3f}", flush=True)
            mask = o = None  # free before the next estimate
        q = k = v = o_dense = None
        torch.cuda.empty_cache()
    head = (f"Block-sparse prefill, one layer's causal attention, shape (Hq {HQ}, Hkv {HKV}, D {D}), bf16, "
            f"block {args.block}, data {args.data}, {device_name(dev)}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}\n\n`{' '.join(sys.argv)}`\n\n")
    table = markdown_table(
        ["tokens", "method", "estimator s", "kernel s", "total s", "speedup vs dense", "density", "rel. error"],
        [[f"{r['tokens']:,}", r["method"], f"{r['estimator_s']:.3f}", f"{r['kernel_s']:.3f}", f"{r['total_s']:.3f}",
          f"{r['speedup']:.2f}x", f"{r['density']:.3f}", f"{r['rel_err']:.3f}"] for r in rows])
    text = head + "\n".join(table) + "\n"
    print(text)
    write(args, text, rows)



def write(args, text: str, rows: list[dict]):
    """The table to --out and the rows to --json, where given."""
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
