"""Benchmark the MoE experts: kernels.moe (Triton) vs torch._grouped_mm vs transformers' Qwen3-VL-MoE block.

Shape: one Qwen3-VL-30B-A3B decoder MoE layer (hidden 2048, expert FFN 768, 128 experts, top-8), bf16, at several
token counts, forward (no grad) and forward+backward (all weights and x require grad; grads set to None between
runs). Two routings: "uniform" (random router) and "skewed" (every token picks expert 0, the other 7 choices
follow a Zipf(1.2) popularity, so many experts get few or no rows).

Rows:
  experts  ours        kernels.moe.moe_experts                      (given topk ids / weights)
  experts  grouped_mm  sort + torch._grouped_mm x2 + gather-sum     (same ids / weights; autograd backward;
                       "-colmajor": the weights stored transposed, as transformers feeds them)
  block    ours        model.moe.SparseMoeBlock, backend "triton"   (router included)
  block    hf-eager    transformers Qwen3VLMoeTextSparseMoeBlock, experts_implementation "eager" (the default of a
                       standalone block)
  block    hf-grouped  the same with experts_implementation "grouped_mm" (transformers' default inside a model)

`--sweep [KERNEL ...]` first times each (or each named) Triton kernel over a few tile configs at the largest token
count and uses the fastest (printed, to be copied into kernels/moe/grouped_gemm.py CONFIGS). Timing: median of
100 calls after 20 warm-up calls (30 after 10 in the sweep), L2 flushed before each (scripts/_bench.py); the 800 MB
of expert weights do not fit in L2 anyway.

    python scripts/bench_moe.py --tokens 4096 8192 16384 [--sweep [KERNEL ...]] [--out results.md]
    python scripts/bench_moe.py --smoke          # CPU, Triton interpreter, tiny fp32 shapes: checks the script runs
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton.jit

import torch
import torch.nn.functional as F
import triton
from _bench import device_name, median_ms

import kernels.moe.grouped_gemm as gg
from kernels.moe import build_schedule, moe_experts, moe_experts_ref
from model.moe import MoEConfig, SparseMoeBlock

H, I, E, K = 2048, 768, 128, 8
DT = torch.bfloat16
DEV = "cuda"


def bench(fn, grad_to_none=None, warmup=20, reps=100):
    """Median ms with the L2 flushed before each call; on the --smoke CPU path one timed call."""
    if DEV != "cuda":
        warmup, reps = 0, 1
    return median_ms(fn, reps=reps, warmup=warmup, grad_to_none=grad_to_none, flush_l2=True)


def routing(T, skewed, gen):
    if not skewed:
        scores = torch.randn(T, E, device=DEV, generator=gen)
    else:
        pop = torch.arange(1, E + 1, device=DEV, dtype=torch.float32) ** -1.2
        gumbel = -torch.log(-torch.log(torch.rand(T, E, device=DEV, generator=gen)))
        scores = pop.log() + gumbel  # Gumbel top-k = sampling without replacement from pop
        scores[:, 0] = 1e4
    ids = scores.topk(K, dim=-1).indices
    w = torch.rand(T, K, device=DEV, generator=gen) + 0.1
    return ids, (w / w.sum(-1, keepdim=True)).to(DT)


def experts_grouped_mm(x, w1, w2, ids, w):
    """The same math with torch._grouped_mm (bf16, int32 cumulative offsets)."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    offs = torch.searchsorted(sorted_ids, torch.arange(1, E + 1, device=x.device)).to(torch.int32)
    xs = x[order // k]
    gate, up = torch._grouped_mm(xs, w1, offs=offs).chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(gate) * up, w2, offs=offs) * w.reshape(-1)[order, None]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=x.device)
    return ys[inv].view(T, k, -1).sum(1, dtype=torch.float32).to(x.dtype)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_pair(fwd, params, dy):
    """(fwd ms with no grad, fwd+bwd ms)."""
    with torch.no_grad():
        t_fwd = bench(fwd)

    def train():
        out = fwd()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dy)

    t_train = bench(train, grad_to_none=params)
    return t_fwd, t_train


# ------------------------------------------------------------------------------------------------ sweep

CANDIDATES = {
    "gate_up": [(128, 64, 64, 8, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                (64, 128, 64, 4, 4), (128, 64, 32, 4, 5)],
    "down": [(128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 256, 64, 4, 3)],
    "down_bwd": [(128, 64, 64, 8, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                 (64, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4),
                 (128, 128, 32, 8, 4), (128, 64, 128, 8, 3)],
    "dx": [(128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
           (64, 256, 64, 4, 3)],
    "wgrad": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (64, 128, 64, 4, 4),
              (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 128, 4, 3),
              (256, 128, 64, 8, 3), (128, 128, 32, 4, 4)],
}


def sweep(T, gen, log, kinds):
    """Time each kernel of `kinds` (all when empty) over CANDIDATES; install and return the fastest configs."""
    x = torch.randn(T, H, device=DEV, generator=gen).to(DT)
    w1 = (torch.randn(E, H, 2 * I, device=DEV, generator=gen) * H ** -0.5).to(DT)
    w2 = (torch.randn(E, I, H, device=DEV, generator=gen) * I ** -0.5).to(DT)
    ids, w = routing(T, False, gen)
    N = T * K
    gu = torch.randn(N, 2 * I, device=DEV, generator=gen).to(DT)
    h = torch.randn(N, I, device=DEV, generator=gen).to(DT)
    dy = torch.randn(T, H, device=DEV, generator=gen).to(DT)
    scale = torch.rand(N, device=DEV, generator=gen)
    scheds = {bm: build_schedule(ids, E, bm) for bm in (64, 128)}
    cfg = gg.CONFIGS["cuda" if DEV == "cuda" else "interpret"]
    calls = {
        "gate_up": lambda s: gg.gate_up_fwd(x, w1, s, save_gu=True),
        "down": lambda s: gg.token_gemm(h, w2, s, False, scale, "down"),
        "down_bwd": lambda s: gg.down_bwd(dy, w2, gu, scale, s),
        "dx": lambda s: gg.token_gemm(gu, w1, s, True, None, "dx"),
        "wgrad": lambda s: (gg.weight_grad(x, s.sorted_token, gu, None, None, s, torch.empty_like(w1)),
                            gg.weight_grad(h, None, dy, s.sorted_token, scale, s, torch.empty_like(w2))),
    }
    flops = {"gate_up": 2 * N * H * 2 * I, "down": 2 * N * I * H, "down_bwd": 2 * N * H * I,
             "dx": 2 * N * 2 * I * H, "wgrad": 2 * N * H * 2 * I + 2 * N * I * H}
    token_kinds = ("gate_up", "down", "down_bwd", "dx")
    kinds = list(kinds) or list(CANDIDATES)
    all_token = all(kd in kinds for kd in token_kinds)
    bm_now = cfg["gate_up"][0]
    times, default = {}, dict(cfg)
    for kind in kinds:
        cands = [default[kind]] + [c for c in CANDIDATES[kind] if c != default[kind]]
        if kind in token_kinds and not all_token:  # the untouched token kernels pin the schedule's BLOCK_M
            cands = [c for c in cands if c[0] == bm_now]
        for c in cands:
            cfg[kind] = c
            try:
                ms = bench(lambda: calls[kind](scheds[c[0]]), warmup=10, reps=30)
            except Exception as exc:  # e.g. out of shared memory for a config
                log(f"  sweep {kind} {c}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                ms = float("inf")
            times[(kind, c)] = ms
            log(f"  sweep {kind:8s} {c}: {ms:7.3f} ms  {flops[kind] / ms / 1e9:6.0f} TFLOP/s")
        cfg.update(default)

    def fastest(kind, bm=None):
        tried = [c for (kd, c) in times if kd == kind and (bm is None or c[0] == bm)]
        return min(tried, key=lambda c: times[(kind, c)], default=None)

    best = {}
    if all_token:  # token GEMMs share one schedule, hence one BLOCK_M: the one with the smallest summed time
        per_bm = {bm: {kd: fastest(kd, bm) for kd in token_kinds} for bm in (64, 128)}
        per_bm = {bm: ch for bm, ch in per_bm.items() if None not in ch.values()}
        best.update(min(per_bm.values(), key=lambda ch: sum(times[(kd, c)] for kd, c in ch.items())))
    for kind in kinds:
        best.setdefault(kind, fastest(kind))
    cfg.update(best)
    log(f"sweep choice: {json.dumps({k: list(v) for k, v in best.items()})}")
    return best


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--sweep", nargs="*", default=None, metavar="KERNEL",
                    help=f"tune the Triton tile configs first (all, or the named ones of {list(CANDIDATES)})")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--out", type=str, default=None, help="also write the markdown table here")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1, tiny fp32 shapes: checks the script runs")
    args = ap.parse_args()
    global H, I, E, K, DT, DEV
    if args.smoke:
        H, I, E, K, DT, DEV = 64, 32, 8, 2, torch.float32, "cpu"
        args.tokens = [24]
        for kind in CANDIDATES:
            CANDIDATES[kind] = [(64, 32, 32, 4, 1), (128, 32, 32, 4, 1)]
        gg.CONFIGS["interpret"] = {k: (64, 32, 32, 4, 1) for k in CANDIDATES}
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    import transformers
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    gen = torch.Generator(device=DEV).manual_seed(0)
    name = (f"{device_name(DEV)} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
            if DEV == "cuda" else "cpu (smoke test, TRITON_INTERPRET=1)")
    log(f"device: {name}, torch {torch.__version__}, triton "
        f"{triton.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    log(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: python "
        f"{' '.join(sys.argv)}")
    has_gmm = hasattr(torch, "_grouped_mm")
    if args.sweep is not None:
        sweep(max(args.tokens), gen, log, args.sweep)
    log(f"configs: {json.dumps({k: list(v) for k, v in gg.CONFIGS['cuda' if DEV == 'cuda' else 'interpret'].items()})}")

    # Modules: ours (triton backend) and transformers' block with the same weights (its layout is transposed).
    ours = SparseMoeBlock(H, MoEConfig(E, K, I, backend="triton")).to(DEV, DT)
    hf_cfg = transformers.Qwen3VLMoeTextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                               moe_intermediate_size=I)
    hf = None
    if not args.no_hf:
        hf = Qwen3VLMoeTextSparseMoeBlock(hf_cfg).to(DEV, DT)
        with torch.no_grad():
            hf.gate.weight.copy_(ours.gate.weight)
            hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj.transpose(1, 2))
            hf.experts.down_proj.copy_(ours.experts.down_proj.transpose(1, 2))
    w1, w2 = ours.experts.gate_up_proj, ours.experts.down_proj
    # The same weights stored column-major (transformers' [E, 2I, H] layout seen through a transpose): the layout
    # torch._grouped_mm's CUTLASS path may prefer; the faster of the two grouped_mm rows is the fair baseline.
    w1c = w1.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    w2c = w2.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)

    header = ("| rows | routing | tokens | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
              "| vs ours (fwd / fwd+bwd) |")
    table = [header, "|" + "---|" * 9]
    results = {}
    for T in args.tokens:
        flops = 6 * T * K * H * I  # two GEMMs: 2*T*k*(H*2I + I*H)
        for skewed in (False, True):
            rname = "skewed" if skewed else "uniform"
            ids, w = routing(T, skewed, gen)
            x = torch.randn(T, H, device=DEV, generator=gen).to(DT).requires_grad_(True)
            dy = torch.randn(T, H, device=DEV, generator=gen).to(DT)
            wr = w.detach().requires_grad_(True)
            load = torch.bincount(ids.reshape(-1), minlength=E)
            log(f"T={T} {rname}: rows per expert max {load.max().item()}, min {load.min().item()}, "
                f"idle experts {(load == 0).sum().item()}")

            # correctness at full size: ours vs grouped_mm (bf16 both) and vs the fp32 reference on a slice
            if T == min(args.tokens):
                w1.grad = w2.grad = None  # left over from earlier timing runs
                y = moe_experts(x, w1, w2, ids, wr)
                ref_in = [t.detach().float().requires_grad_(True) for t in (x, w1, w2, wr)]
                y_ref = moe_experts_ref(ref_in[0], ref_in[1], ref_in[2], ids, ref_in[3])
                y.backward(dy)
                y_ref.backward(dy.float())
                errs = {"y": rel_err(y, y_ref)}
                errs.update({n: rel_err(t.grad, r.grad) for n, t, r in
                             zip(("dx", "dW1", "dW2", "dw"), (x, w1, w2, wr), ref_in)})
                for t in (x, w1, w2, wr):
                    t.grad = None
                if has_gmm:
                    errs["grouped_mm y"] = rel_err(experts_grouped_mm(x, w1, w2, ids, wr), y_ref)
                log("  rel. L2 error vs fp32 reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
                del y_ref, ref_in

            impls = [("experts", "ours", lambda: moe_experts(x, w1, w2, ids, wr), [x, w1, w2, wr])]
            if has_gmm:
                impls.append(("experts", "grouped_mm", lambda: experts_grouped_mm(x, w1, w2, ids, wr),
                              [x, w1, w2, wr]))
                impls.append(("experts", "grouped_mm-colmajor", lambda: experts_grouped_mm(x, w1c, w2c, ids, wr),
                              [x, w1c, w2c, wr]))
            if not skewed:  # block rows route with the (random) router: uniform-ish only
                xb = x.detach().view(1, T, H).requires_grad_(True)
                dyb = dy.view(1, T, H)
                impls.append(("block", "ours", lambda: ours(xb), [xb, *ours.parameters()]))
                if hf is not None:
                    for impl in ("eager", "grouped_mm"):
                        if impl == "grouped_mm" and not has_gmm:
                            continue
                        hf.experts.config._experts_implementation = impl
                        with torch.no_grad():
                            err = rel_err(hf(xb), ours(xb)[0])
                        log(f"  hf-{impl} block vs ours: rel. L2 difference {err:.2e}")
                        impls.append(("block", f"hf-{impl}", (lambda impl=impl: (
                            setattr(hf.experts.config, "_experts_implementation", impl), hf(xb))[1]),
                            [xb, *hf.parameters()]))
            for rows, name, fn, params in impls:
                d = dyb if rows == "block" else dy
                try:
                    t_fwd, t_train = bench_pair(fn, params, d)
                except Exception as exc:
                    log(f"  {rows} {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                results[(rows, rname, T, name)] = (t_fwd, t_train)
                base = results.get((rows, rname, T, "ours"))
                ratio = f"{t_fwd / base[0]:.2f}x / {t_train / base[1]:.2f}x" if base and name != "ours" else "-"
                row = (f"| {rows} | {rname} | {T} | {name} | {t_fwd:.3f} | {flops / t_fwd / 1e9:.0f} | {t_train:.3f} | "
                       f"{3 * flops / t_train / 1e9:.0f} | {ratio} |")
                table.append(row)
                log(row)
            if DEV == "cuda":
                torch.cuda.empty_cache()
    log()
    log("'vs ours' = that implementation's time / ours (> 1: ours is faster).")
    for line in table:
        log(line)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
