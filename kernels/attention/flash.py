"""Flash-style attention in Triton: forward with online softmax, backward with recomputation.

Follows Triton's fused-attention tutorial (06-fused-attention) and FlashAttention-2 (Dao, 2023):
- forward: one program per (query head, query block, sequence); online softmax over key blocks in fp32, stores the
  output and the natural-log LSE per query row;
- backward: delta = rowsum(o * do) (preprocess), then a dK/dV kernel (one program per key block and KV head, looping
  over the query heads of its GQA group and over query blocks: no atomics, K/V never repeated in memory) and a dQ
  kernel (one program per query block and query head, looping over key blocks).

Masks (causal, sliding window, global prefix keys and optionally global queries, packed documents through
cu_seqlens, ragged tails) are handled per tile: each program computes the range of key (or query) blocks that can
hold a visible pair, splits it into ranges that need an element mask and ranges that are fully visible, and never
loads a fully masked tile.
Query i sits at key position Lk - Lq + i (bottom-right alignment, as in flash-attn).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Small config lists on CUDA (each entry is one compile per specialisation); one fixed small config in the
# interpreter, where block size only changes speed.
if INTERPRET:
    FWD_CONFIGS = DQ_CONFIGS = DKDV_CONFIGS = [_cfg(32, 32, 4, 1)]
else:
    # Register/spill reports of these (cuobjdump --dump-resource-usage, sm_90, D=128): the lists keep the ones
    # that spill little. The last entry is the untuned default for short sequences (see _prune).
    FWD_CONFIGS = [_cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)]
    DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)]
    DKDV_CONFIGS = [_cfg(32, 64, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 8, 3)]

# One tuning run per (sequence-length bucket, padded head dim, mask kind, dtype); lengths, GQA group and mask sizes
# are not specialised on (they are masked at run time), which keeps the number of compiles small. HEAD_DIM is a
# constexpr: a compile-time head-dim mask (72, 80, 96 padded to 128) is what lets the masked loads vectorise.
TUNE_KEY = ["SEQ_BUCKET", "BLOCK_D", "CAUSAL", "WINDOW"]
NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "window", "num_global", "SEQ_BUCKET", "GROUP"]


FP32_CONFIG = _cfg(64, 32, 4, 2)


def _prune(configs, named_args, **kwargs):
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
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
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
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM, EVEN_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
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
def _offset(b64, stride_b, tok64, stride_t, h, stride_h, ALIGN8: tl.constexpr):
    """Element offset of (sequence b, its first token, head h). With ALIGN8 the host has checked that it is a multiple
    of 8 elements (16 bytes): the promise lets the compiler use 16-byte loads (cp.async) for head_dim 72/80/96."""
    off = b64 * stride_b + tok64 * stride_t + h * stride_h
    if ALIGN8:
        off = tl.multiple_of(off, 8)
    return off


@triton.jit
def _visible(qpos, kpos, q_ok, k_ok, window, num_global, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             GLOBAL_Q: tl.constexpr):
    """Element mask: broadcastable query/key positions (key coordinates) and in-bounds flags -> bool tile."""
    vis = q_ok & k_ok
    if CAUSAL:
        vis = vis & (kpos <= qpos)
    if WINDOW:
        near = (((qpos - kpos) < window) & ((kpos - qpos) < window)) | (kpos < num_global)
        if GLOBAL_Q:
            near = near | (qpos < num_global)  # global queries: the first G positions attend everywhere
        vis = vis & near
    return vis


@triton.jit
def _key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr):
    """Key-block ranges for the query block starting at m0: global prefix [0, g_end) (masked), then [lo, f_lo)
    masked, [f_lo, f_hi) fully visible, [f_hi, hi) masked. Every visible key is in exactly one range. With
    GLOBAL_Q, a block holding a global query (position < num_global) spans every key causality allows."""
    off = len_k - len_q
    qlo = m0 + off  # key position of the first query row
    qhi = tl.minimum(m0 + BLOCK_M, len_q) - 1 + off  # ... of the last real query row
    hi = len_k  # keys >= hi are invisible to every row
    lim = len_k  # keys < lim are visible to every row, as far as the upper edge goes
    lo = 0
    f_lo = 0  # keys >= f_lo are visible to every row, as far as the lower edge goes
    g_end = 0
    if CAUSAL:
        hi = tl.minimum(hi, qhi + 1)
        lim = tl.minimum(lim, qlo + 1)
    if WINDOW:
        if not CAUSAL:
            hi = tl.minimum(hi, qhi + window)
            lim = tl.minimum(lim, qlo + window)
        lo = tl.maximum(qlo - window + 1, 0)
        f_lo = qhi - window + 1
        if GLOBAL_Q:
            # A block whose first row is a global query needs every key up to the causal limit. Its keys below lo
            # need nothing: they are < qlo < num_global, global keys, in the [0, g_end) prefix already.
            any_g = qlo < num_global
            all_g = qhi < num_global  # every row is global: what causality allows is visible to all of them
            hi_c = len_k
            lim_c = len_k
            if CAUSAL:
                hi_c = tl.minimum(hi_c, qhi + 1)
                lim_c = tl.minimum(lim_c, qlo + 1)
            hi = tl.where(any_g, hi_c, hi)
            lim = tl.where(all_g, lim_c, lim)
            f_lo = tl.where(all_g, 0, f_lo)
    hi = tl.maximum(hi, 0)
    lim = tl.maximum(lim, 0)
    lo = (tl.minimum(lo, hi) // BLOCK_N) * BLOCK_N
    f_lo = tl.maximum(f_lo, lo)
    f_lo = tl.minimum((f_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    f_hi = tl.minimum(tl.maximum(lim // BLOCK_N * BLOCK_N, f_lo), hi)
    if WINDOW:
        g_end = tl.minimum((num_global + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    return g_end, lo, f_lo, f_hi, hi


@triton.jit
def _query_ranges(n0, len_q, len_k, window, num_global, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr):
    """Query-block ranges for the key block starting at n0: global-query prefix [0, g_end) (masked, only with
    GLOBAL_Q and not causal), then [lo, f_lo) masked, [f_lo, f_hi) fully visible, [f_hi, hi) masked. Keys below
    num_global ignore the window; with GLOBAL_Q so do queries at positions below num_global."""
    off = len_k - len_q
    klo = n0
    khi = tl.minimum(n0 + BLOCK_N, len_k) - 1
    lo = 0
    f_lo = 0
    hi = len_q
    lim = len_q
    if CAUSAL:
        lo = tl.maximum(klo - off, 0)
        f_lo = khi - off
    if WINDOW:
        # the block's global keys (if any) are seen by every query; its other keys only within the window
        hi = tl.minimum(hi, tl.where(klo < num_global, len_q, khi + window - off))
        lim = tl.minimum(lim, tl.where(khi < num_global, len_q, klo + window - off))
        if not CAUSAL:
            lo = tl.maximum(lo, tl.where(klo < num_global, 0, klo - window + 1 - off))
            f_lo = tl.maximum(f_lo, tl.where(khi < num_global, 0, khi - window + 1 - off))
    hi = tl.maximum(hi, 0)
    lim = tl.maximum(lim, 0)
    lo = (tl.minimum(tl.maximum(lo, 0), hi) // BLOCK_M) * BLOCK_M
    g_end = 0
    if WINDOW:
        if GLOBAL_Q:
            if not CAUSAL:  # causal: a global query's keys j <= i < num_global are global keys, seen anyway
                # the query blocks holding global queries see every key block; the window's range starts after
                g_end = (tl.minimum(tl.maximum(num_global - off, 0), len_q) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
                lo = tl.maximum(lo, g_end)
                hi = tl.maximum(hi, lo)
    f_lo = tl.maximum(f_lo, lo)
    f_lo = tl.minimum((f_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
    f_hi = tl.minimum(tl.maximum(lim // BLOCK_M * BLOCK_M, f_lo), hi)
    return g_end, lo, f_lo, f_hi, hi


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start, end, qpos, offs_n, offs_d,
               len_k, qk_scale, window, num_global,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        kn = start_n + offs_n
        k = _load_rows(k_base + kn[:, None] * stride_kt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN) raw scores
        if MASK:
            vis = _visible(qpos[:, None], kn[None, :], True, kn[None, :] < len_k, window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            qk = tl.where(vis, qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # running max, log2 units
            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # rows that have seen nothing yet: avoid inf - inf
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + kn[:, None] * stride_vt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, O, LSE, cu_seqlens,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
                seqlen_q, seqlen_k, sm_scale, window, num_global, SEQ_BUCKET,
                GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                ALIGN8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Heads vary fastest and query blocks run in reverse, so the heaviest blocks of every head (causal: the last
    # ones) start first and no head's heavy block is left for the tail of the launch.
    hq = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    tok, len_q, len_k = _seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    hk = hq // GROUP
    b64 = b.to(tl.int64)
    q_base = Q + _offset(b64, stride_qb, tok.to(tl.int64), stride_qt, hq, stride_qh, ALIGN8)
    k_base = K + _offset(b64, stride_kb, tok.to(tl.int64), stride_kt, hk, stride_kh, ALIGN8)
    v_base = V + _offset(b64, stride_vb, tok.to(tl.int64), stride_vt, hk, stride_vh, ALIGN8)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM,
                   EVEN_D, True)
    qpos = offs_m + (len_k - len_q)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_end, lo, f_lo, f_hi, hi = _key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
                                            WINDOW, GLOBAL_Q)
    if WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, g_end, qpos, offs_n,
                                   offs_d, len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q,
                                   HEAD_DIM, EVEN_D, BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, f_lo, qpos, offs_n,
                                   offs_d, len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q,
                                   HEAD_DIM, EVEN_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, f_lo, f_hi, qpos, offs_n,
                               offs_d, len_k, qk_scale, window, num_global, False, CAUSAL, WINDOW, GLOBAL_Q,
                               HEAD_DIM, EVEN_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, f_hi, hi, qpos, offs_n,
                               offs_d, len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q,
                               HEAD_DIM, EVEN_D, BLOCK_N, PRECISION)
    empty = l_i == 0.0  # rows that see no key (causal with Lq > Lk): output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
    o = acc / l_safe[:, None]
    o_base = O + _offset(b64, stride_ob, tok.to(tl.int64), stride_ot, hq, stride_oh, ALIGN8)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + b64 * stride_lb + hq * stride_lh + tok + offs_m, lse, mask=offs_m < len_q)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                    stride_lb, stride_lh, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    ALIGN8: tl.constexpr):
    """delta[b, h, t] = sum_d o * do (fp32), rows t < n_rows of sequence b, head h."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    o_base = O + _offset(b, stride_ob, 0, 0, h, stride_oh, ALIGN8)
    do_base = DO + _offset(b, stride_dob, 0, 0, h, stride_doh, ALIGN8)
    o = tl.load(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m, delta, mask=offs_m < n_rows)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start, end, kpos,
                offs_m, offs_d, len_q, len_k, qk_scale, window, num_global,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM,
                EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    off = len_k - len_q
    for start_m in range(start, end, BLOCK_M):
        qm = start_m + offs_m
        q = _load_rows(q_base + qm[:, None] * stride_qt + offs_d[None, :], qm, len_q, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        if MASK:
            lse = tl.load(lse_base + qm, mask=qm < len_q, other=0.0) * 1.4426950408889634
        else:
            lse = tl.load(lse_base + qm) * 1.4426950408889634
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM), log2 units
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASK:
            vis = _visible(qm[None, :] + off, kpos[:, None], qm[None, :] < len_q, True, window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            pT = tl.where(vis, pT, 0.0)
        do = _load_rows(do_base + qm[:, None] * stride_dot + offs_d[None, :], qm, len_q, offs_d, HEAD_DIM, EVEN_D,
                        MASK)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        if MASK:
            delta = tl.load(delta_base + qm, mask=qm < len_q, other=0.0)
        else:
            delta = tl.load(delta_base + qm)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, cu_seqlens,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh, stride_lb, stride_lh,
                     seqlen_q, seqlen_k, sm_scale, window, num_global, SEQ_BUCKET,
                     GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                     ALIGN8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # KV heads fastest, key blocks in order: the heaviest blocks (causal: the first; with global tokens: the block
    # holding them, seen by every query) of every head start first instead of ending the launch as a serial tail.
    hk = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    tok, len_q, len_k = _seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    tok64 = tok.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + _offset(b64, stride_kb, tok64, stride_kt, hk, stride_kh, ALIGN8) + offs_n[:, None] * stride_kt
                   + offs_d[None, :], offs_n, len_k, offs_d, HEAD_DIM, EVEN_D, True)
    v = _load_rows(V + _offset(b64, stride_vb, tok64, stride_vt, hk, stride_vh, ALIGN8) + offs_n[:, None] * stride_vt
                   + offs_d[None, :], offs_n, len_k, offs_d, HEAD_DIM, EVEN_D, True)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_gend, lo, f_lo, f_hi, hi = _query_ranges(n0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
                                               WINDOW, GLOBAL_Q)
    for g in range(GROUP):  # the query heads that share this KV head: their gradients sum here
        hq = hk * GROUP + g
        q_base = Q + _offset(b64, stride_qb, tok64, stride_qt, hq, stride_qh, ALIGN8)
        do_base = DO + _offset(b64, stride_dob, tok64, stride_dot, hq, stride_doh, ALIGN8)
        lse_base = LSE + b64 * stride_lb + hq * stride_lh + tok
        delta_base = DELTA + b64 * stride_lb + hq * stride_lh + tok
        if GLOBAL_Q:  # query blocks holding global queries (empty range when causal)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, 0,
                                 q_gend, offs_n, offs_m, offs_d, len_q, len_k, qk_scale, window, num_global, True,
                                 CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, f_lo,
                             offs_n, offs_m, offs_d, len_q, len_k, qk_scale, window, num_global, True, CAUSAL,
                             WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, f_lo, f_hi,
                             offs_n, offs_m, offs_d, len_q, len_k, qk_scale, window, num_global, False, CAUSAL,
                             WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, f_hi, hi,
                             offs_n, offs_m, offs_d, len_q, len_k, qk_scale, window, num_global, True, CAUSAL,
                             WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION)
    dk = dk * sm_scale
    mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + _offset(b64, stride_dkb, tok64, stride_dkt, hk, stride_dkh, ALIGN8) + offs_n[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + _offset(b64, stride_dvb, tok64, stride_dvt, hk, stride_dvh, ALIGN8) + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start, end, qpos, offs_n, offs_d,
              len_k, qk_scale, window, num_global,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        kn = start_n + offs_n
        k = _load_rows(k_base + kn[:, None] * stride_kt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        v = _load_rows(v_base + kn[:, None] * stride_vt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            vis = _visible(qpos[:, None], kn[None, :], True, kn[None, :] < len_k, window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, cu_seqlens,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
                   seqlen_q, seqlen_k, sm_scale, window, num_global, SEQ_BUCKET,
                   GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                   ALIGN8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    hq = tl.program_id(0)  # heads fastest, heaviest query blocks first (as in the forward)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    tok, len_q, len_k = _seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    hk = hq // GROUP
    b64 = b.to(tl.int64)
    tok64 = tok.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + _offset(b64, stride_qb, tok64, stride_qt, hq, stride_qh, ALIGN8) + offs_m[:, None] * stride_qt
                   + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM, EVEN_D, True)
    do_base = DO + _offset(b64, stride_dob, tok64, stride_dot, hq, stride_doh, ALIGN8)
    do = _load_rows(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM, EVEN_D,
                    True)
    row_ok = offs_m < len_q
    lse = tl.load(LSE + b64 * stride_lb + hq * stride_lh + tok + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b64 * stride_lb + hq * stride_lh + tok + offs_m, mask=row_ok, other=0.0)
    k_base = K + _offset(b64, stride_kb, tok64, stride_kt, hk, stride_kh, ALIGN8)
    v_base = V + _offset(b64, stride_vb, tok64, stride_vt, hk, stride_vh, ALIGN8)
    qpos = offs_m + (len_k - len_q)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_end, lo, f_lo, f_hi, hi = _key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
                                            WINDOW, GLOBAL_Q)
    if WINDOW:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, g_end, qpos, offs_n, offs_d,
                       len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D,
                       BLOCK_N, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, f_lo, qpos, offs_n, offs_d,
                       len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D,
                       BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, f_lo, f_hi, qpos, offs_n, offs_d,
                   len_k, qk_scale, window, num_global, False, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D,
                   BLOCK_N, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, f_hi, hi, qpos, offs_n, offs_d,
                   len_k, qk_scale, window, num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D,
                   BLOCK_N, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + _offset(b64, stride_dqb, tok64, stride_dqt, hq, stride_dqh, ALIGN8) + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def _empty_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a kernel output (every element is written by the kernels; tests swap this for NaN-filled)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides3(x: torch.Tensor, packed: bool):
    """(batch, token, head) strides of a (B, L, H, D) tensor, or of a packed (T, H, D) one (batch stride 0)."""
    if packed:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _aligned8(p: "_Problem", *tensors: torch.Tensor) -> bool:
    """True when every stride (but the last) is a multiple of 8 elements and every base 16-byte aligned: the kernels
    may then promise this to the compiler (tl.multiple_of), so loads masked to head_dim (72, 80, 96) vectorise."""
    if p.head_dim % 8:
        return False
    return all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)


def _seq_bucket(n: int) -> int:
    """Autotuning bucket of a sequence length (keeps the number of tuning runs small)."""
    return 0 if n <= 1024 else (1 if n <= 8192 else 2)


class _Problem:
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
            x = _empty_output((self.hq, self.total_q), torch.float32, device)
            return x, 0, x.stride(0)
        x = _empty_output((self.batch, self.hq, self.seqlen_q), torch.float32, device)
        return x, x.stride(0), x.stride(1)

    def common(self):
        return dict(seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, sm_scale=self.scale,
                    window=self.window or 0, num_global=self.num_global, SEQ_BUCKET=self.bucket, GROUP=self.group,
                    HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, EVEN_D=self.block_d == self.head_dim,
                    CAUSAL=self.causal, WINDOW=self.window is not None, GLOBAL_Q=self.global_q, VARLEN=self.packed,
                    PRECISION=self.precision)


def flash_forward(q, k, v, p: _Problem):
    """Launch the forward kernel. Returns o (contiguous, q's shape and dtype) and the fp32 LSE buffer."""
    o = _empty_output(q.shape, q.dtype, q.device)
    lse, slb, slh = p.lse_empty(q.device)
    grid = lambda meta: (p.hq, triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch)  # noqa: E731
    _fwd_kernel[grid](q, k, v, o, lse, p.cu, *_strides3(q, p.packed), *_strides3(k, p.packed),
                      *_strides3(v, p.packed), *_strides3(o, p.packed), slb, slh, **p.common(),
                      ALIGN8=_aligned8(p, q, k, v, o))
    return o, lse


def flash_backward(do, q, k, v, o, lse, p: _Problem):
    """Launch the backward kernels. Returns dq, dk, dv (contiguous, shapes and dtypes of q, k, v)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta, slb, slh = p.lse_empty(q.device)
    rows = p.total_q if p.packed else p.seqlen_q
    bm = 64
    _bwd_preprocess[(triton.cdiv(rows, bm), p.hq, 1 if p.packed else p.batch)](
        o, do, delta, *_strides3(o, p.packed), *_strides3(do, p.packed), slb, slh, rows,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_M=bm, ALIGN8=_aligned8(p, o, do))
    dq = _empty_output(q.shape, q.dtype, q.device)
    dk = _empty_output(k.shape, k.dtype, k.device)
    dv = _empty_output(v.shape, v.dtype, v.device)
    grid_kv = lambda meta: (p.hkv, triton.cdiv(p.seqlen_k, meta["BLOCK_N"]), p.batch)  # noqa: E731
    _bwd_dkdv_kernel[grid_kv](q, k, v, do, dk, dv, lse, delta, p.cu, *_strides3(q, p.packed),
                              *_strides3(k, p.packed), *_strides3(v, p.packed), *_strides3(do, p.packed),
                              *_strides3(dk, p.packed), *_strides3(dv, p.packed), slb, slh, **p.common(),
                              ALIGN8=_aligned8(p, q, k, v, do, dk, dv))
    grid_q = lambda meta: (p.hq, triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch)  # noqa: E731
    _bwd_dq_kernel[grid_q](q, k, v, do, dq, lse, delta, p.cu, *_strides3(q, p.packed), *_strides3(k, p.packed),
                           *_strides3(v, p.packed), *_strides3(do, p.packed), *_strides3(dq, p.packed), slb, slh,
                           **p.common(), ALIGN8=_aligned8(p, q, k, v, do, dq))
    return dq, dk, dv


# The kernels as torch.library custom ops: eager calls dispatch straight to them, and torch.compile (inductor)
# keeps them as single opaque nodes of its graph (shapes from the fake implementations) instead of breaking the
# graph around a Python launcher it cannot trace. `window` 0 means no window.
@torch.library.custom_op("qwen3vl_lab::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                   max_seqlen: int, causal: bool, window: int, num_global: int, scale: float,
                   global_queries: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (o with q's shape and dtype, fp32 LSE (B, Hq, Lq) or packed (Hq, T))."""
    p = _Problem(q, k, cu_seqlens, max_seqlen, causal, window or None, num_global, scale, global_queries)
    return flash_forward(q, k, v, p)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, window, num_global, scale, global_queries):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("qwen3vl_lab::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int, causal: bool,
                   window: int, num_global: int, scale: float,
                   global_queries: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv), contiguous, shapes and dtypes of q, k, v; recomputes P tile by tile."""
    p = _Problem(q, k, cu_seqlens, max_seqlen, causal, window or None, num_global, scale, global_queries)
    return flash_backward(do, q, k, v, o, lse, p)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, window, num_global, scale, global_queries):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *args = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do.contiguous(), q, k, v, o, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
