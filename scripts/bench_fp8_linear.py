"""Benchmark the W8A16 FP8 linear (kernels.fp8_linear) on the Qwen3-VL-8B decoder's linear layers: time and weight
memory against bf16 F.linear and against dequantise-then-F.linear (model/fp8.py's "torch" backend).

Shapes (Qwen3-VL-8B text decoder, hidden 4096, intermediate 12288, 32 heads x 128, 8 KV heads): q/o_proj
4096x4096, k/v_proj 1024x4096, gate/up_proj 12288x4096, down_proj 4096x12288; weight blocks 128 x 128 as in
Qwen/Qwen3-VL-8B-Instruct-FP8. Rows M = 1, 4, 16 are decode (batch of M sequences), 512 / 4096 prefill. "layer"
sums the seven matmuls of one decoder layer; "36 layers" scales the weight bytes to the 8B decoder. Timing:
median of 50 calls after 10 warm-up calls, L2 flushed before each (scripts/_bench.py).

    python scripts/bench_fp8_linear.py [--rows 1 4 16 512 4096] [--out results.md]   # CUDA
    python scripts/bench_fp8_linear.py --smoke     # CPU, Triton interpreter, tiny fp32 shapes: checks it runs

Not yet run on a GPU (written in a session without one): no numbers in docs/benchmarks.md yet.
"""
import argparse
import datetime
import os
import platform
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton.jit

import torch
import torch.nn.functional as F
import triton
from _bench import device_name, median_ms

from kernels.fp8_linear import fp8_linear
from model.fp8 import dequantize_blockwise, quantize_blockwise

SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (12288, 4096), "up_proj": (12288, 4096), "down_proj": (4096, 12288)}
SHAPES_SMOKE = {"q_proj": (64, 48), "down_proj": (40, 96)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 512, 4096])
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128])
    ap.add_argument("--out", default=None, help="also append the table to this markdown file")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.smoke:
        shapes, rows, block = SHAPES_SMOKE, [1, 5], (16, 16)
    else:
        shapes, rows, block = SHAPES_8B, args.rows, tuple(args.block)
    reps, warmup = (50, 10) if cuda else (2, 1)
    torch.manual_seed(0)
    weights = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        q, s = quantize_blockwise(w, block)
        weights[name] = (w, q, s)
    bytes_bf16 = sum(w.numel() * 2 for w, _, _ in weights.values())
    bytes_fp8 = sum(q.numel() + s.numel() * 4 for _, q, s in weights.values())
    lines = [f"FP8 W8A16 linear, Qwen3-VL-8B decoder layer shapes, {device_name(device)}, {dtype}, torch "
             f"{torch.__version__}, triton {triton.__version__}, {platform.python_version()}, "
             f"{datetime.date.today()}", f"command: python {' '.join(sys.argv)}", "",
             f"weight bytes per layer: bf16 {bytes_bf16 / 2**20:.1f} MiB, fp8 + scales {bytes_fp8 / 2**20:.1f} MiB; "
             f"36 layers: {36 * bytes_bf16 / 2**30:.2f} GiB vs {36 * bytes_fp8 / 2**30:.2f} GiB", "",
             "| rows | bf16 F.linear ms | fp8 triton ms | fp8 dequant+F.linear ms | triton vs bf16 | max rel err |",
             "|---|---|---|---|---|---|"]
    for m in rows:
        xs = {name: torch.randn(m, w.shape[1], device=device, dtype=dtype) for name, (w, _, _) in weights.items()}

        def run(kind):
            for name, (w, q, s) in weights.items():
                if kind == "bf16":
                    F.linear(xs[name], w)
                elif kind == "triton":
                    fp8_linear(xs[name], q, s, block)
                else:
                    F.linear(xs[name], dequantize_blockwise(q, s, block, dtype))

        t = {kind: median_ms(lambda: run(kind), reps=reps, warmup=warmup, flush_l2=cuda)
             for kind in ("bf16", "triton", "torch")}
        err = max(((fp8_linear(xs[nm], q, s, block).float() - F.linear(xs[nm], dequantize_blockwise(q, s, block, dtype))
                    .float()).abs().max() / F.linear(xs[nm], w).float().abs().max()).item()
                  for nm, (w, q, s) in weights.items())
        lines.append(f"| {m} | {t['bf16']:.3f} | {t['triton']:.3f} | {t['torch']:.3f} | "
                     f"{t['bf16'] / t['triton']:.2f}x | {err:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
