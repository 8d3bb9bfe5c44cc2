"""Shared pieces of the Triton attention kernels (kernels/attention/forward.py, backward.py, decode.py).

Launch configuration (autotuning lists, tuning key, pruning), the tile helpers every kernel uses (sequence
bounds, row loads, per-key scales of an fp8 K/V cache, base offsets), the constants LOG2E / LN2 (the kernels work
in base 2: exp(x) = exp2(x * LOG2E)), and the host side shared by the launchers: the launch geometry of a call
(`Problem`), output allocation, strides.
The mask helpers are in kernels/attention/masks.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): a base-2 log-sum-exp times LN2 is the natural one


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Small config lists on CUDA (each entry is one compile per specialisation); one fixed small config in the
# interpreter, where block size only changes speed.
if INTERPRET:
    FWD_CONFIGS = DQ_CONFIGS = DKDV_CONFIGS = [_cfg(32, 32, 4, 1)]
else:
    # Register/spill reports of these (cuobjdump --dump-resource-usage, sm_90, D=128): the lists keep the ones
    # that spill little. The last entry is the untuned default for short sequences (see prune_configs).
    FWD_CONFIGS = [_cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)]
    DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]
    DKDV_CONFIGS = [_cfg(32, 64, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 8, 3)]

# One tuning run per (sequence-length bucket, padded head dim, mask kind, dtypes: the autotuner adds every tensor
# argument's dtype to the key, so an fp8 K/V cache tunes apart from a bf16 one); lengths, GQA group and mask sizes
# are not specialised on (they are masked at run time), which keeps the number of compiles small. HEAD_DIM is a
# constexpr: a compile-time head-dim mask (72, 80, 96 padded to 128) is what lets the masked loads vectorise.
TUNE_KEY = ["SEQ_BUCKET", "BLOCK_D", "CAUSAL", "WINDOW"]
NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "window", "num_global", "SEQ_BUCKET", "GROUP"]


FP32_CONFIG = _cfg(64, 32, 4, 2)


def prune_configs(configs, named_args, **kwargs):
    """fp32 operands (ieee dots, tests and fp32 model runs) need twice the shared memory of bf16 tiles: one small
    config. Short sequences (bucket 0, <= 1024 tokens) are cheap: the last (general) config, no tuning runs."""
    if INTERPRET:
        return configs
    if named_args["Q"].dtype == torch.float32:
        return [FP32_CONFIG]
    bucket = kwargs["SEQ_BUCKET"] if "SEQ_BUCKET" in kwargs else named_args["SEQ_BUCKET"]  # launched as keyword
    if bucket == 0:
        return configs[-1:]
    return configs



# ----------------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Token offset of sequence b's first row and its query/key lengths (packed: from cu_seqlens)."""
    if VARLEN:
        tok = tl.load(cu_seqlens + b)
        end = tl.load(cu_seqlens + b + 1)
        len_q = end - tok
        len_k = end - tok
    else:
        tok = seqlen_q * 0  # a tensor, like the packed branch's
        len_q = seqlen_q
        len_k = seqlen_k
    return tok, len_q, len_k


@triton.jit
def load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM, EVEN_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= n_rows (when CHECK_ROWS) and padded head-dim columns."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def load_scales(ptrs, kn, n_rows, CHECK_ROWS: tl.constexpr):
    """Per-key fp32 scales of an fp8 K/V tile (kernels/attention/fp8.py); 0 for keys >= n_rows when CHECK_ROWS."""
    if CHECK_ROWS:
        s = tl.load(ptrs, mask=kn < n_rows, other=0.0)
    else:
        s = tl.load(ptrs)
    return s


@triton.jit
def tile_offset(b64, stride_b, tok64, stride_t, h, stride_h, ALIGN8: tl.constexpr):
    """Element offset of (sequence b, its first token, head h). With ALIGN8 the host has checked that it is a multiple
    of 8 elements (16 bytes): the promise lets the compiler use 16-byte loads (cp.async) for head_dim 72/80/96."""
    off = b64 * stride_b + tok64 * stride_t + h * stride_h
    if ALIGN8:
        off = tl.multiple_of(off, 8)
    return off



# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def empty_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a kernel output (every element is written by the kernels; tests swap this for NaN-filled)."""
    return torch.empty(shape, dtype=dtype, device=device)


def strides3(x: torch.Tensor, packed: bool):
    """(batch, token, head) strides of a (B, L, H, D) tensor, or of a packed (T, H, D) one (batch stride 0)."""
    if packed:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def scale_strides(s: torch.Tensor | None):
    """(batch, token, head) strides of an fp8 K/V scale tensor (B, L, H); zeros when the K/V are not fp8."""
    return (0, 0, 0) if s is None else s.stride()


def aligned8(p: "Problem", *tensors: torch.Tensor) -> bool:
    """True when every stride (but the last) is a multiple of 8 elements and every base 16-byte aligned: the kernels
    may then promise this to the compiler (tl.multiple_of), so loads masked to head_dim (72, 80, 96) vectorise.
    One-byte (fp8) tensors need 16 elements, for the same 16-byte loads (kernels/attention/forward.py)."""
    if p.head_dim % (16 if any(t.element_size() == 1 for t in tensors) else 8):
        return False
    return all(t.data_ptr() % 16 == 0 and all(st % max(8, 16 // t.element_size()) == 0 for st in t.stride()[:-1])
               for t in tensors)


def _seq_bucket(n: int) -> int:
    """Autotuning bucket of a sequence length (keeps the number of tuning runs small)."""
    return 0 if n <= 1024 else (1 if n <= 8192 else 2)


class Problem:
    """Launch geometry shared by forward and backward: layout, lengths, GQA group, mask flags."""

    def __init__(self, q, k, cu_seqlens, max_seqlen, causal, window, num_global, scale, global_queries=False):
        self.packed = cu_seqlens is not None
        if self.packed:
            self.batch = cu_seqlens.numel() - 1
            self.seqlen_q = self.seqlen_k = max_seqlen
            self.total_q = q.shape[0]
        else:
            self.batch, self.seqlen_q = q.shape[0], q.shape[1]
            self.seqlen_k = k.shape[1]
        self.hq, self.hkv, self.head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
        self.group = self.hq // self.hkv
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.causal, self.window, self.num_global = causal, window, num_global
        self.global_q = bool(global_queries) and window is not None and num_global > 0  # no effect otherwise
        self.scale = scale
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"
        self.bucket = _seq_bucket(max(self.seqlen_q, self.seqlen_k))
        self.cu = cu_seqlens if self.packed else torch.zeros(1, dtype=torch.int32, device=q.device)

    def lse_empty(self, device):
        """fp32 LSE (or delta) buffer: (B, Hq, Lq) or packed (Hq, T); returns it and its (batch, head) strides."""
        if self.packed:
            x = empty_output((self.hq, self.total_q), torch.float32, device)
            return x, 0, x.stride(0)
        x = empty_output((self.batch, self.hq, self.seqlen_q), torch.float32, device)
        return x, x.stride(0), x.stride(1)

    def common(self):
        return dict(seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, sm_scale=self.scale,
                    window=self.window or 0, num_global=self.num_global, SEQ_BUCKET=self.bucket, GROUP=self.group,
                    HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, EVEN_D=self.block_d == self.head_dim,
                    CAUSAL=self.causal, WINDOW=self.window is not None, GLOBAL_Q=self.global_q, VARLEN=self.packed,
                    PRECISION=self.precision)

