"""Flash attention backward in Triton, recomputing P tile by tile (FlashAttention-2, Dao 2023; Triton's fused-attention
tutorial 06-fused-attention).

delta = rowsum(o * do) (preprocess), then a dK/dV kernel (one program per key block and KV head, looping over the
query heads of its GQA group and over query blocks: no atomics, K/V never repeated in memory) and a dQ kernel (one
program per query block and query head, looping over key blocks). Block ranges from kernels/attention/masks.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import common
from .common import (DKDV_CONFIGS, DQ_CONFIGS, LOG2E, NO_SPECIALIZE, TUNE_KEY, Problem, aligned8, load_rows,
                     prune_configs, seq_info, strides3, tile_offset)
from .masks import key_ranges, query_ranges, visible


@triton.jit
def bwd_preprocess(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                    stride_lb, stride_lh, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    ALIGN8: tl.constexpr):
    """delta[b, h, t] = sum_d o * do (fp32), rows t < n_rows of sequence b, head h."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    o_base = O + tile_offset(b, stride_ob, 0, 0, h, stride_oh, ALIGN8)
    do_base = DO + tile_offset(b, stride_dob, 0, 0, h, stride_doh, ALIGN8)
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
        q = load_rows(q_base + qm[:, None] * stride_qt + offs_d[None, :], qm, len_q, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        if MASK:
            lse = tl.load(lse_base + qm, mask=qm < len_q, other=0.0) * LOG2E
        else:
            lse = tl.load(lse_base + qm) * LOG2E
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM), log2 units
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASK:
            vis = visible(qm[None, :] + off, kpos[:, None], qm[None, :] < len_q, True, window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            pT = tl.where(vis, pT, 0.0)
        do = load_rows(do_base + qm[:, None] * stride_dot + offs_d[None, :], qm, len_q, offs_d, HEAD_DIM, EVEN_D,
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


@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, cu_seqlens,
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
    tok, len_q, len_k = seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    tok64 = tok.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(K + tile_offset(b64, stride_kb, tok64, stride_kt, hk, stride_kh, ALIGN8) + offs_n[:, None] * stride_kt
                   + offs_d[None, :], offs_n, len_k, offs_d, HEAD_DIM, EVEN_D, True)
    v = load_rows(V + tile_offset(b64, stride_vb, tok64, stride_vt, hk, stride_vh, ALIGN8) + offs_n[:, None] * stride_vt
                   + offs_d[None, :], offs_n, len_k, offs_d, HEAD_DIM, EVEN_D, True)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_gend, lo, f_lo, f_hi, hi = query_ranges(n0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
                                               WINDOW, GLOBAL_Q)
    for g in range(GROUP):  # the query heads that share this KV head: their gradients sum here
        hq = hk * GROUP + g
        q_base = Q + tile_offset(b64, stride_qb, tok64, stride_qt, hq, stride_qh, ALIGN8)
        do_base = DO + tile_offset(b64, stride_dob, tok64, stride_dot, hq, stride_doh, ALIGN8)
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
    tl.store(DK + tile_offset(b64, stride_dkb, tok64, stride_dkt, hk, stride_dkh, ALIGN8) + offs_n[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + tile_offset(b64, stride_dvb, tok64, stride_dvt, hk, stride_dvh, ALIGN8) + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start, end, qpos, offs_n, offs_d,
              len_k, qk_scale, window, num_global,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        kn = start_n + offs_n
        k = load_rows(k_base + kn[:, None] * stride_kt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        v = load_rows(v_base + kn[:, None] * stride_vt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D,
                       MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            vis = visible(qpos[:, None], kn[None, :], True, kn[None, :] < len_k, window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, cu_seqlens,
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
    tok, len_q, len_k = seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    hk = hq // GROUP
    b64 = b.to(tl.int64)
    tok64 = tok.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + tile_offset(b64, stride_qb, tok64, stride_qt, hq, stride_qh, ALIGN8) + offs_m[:, None] * stride_qt
                   + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM, EVEN_D, True)
    do_base = DO + tile_offset(b64, stride_dob, tok64, stride_dot, hq, stride_doh, ALIGN8)
    do = load_rows(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM, EVEN_D,
                    True)
    row_ok = offs_m < len_q
    lse = tl.load(LSE + b64 * stride_lb + hq * stride_lh + tok + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + b64 * stride_lb + hq * stride_lh + tok + offs_m, mask=row_ok, other=0.0)
    k_base = K + tile_offset(b64, stride_kb, tok64, stride_kt, hk, stride_kh, ALIGN8)
    v_base = V + tile_offset(b64, stride_vb, tok64, stride_vt, hk, stride_vh, ALIGN8)
    qpos = offs_m + (len_k - len_q)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_end, lo, f_lo, f_hi, hi = key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
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
    tl.store(DQ + tile_offset(b64, stride_dqb, tok64, stride_dqt, hq, stride_dqh, ALIGN8) + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))



def flash_backward(do, q, k, v, o, lse, p: Problem):
    """Launch the backward kernels. Returns dq, dk, dv (contiguous, shapes and dtypes of q, k, v)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta, slb, slh = p.lse_empty(q.device)
    rows = p.total_q if p.packed else p.seqlen_q
    bm = 64
    bwd_preprocess[(triton.cdiv(rows, bm), p.hq, 1 if p.packed else p.batch)](
        o, do, delta, *strides3(o, p.packed), *strides3(do, p.packed), slb, slh, rows,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_M=bm, ALIGN8=aligned8(p, o, do))
    dq = common.empty_output(q.shape, q.dtype, q.device)
    dk = common.empty_output(k.shape, k.dtype, k.device)
    dv = common.empty_output(v.shape, v.dtype, v.device)
    grid_kv = lambda meta: (p.hkv, triton.cdiv(p.seqlen_k, meta["BLOCK_N"]), p.batch)  # noqa: E731
    bwd_dkdv_kernel[grid_kv](q, k, v, do, dk, dv, lse, delta, p.cu, *strides3(q, p.packed),
                              *strides3(k, p.packed), *strides3(v, p.packed), *strides3(do, p.packed),
                              *strides3(dk, p.packed), *strides3(dv, p.packed), slb, slh, **p.common(),
                              ALIGN8=aligned8(p, q, k, v, do, dk, dv))
    grid_q = lambda meta: (p.hq, triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch)  # noqa: E731
    bwd_dq_kernel[grid_q](q, k, v, do, dq, lse, delta, p.cu, *strides3(q, p.packed), *strides3(k, p.packed),
                           *strides3(v, p.packed), *strides3(do, p.packed), *strides3(dq, p.packed), slb, slh,
                           **p.common(), ALIGN8=aligned8(p, q, k, v, do, dq))
    return dq, dk, dv


