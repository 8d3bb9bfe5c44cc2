"""Whole-model decode with FP8 weights (W8A16, model/fp8.py's FP8Linear) vs bf16, at a Qwen3-VL text shape.

One random-weight model (the official checkpoints cannot be downloaded here). The bf16 run comes first. Then every
nn.Linear of the text decoder is quantised in place with 128 x 128 blocks, as in Qwen/Qwen3-VL-8B-Instruct-FP8.
The vision tower, the embedding and lm_head stay bf16. Each weight variant reports:
  - the weight memory;
  - the prefill time of a `--context`-token prompt (after a 128-token warm-up prefill: compilation excluded);
  - the median decode step at that length (generate's CUDA-graph step, model/generation.py's StaticDecoder, timed
    by scripts/_bench.py's decode_ms);
  - the peak memory;
  - how far the last prompt position's logits moved from bf16 (relative L2) and whether the top-1 token agrees.
The FP8 matmul has two backends: "triton" (kernels/fp8_linear: dequantised inside the matmul) and "torch"
(dequantise, then F.linear).

    python scripts/bench_fp8_decode.py --preset 8b --context 4096 --steps 32 --json runs/fp8_decode.json   # CUDA
    python scripts/bench_fp8_decode.py --smoke     # CPU, tiny preset, torch backend: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _bench import decode_ms, device_name, markdown_table, peak_memory_gib, reset_peak_memory

from model import Qwen3VL, preset
from model.fp8 import FP8Linear
from model.generation import KVCache

BLOCK = (128, 128)  # weight_block_size of the official *-Instruct-FP8 checkpoints


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def weight_gib(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30


@torch.no_grad()
def measure(model, ids: torch.Tensor, steps: int, chunk: int) -> tuple[dict, torch.Tensor]:
    """Prefill `ids` into a fresh cache, then time `steps` decode steps; returns (numbers, last prompt logits)."""
    warm = KVCache.for_model(model, 1, 256)  # compile / autotune on a short prompt first: not part of the timing
    model.prefill(ids[:, :128], warm, chunk_size=chunk)
    del warm
    cache = KVCache.for_model(model, 1, ids.shape[1] + steps + 8)
    reset_peak_memory()
    sync(ids.device)
    t0 = time.perf_counter()
    out = model.prefill(ids, cache, chunk_size=chunk)
    sync(ids.device)
    prefill_s = time.perf_counter() - t0
    ms = decode_ms(model, cache, steps)  # generate's CUDA-graph step on a GPU
    r = {"prefill_s": round(prefill_s, 3), "decode_ms": round(ms, 3), "peak_gib": round(peak_memory_gib(), 2)}
    return r, out.logits[0, -1].float()


def quantise_text_linears(model, backend: str) -> tuple[int, float]:
    """Swap every nn.Linear of the text decoder for an FP8Linear (quantised from its weight).

    Returns: (how many, the mean relative L2 error of the dequantised weights: the per-matmul error that the
    random-weight network then amplifies layer after layer into the logits' error)."""
    from model.fp8 import dequantize_blockwise

    lm = model.model.language_model
    names = [n for n, m in lm.named_modules() if type(m) is torch.nn.Linear]
    errs = []
    for n in names:
        lin = lm.get_submodule(n)
        q = FP8Linear.from_linear(lin, BLOCK, backend)
        w = lin.weight.float()
        errs.append(float((dequantize_blockwise(q.weight, q.weight_scale_inv, BLOCK, torch.float32) - w).norm()
                          / w.norm()))
        lm.set_submodule(n, q)
    return len(names), sum(errs) / max(1, len(errs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8b")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.preset, args.context, args.steps, args.chunk_size = "tiny", 96, 4, 64
        args.backends = ["torch"] if dev.type == "cpu" else args.backends
    elif dev.type != "cuda":
        raise SystemExit("bench_fp8_decode.py needs CUDA (or --smoke)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with dev:  # initialised on the device: an 8B model in fp32 on the host would take ~35 GB
        model = Qwen3VL(preset(args.preset, attn_backend="triton" if dev.type == "cuda" else "torch"))
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 100000, (1, args.context), generator=g).to(dev)
    rows = []
    r, ref = measure(model, ids, args.steps, args.chunk_size)
    rows.append({"weights": "bf16" if dtype == torch.bfloat16 else "fp32", "backend": "-",
                 "weight_gib": round(weight_gib(model), 2), **r})
    print(rows[-1], flush=True)
    n, w_err = quantise_text_linears(model, args.backends[0])
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for backend in args.backends:
        for m in model.modules():
            if isinstance(m, FP8Linear):
                m.backend = backend
        r, logits = measure(model, ids, args.steps, args.chunk_size)
        err = float((logits - ref).norm() / ref.norm())
        rows.append({"weights": "fp8", "backend": backend, "weight_gib": round(weight_gib(model), 2), **r,
                     "logits_rel_err": round(err, 4), "top1_agrees": bool(logits.argmax() == ref.argmax())})
        print(rows[-1], flush=True)
    head = (f"Decode with FP8 weights vs {rows[0]['weights']}, preset {args.preset} (random weights), "
            f"{n} text-decoder linears quantised with {BLOCK[0]} x {BLOCK[1]} blocks (mean weight rel. err "
            f"{w_err:.4f}), {args.context}-token prompt, "
            f"batch 1, {device_name(dev)}, torch {torch.__version__}")
    keys = ["weights", "backend", "weight_gib", "prefill_s", "decode_ms", "peak_gib", "logits_rel_err", "top1_agrees"]
    table = markdown_table(["weights", "FP8 matmul", "weight GiB", "prefill s", "decode ms/token", "peak GiB",
                            "logits rel. err", "top-1"], [[r.get(k, "-") for k in keys] for r in rows])
    print(head + "\n\n" + "\n".join(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": head, "weight_rel_err": w_err, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
