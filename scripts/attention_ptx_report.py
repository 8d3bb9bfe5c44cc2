"""Compile the attention kernels for sm_90 without a GPU and report what the compiler made of them.

For each kernel and config: registers, stack (spills), shared memory, and counts of the memory instructions in the
PTX (16-byte `cp.async.cg` / `ld.global.v4` versus 2-byte `ld.global.b16`; `cp.async.ca` copies 4 or 8 bytes). This
is how the block-size lists in `kernels/attention/common.py` were checked for spills, how the head_dim 72 path was
found to use 2-byte loads, and how the fp8 K/V loads (--kv-fp8) were found to need a 16-element alignment promise.
Needs only Triton's bundled ptxas/cuobjdump, so it costs no device time; timings still need the GPU.

Usage: python scripts/attention_ptx_report.py [--head-dim 72] [--causal] [--varlen] [--kv-fp8]
       python scripts/attention_ptx_report.py --smoke      # one config of each kernel: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # compiling for sm_90 needs Triton's compiler, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.attention import backward, common, forward  # noqa: E402

_PTRS = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
_PTRS.update(LSE="*fp32", DELTA="*fp32", cu_seqlens="*i32")
_OPS = r"((?:cp\.async\.c[ag]\.shared\.global|ld\.global|st\.global|wgmma\.mma_async)[\w\.:]*)"


def compile_report(kernel, consts: dict, num_warps: int, num_stages: int, divisible: set, ptrs: dict = _PTRS) -> str:
    """Compile one specialisation for sm_90 and return a one-line report.

    Args:
        kernel: an autotuned or plain @triton.jit kernel of `forward` / `backward`.
        consts: constexpr values (block sizes and flags).
        divisible: argument names the launcher would specialise as divisible by 16 (pointers, strides).
        ptrs: pointer argument name -> Triton pointer type.
    """
    fn = kernel.fn if hasattr(getattr(kernel, "fn", None), "arg_names") else kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "sm_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in divisible}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        usage = " ".join(x for x in out.split() if x.startswith(("REG:", "STACK:")))
    ops = Counter(re.findall(_OPS, ck.asm["ptx"]))
    blocks = f"BM={consts.get('BLOCK_M')} BN={consts.get('BLOCK_N')} w{num_warps} s{num_stages}"
    return f"{fn.__name__:18s} {blocks:22s} {usage:18s} smem={ck.metadata.shared:6d} {dict(ops)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--window", action="store_true")
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--unaligned", action="store_true", help="strides not multiples of 8 (ALIGN8 off)")
    ap.add_argument("--global-queries", action="store_true", help="compile with GLOBAL_Q=True")
    ap.add_argument("--kv-fp8", action="store_true", help="forward kernel over an fp8 e4m3 K/V cache (KV_FP8)")
    ap.add_argument("--smoke", action="store_true", help="only the first config of each kernel")
    args = ap.parse_args()
    block_d = max(16, triton.next_power_of_2(args.head_dim))
    base = dict(HEAD_DIM=args.head_dim, BLOCK_D=block_d, EVEN_D=block_d == args.head_dim, CAUSAL=args.causal,
                WINDOW=args.window, VARLEN=args.varlen, PRECISION="tf32", ALIGN8=not args.unaligned,
                GLOBAL_Q=args.global_queries)
    for kernel, configs in ((forward.fwd_kernel, common.FWD_CONFIGS), (backward.bwd_dq_kernel, common.DQ_CONFIGS),
                            (backward.bwd_dkdv_kernel, common.DKDV_CONFIGS)):
        names = kernel.fn.arg_names
        # what the launcher specialises for a (T, H, D) layout with H * D % 16 == 0: pointers, token and batch
        # strides; head strides only when D itself is a multiple of 16
        divisible = set(_PTRS) | {n for n in names if n.startswith("stride_") and n[-1] in "bt"}
        if args.head_dim % 16 == 0:
            divisible |= {n for n in names if n.startswith("stride_")}
        consts, ptrs = dict(base), dict(_PTRS)
        if "KV_FP8" in names:  # the forward kernel: fp8 K/V with fp32 scale pointers, or no scales (None)
            consts["KV_FP8"] = args.kv_fp8
            if args.kv_fp8:
                ptrs.update(K="*fp8e4nv", V="*fp8e4nv", KS="*fp32", VS="*fp32")
                divisible |= {"KS", "VS"}
            else:
                consts.update(KS=None, VS=None)
        elif args.kv_fp8:
            continue  # the backward kernels have no fp8 variant
        for cfg in configs[:1] if args.smoke else configs:
            print(compile_report(kernel, dict(consts, **cfg.kwargs), cfg.num_warps, cfg.num_stages, divisible, ptrs),
                  flush=True)


if __name__ == "__main__":
    main()
