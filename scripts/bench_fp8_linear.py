"""Benchmark the W8A16 FP8 linear (kernels.fp8_linear) on the Qwen3-VL-8B decoder's linear layers: time and weight
memory against bf16 F.linear and against dequantise-then-F.linear (model/fp8.py's "torch" backend).

Shapes (Qwen3-VL-8B text decoder, hidden 4096, intermediate 12288, 32 heads x 128, 8 KV heads): q/o_proj
4096x4096, k/v_proj 1024x4096, gate/up_proj 12288x4096, down_proj 4096x12288; weight blocks 128 x 128 as in
Qwen/Qwen3-VL-8B-Instruct-FP8. Rows M = 1, 4, 16 are decode (batch of M sequences), 512 / 4096 prefill. "layer"
sums the seven matmuls of one decoder layer; "36 layers" scales the weight bytes to the 8B decoder. Timing:
median of 50 calls after 10 warm-up calls, L2 flushed before each (scripts/_bench.py).

    python scripts/bench_fp8_linear.py [--rows 1 4 16 512 4096] [--out results.md]   # CUDA
    python scripts/bench_fp8_linear.py --sweep [--rows 1 4 16]   # CUDA: tile / split-K search, per layer shape
    python scripts/bench_fp8_linear.py --smoke     # CPU, Triton interpreter, tiny fp32 shapes: checks it runs

Two timings per row count: eager (each call launched from Python, as a training step or an eager forward runs it)
and graph (the seven matmuls captured in one CUDA graph and replayed: the GPU time alone, which is what decode
pays, since generate replays its step as a CUDA graph). With few rows the eager time of the Triton path is
mostly launch overhead. --sweep times every (BLOCK_N, BLOCK_K, num_warps, num_stages, split) candidate on each
layer shape as a graph and prints the fastest next to the default (`kernels/fp8_linear._config` / `_split_k`).

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
from _bench import device_name, graph_ms, median_ms

from kernels.fp8_linear import _config, _forward, _split_k, fp8_linear
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
    ap.add_argument("--sweep", action="store_true", help="search tile shapes and split-K per layer shape (CUDA)")
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
             "| rows | bf16 F.linear ms | fp8 triton ms | fp8 dequant+F.linear ms | triton vs bf16 | graph: bf16 ms | "
             "graph: fp8 triton ms | graph: triton vs bf16 | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    if args.sweep:
        if not cuda:
            raise SystemExit("--sweep needs CUDA")
        return sweep(weights, args.rows, block, dtype, lines[0])
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
        g = {kind: graph_ms(lambda: run(kind)) if cuda else float("nan") for kind in ("bf16", "triton")}
        err = max(((fp8_linear(xs[nm], q, s, block).float() - F.linear(xs[nm], dequantize_blockwise(q, s, block, dtype))
                    .float()).abs().max() / F.linear(xs[nm], w).float().abs().max()).item()
                  for nm, (w, q, s) in weights.items())
        lines.append(f"| {m} | {t['bf16']:.3f} | {t['triton']:.3f} | {t['torch']:.3f} | "
                     f"{t['bf16'] / t['triton']:.2f}x | {g['bf16']:.3f} | {g['triton']:.3f} | "
                     f"{g['bf16'] / g['triton']:.2f}x | {err:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


def sweep(weights: dict, rows: list[int], block: tuple[int, int], dtype, title: str):
    """Per row count and layer shape: graph time of the default config and of every candidate; prints the best."""
    # BLOCK_K must divide the quantisation block's width for the per-tile scale path (128 in the official layout)
    cands = [(16, bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (64, 128) if block[1] % bk == 0
             for w in (2, 4, 8) for st in (2, 3, 4, 6) if not (bn == 128 and w == 2)]
    failed = 0
    print(title, "\nsweep: graph ms per matmul; config = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), split = K slices")
    for m in rows:
        total_default = total_best = total_bf16 = 0.0
        done = {}  # (n, k) -> times: o_proj is q_proj's shape, v_proj k_proj's, up_proj gate_proj's
        for name, (w, q, s) in weights.items():
            n, k = q.shape
            if (n, k) in done:
                t0, t_bf16, bt = done[(n, k)]
                total_default, total_best, total_bf16 = total_default + t0, total_best + bt, total_bf16 + t_bf16
                continue
            x = torch.randn(m, k, device=q.device, dtype=dtype)
            ref = F.linear(x, dequantize_blockwise(q, s, block, dtype)).float()
            t_bf16 = graph_ms(lambda: F.linear(x, w))
            cfg0 = _config(m, x)
            split0 = _split_k(m, n, k, *cfg0[:3], x)
            t0 = graph_ms(lambda: _forward(x, q, s, block, None))
            best = (t0, cfg0, split0)
            for cfg in cands:
                tiles = triton.cdiv(n, cfg[1])
                for split in sorted({1, 2, 4, 8, max(1, triton.cdiv(264, tiles))}):
                    if k // split < cfg[2]:
                        continue
                    try:
                        y = _forward(x, q, s, block, None, config=cfg, split=split)
                        if (y.float() - ref).abs().max() > 2e-2 * ref.abs().max():
                            print(f"  {name} {cfg} split {split}: WRONG result, skipped")
                            continue
                        t = graph_ms(lambda: _forward(x, q, s, block, None, config=cfg, split=split), reps=10)
                    except Exception:  # out of shared memory / registers for this tile: not a candidate
                        failed += 1
                        continue
                    if t < best[0]:
                        best = (t, cfg, split)
            gbs = (q.numel() + s.numel() * 4) / best[0] / 1e6
            print(f"rows {m} {name} ({n}x{k}): bf16 {t_bf16:.4f} ms, fp8 default {cfg0} split {split0} {t0:.4f} ms, "
                  f"best {best[1]} split {best[2]} {best[0]:.4f} ms ({gbs:.0f} GB/s)", flush=True)
            total_default, total_best, total_bf16 = total_default + t0, total_best + best[0], total_bf16 + t_bf16
            done[(n, k)] = (t0, t_bf16, best[0])
        print(f"rows {m} layer: bf16 {total_bf16:.3f} ms, fp8 default {total_default:.3f} ms, "
              f"fp8 best {total_best:.3f} ms ({failed} candidates did not compile or run)", flush=True)


if __name__ == "__main__":
    main()
