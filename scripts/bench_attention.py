"""Benchmark the Triton attention kernels against SDPA (cuDNN, flash) and FlexAttention, forward and backward.

All providers run in one process on the same GPU: median of 50 timed calls after 10 warm-up calls, L2 flushed
before each (scripts/_bench.py), random inputs (every case's q/k/v exceed the 50 MB L2 except where noted), FLOPs counted the standard
way (forward 4*B*H*N^2*D, halved for causal, 4*B*H*D*(N*W - W^2/2) for a causal window W, per document or frame
for packed inputs; backward 2.5x forward). Prints a markdown table and writes it to --out.

Usage (GPU): python scripts/bench_attention.py --out docs/bench_attention_table.md
Smoke test on CPU (Triton interpreter, tiny shapes): python scripts/bench_attention.py --smoke
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass, field

SMOKE = "--smoke" in sys.argv or "--tiny" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

import torch
import triton
from _bench import device_name, median_ms

from kernels.attention import attention, quantize_kv
from kernels.attention import backward, forward
from kernels.attention.flash import flash_attn_fwd


@dataclass
class Case:
    name: str
    n: int  # tokens per sequence (or total tokens when packed)
    hq: int = 16
    hkv: int = 8
    d: int = 128
    batch: int = 1
    causal: bool = True
    window: int | None = None
    num_global: int = 0
    docs: list[int] = field(default_factory=list)  # packed document lengths (cu_seqlens)
    frames: int = 0  # vision: equal per-frame segments (packed), SDPA runs them as a batch
    providers: tuple = ("ours", "sdpa_cudnn", "sdpa_flash", "flex")

    def flops_fwd(self) -> float:
        segs = self.docs or ([self.n // self.frames] * self.frames if self.frames else [self.n] * self.batch)
        total = 0.0
        for L in segs:
            if self.window is not None and self.window < L:
                total += 4.0 * self.hq * self.d * (L * self.window - self.window ** 2 / 2)
            else:
                total += 4.0 * self.hq * L * L * self.d / (2 if self.causal else 1)
        return total


def _time(fn) -> float:
    """Median ms of 50 calls after 10 warm-up calls, L2 flushed; on the CPU (interpreter smoke test) one call."""
    cuda = torch.cuda.is_available()
    return median_ms(fn, reps=50 if cuda else 1, warmup=10 if cuda else 0, flush_l2=True)


def _mask(case: Case, device):
    """The case's mask as model/masks.py describes it (FlexAttention runs its mask_mod, positions within documents)."""
    from model.masks import AttentionMask

    cu = torch.tensor([0] + case.docs, device=device).cumsum(0).to(torch.int32) if case.docs else None
    return AttentionMask(causal=case.causal, window=case.window, num_global=case.num_global, cu_seqlens=cu)


def _make(case: Case, provider: str, dtype, device):
    """Inputs and a forward closure for one provider. Returns (fwd, leaves) with fwd() -> output tensor."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype, device=device).requires_grad_()

    packed = bool(case.docs or case.frames)
    if provider == "attend_triton":  # the model's call: model.attention.attend(backend="triton"), which sends the
        # vision tower's equal-length non-causal frames to SDPA on a GPU (model/attention.py's _sdpa_is_faster)
        from model.attention import attend
        from model.masks import AttentionMask

        lens = case.docs or [case.n // max(1, case.frames)] * max(1, case.frames)
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        q, k, v = rnd(case.n, case.hq, case.d), rnd(case.n, case.hkv, case.d), rnd(case.n, case.hkv, case.d)
        mask = AttentionMask(causal=case.causal, cu_seqlens=cu, max_seqlen=max(lens), window=case.window,
                             num_global=case.num_global)
        return (lambda: attend(q, k, v, mask, backend="triton")), (q, k, v)
    if provider == "ours" or provider == "ours_flash":
        if packed:
            lens = case.docs or [case.n // case.frames] * case.frames
            cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
            q, k, v = rnd(case.n, case.hq, case.d), rnd(case.n, case.hkv, case.d), rnd(case.n, case.hkv, case.d)
            return (lambda: attention(q, k, v, causal=case.causal, cu_seqlens=cu, window=case.window,
                                      num_global=case.num_global)), (q, k, v)
        q = rnd(case.batch, case.n, case.hq, case.d)
        k, v = rnd(case.batch, case.n, case.hkv, case.d), rnd(case.batch, case.n, case.hkv, case.d)
        return (lambda: attention(q, k, v, causal=case.causal, window=case.window,
                                  num_global=case.num_global)), (q, k, v)
    # (B, H, L, D) layout for SDPA / Flex; frames become the batch for SDPA
    b, n = case.batch, case.n
    if case.frames:
        b, n = case.frames, case.n // case.frames
    q, k, v = rnd(b, case.hq, n, case.d), rnd(b, case.hkv, n, case.d), rnd(b, case.hkv, n, case.d)
    if provider.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION], "sdpa_flash": [SDPBackend.FLASH_ATTENTION],
                   "sdpa": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION]}[provider]
        if case.window is not None or case.docs:
            raise NotImplementedError("mask not expressible without a dense mask")
        gqa = case.hq != case.hkv

        def fwd():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal,
                                                                        enable_gqa=gqa)
        return fwd, (q, k, v)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(_mask(case, device).mask_mod(n, n), B=None, H=None, Q_LEN=n, KV_LEN=n,
                                       device=device)
        flex = _FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
        return (lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=case.hq != case.hkv)), (q, k, v)
    raise ValueError(provider)


_FLEX: dict = {}


def run_case(case: Case, dtype, device, rows: list, backward: bool = True):
    results = {}
    for provider in case.providers:
        try:
            fwd, leaves = _make(case, provider, dtype, device)
            o = fwd()
            t_f = _time(fwd)
            t_b = float("nan")
            if backward:
                do = torch.randn_like(o)
                o = fwd()
                bwd = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)  # noqa: E731
                bwd()
                t_b = _time(bwd)
            results[provider] = (t_f, t_b, o.detach())
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            print(f"  {case.name} {provider}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
            continue
        f = case.flops_fwd()
        rows.append((case.name, provider, t_f, f / t_f / 1e9, t_b, 2.5 * f / t_b / 1e9))
        print(f"  {case.name:34s} {provider:11s} fwd {t_f:8.3f} ms {f / t_f / 1e9:6.0f} TFLOP/s | "
              f"bwd {t_b:8.3f} ms {2.5 * f / t_b / 1e9:6.0f} TFLOP/s", flush=True)
    return results


def check_vs_sdpa(device, dtype, n, hq, hkv, d, causal, frames=0):
    """Full-size sanity check on one input set: our forward vs SDPA (default backends), relative max error."""
    g = torch.Generator(device=device).manual_seed(2)
    b, L = (frames, n // frames) if frames else (1, n)
    q = torch.randn(b, L, hq, d, generator=g, dtype=dtype, device=device)
    k = torch.randn(b, L, hkv, d, generator=g, dtype=dtype, device=device)
    v = torch.randn(b, L, hkv, d, generator=g, dtype=dtype, device=device)
    if frames:
        cu = torch.arange(0, n + 1, L, device=device, dtype=torch.int32)
        o = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=causal, cu_seqlens=cu).view(q.shape)
    else:
        o = attention(q, k, v, causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, enable_gqa=hq != hkv).transpose(1, 2)
    err = (o.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    print(f"  check vs SDPA n={n} hq={hq} hkv={hkv} d={d} causal={causal} frames={frames}: rel max err {err:.1e}",
          flush=True)
    return err


def bench_decode(device, dtype, rows, lk=32768, batch=4, hq=16, hkv=8, d=128):
    """Few queries over a long cache: split-KV decode path (bf16 and fp8 e4m3 cache) vs our flash path vs SDPA.
    Reports us and GB/s of the K+V bytes read (fp8: the e4m3 values and their fp32 scales); maxdiff is against the
    first provider, so the fp8 row shows the quantisation error."""
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, 1, hq, d, generator=g, dtype=dtype, device=device)
    k = torch.randn(batch, lk, hkv, d, generator=g, dtype=dtype, device=device)
    v = torch.randn(batch, lk, hkv, d, generator=g, dtype=dtype, device=device)
    (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
    kv_bytes = 2 * k.numel() * k.element_size()
    scale = d ** -0.5
    fns = {
        "ours_decode": (lambda: attention(q, k, v, causal=True), kv_bytes),
        "ours_decode_fp8": (lambda: attention(q, k8, v8, causal=True, k_scale=ks, v_scale=vs),
                            2 * (k8.numel() + 4 * ks.numel())),
        "ours_flash": (lambda: flash_attn_fwd(q, k, v, None, 0, True, 0, 0, scale, False)[0], kv_bytes),
    }
    if device == "cuda":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        fns["sdpa"] = (lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
                       kv_bytes)
    ref = None
    name = f"decode B={batch} Lq=1 Lk={lk}"
    for prov, (fn, nbytes) in fns.items():
        try:
            with torch.no_grad():
                out = fn()
                t = _time(fn)
        except Exception as e:
            print(f"  {name} {prov}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        out = out if out.shape == q.shape else out.transpose(1, 2)
        ref = out.float() if ref is None else ref
        err = (out.float() - ref).abs().max().item()
        rows.append((name, prov, t, nbytes / t / 1e6, float("nan"), float("nan")))
        print(f"  {name:34s} {prov:11s} {t * 1e3:8.1f} us  {nbytes / t / 1e6:6.0f} GB/s  maxdiff {err:.1e}",
              flush=True)


def bench_chunk(device, dtype, rows, lq=2048, lk=65536, hq=16, hkv=8, d=128):
    """Chunked prefill: Lq new queries (causal, bottom-right) over a cache of Lk keys, bf16 vs fp8 e4m3 K/V, forward
    only (our flash path). FLOPs: 4*Hq*D per visible (query, key) pair, sum_i (Lk - Lq + i + 1) pairs per head."""
    g = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(1, lq, hq, d, generator=g, dtype=dtype, device=device)
    k = torch.randn(1, lk, hkv, d, generator=g, dtype=dtype, device=device)
    v = torch.randn(1, lk, hkv, d, generator=g, dtype=dtype, device=device)
    (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
    flops = 4.0 * hq * d * (lq * (lk - lq) + lq * (lq + 1) / 2)
    fns = {"ours": lambda: attention(q, k, v, causal=True),
           "ours_fp8": lambda: attention(q, k8, v8, causal=True, k_scale=ks, v_scale=vs)}
    ref = None
    name = f"chunk Lq={lq} Lk={lk}"
    for prov, fn in fns.items():
        with torch.no_grad():
            out = fn().float()
            t = _time(fn)
        ref = out if ref is None else ref
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append((name, prov, t, flops / t / 1e9, float("nan"), float("nan")))
        print(f"  {name:34s} {prov:11s} fwd {t:8.3f} ms {flops / t / 1e9:6.0f} TFLOP/s  rel L2 vs bf16 {rel:.1e}",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", "--tiny", dest="tiny", action="store_true",
                    help="CPU smoke test: Triton interpreter, tiny shapes, our kernels only")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--out", default="", help="write the markdown table here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    if device == "cuda":
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False  # we replay the Flex backward graph with retain_graph
    k8, k32 = (8192, 32768) if not args.tiny else (96, 160)
    w, gl = (4096, 64) if not args.tiny else (40, 8)
    frame = 784 if not args.tiny else 49  # 448x448 frame = 28x28 patches
    nf = 16 if not args.tiny else 3
    cases = [
        Case("causal 8K", k8),
        Case("causal 32K", k32),
        Case("window 4096 32K", k32, window=w, providers=("ours", "flex")),
        Case("window 4096 + 64 global 32K", k32, window=w, num_global=gl, providers=("ours", "flex")),
        Case("packed 8x4K causal", k32, docs=[k32 // 8] * 8, providers=("ours",)),
        Case(f"vision {nf}x{frame} d64 h16", nf * frame, hq=16, hkv=16, d=64, causal=False, frames=nf,
             providers=("ours", "attend_triton", "sdpa", "sdpa_cudnn", "sdpa_flash")),
        Case(f"vision {nf}x{frame} d72 h16", nf * frame, hq=16, hkv=16, d=72, causal=False, frames=nf,
             providers=("ours", "attend_triton", "sdpa", "sdpa_flash")),
        Case(f"vision 1x{nf * frame} d72 h16", nf * frame, hq=16, hkv=16, d=72, causal=False, frames=1,
             providers=("ours", "attend_triton", "sdpa", "sdpa_flash")),
    ]
    if args.tiny:  # every case's code path, at a size the interpreter runs in seconds
        for c in cases:
            c.providers = ("ours",)
            c.hq, c.hkv, c.d = 2, (2 if c.hq == c.hkv else 1), (24 if c.d % 16 else 16)
    rows: list = []
    t0 = time.time()
    if device == "cuda" and not args.only:
        check_vs_sdpa(device, dtype, k8, 16, 8, 128, True)
        check_vs_sdpa(device, dtype, nf * frame, 16, 16, 72, False, frames=nf)
    for c in cases:
        if args.only and args.only not in c.name:
            continue
        print(f"[{time.time() - t0:6.0f}s] {c.name}", flush=True)
        run_case(c, dtype, device, rows)
    if not args.only or "decode" in args.only:
        bench_decode(device, dtype, rows, **({} if not args.tiny else dict(lk=1100, batch=1, hq=2, hkv=1, d=16)))
    if not args.only or "chunk" in args.only:
        bench_chunk(device, dtype, rows, **({} if not args.tiny else dict(lq=40, lk=100, hq=2, hkv=1, d=16)))
    # autotuner choices (what to keep when trimming the config lists)
    for kern in (forward.fwd_kernel, backward.bwd_dq_kernel, backward.bwd_dkdv_kernel):
        for key, cfg in getattr(kern, "cache", {}).items():
            print(f"  tuned {kern.fn.__name__} {key}: {cfg}")
    dev = device_name(device)
    head = (f"Device: {dev}; torch {torch.__version__}, triton {triton.__version__}, CUDA "
            f"{torch.version.cuda}; dtype {str(dtype).split('.')[-1]}; B=1, Hq=16, Hkv=8, D=128 unless named; "
            f"{datetime.date.today()}; command: python scripts/bench_attention.py")
    lines = [head, "", "| case | provider | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |", "|---|---|---|---|---|---|"]
    for name, prov, tf, ff, tb, fb in rows:
        if name.startswith("decode"):
            lines.append(f"| {name} | {prov} | {tf * 1e3:.1f} us | {ff:.0f} GB/s (K+V) | - | - |")
        elif name.startswith("chunk"):  # forward only
            lines.append(f"| {name} | {prov} | {tf:.3f} | {ff:.0f} | - | - |")
        else:
            lines.append(f"| {name} | {prov} | {tf:.3f} | {ff:.0f} | {tb:.3f} | {fb:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
