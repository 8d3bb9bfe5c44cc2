"""Flash attention forward in Triton: one program per (query head, query block, sequence), online softmax over key
blocks in fp32; stores the output and the natural-log LSE per query row.

Follows Triton's fused-attention tutorial (06-fused-attention) and FlashAttention-2 (Dao, 2023). The key blocks are
visited in the ranges of kernels/attention/masks.py (`key_ranges`): masked ranges with the element mask, the fully
visible range without it (the same loop, specialised by the MASK constexpr).

With KV_FP8 the K and V tiles are float8_e4m3fn with one fp32 scale per key (kernels/attention/fp8.py), dequantised
as they are loaded: each row times its scale in fp32, rounded once to q's dtype for the dot; no full-precision copy
of the cache exists. Scaling the scores instead of the K tile would skip a rounding, but Triton 3.6 then loads the
scales once per score column a thread holds (sm_90, BM = BN = 128: 216 instead of 48 four-byte copies per thread,
and a spill; scripts/attention_ptx_report.py --kv-fp8). Without the flag (KS, VS None) the kernel compiles to the
same instructions as before it (compared on the sm_90 PTX, Triton 3.6 and 3.8).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import common
from .common import (FWD_CONFIGS, LN2, LOG2E, NO_SPECIALIZE, TUNE_KEY, Problem, aligned8, load_rows, load_scales,
                     prune_configs, scale_strides, seq_info, strides3, tile_offset)
from .masks import key_ranges, visible


@triton.jit
def fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base, stride_kst, stride_vst,
             kn, qpos, offs_d, len_k, qk_scale, window, num_global, MASK: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
             KV_FP8: tl.constexpr):
    """One key tile (key positions kn, (BN,)) of the online softmax: returns the updated (acc, l_i, m_i). Shared by
    the dense loop below and the block-sparse kernel (kernels/attention/sparse.py), which visits listed tiles."""
    k = load_rows(k_base + kn[:, None] * stride_kt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D, MASK)
    if KV_FP8:  # dequantise in fp32 (k8 * its key's scale), round once to q's dtype for the dot
        k = (k.to(tl.float32) * load_scales(ks_base + kn * stride_kst, kn, len_k, MASK)[:, None]).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN) raw scores
    if MASK:
        vis = visible(qpos[:, None], kn[None, :], True, kn[None, :] < len_k, window, num_global, CAUSAL,
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
    v = load_rows(v_base + kn[:, None] * stride_vt + offs_d[None, :], kn, len_k, offs_d, HEAD_DIM, EVEN_D, MASK)
    if KV_FP8:  # as K (scaling P's columns instead would push small probabilities into fp16's subnormals)
        v = (v.to(tl.float32) * load_scales(vs_base + kn * stride_vst, kn, len_k, MASK)[:, None]).to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base, stride_kst, stride_vst,
               start, end, qpos, offs_n, offs_d, len_k, qk_scale, window, num_global,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, HEAD_DIM,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        acc, l_i, m_i = fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base,
                                 stride_kst, stride_vst, start_n + offs_n, qpos, offs_d, len_k, qk_scale, window,
                                 num_global, MASK, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, PRECISION, KV_FP8)
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def fwd_kernel(Q, K, V, O, LSE, cu_seqlens, KS, VS,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
                stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
                seqlen_q, seqlen_k, sm_scale, window, num_global, SEQ_BUCKET,
                GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                ALIGN8: tl.constexpr, KV_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # KV_FP8: K and V are float8_e4m3fn with fp32 scales KS, VS (B, Lk, Hkv) (kernels/attention/fp8.py), dequantised
    # tile by tile; otherwise KS and VS are None and the kernel is the plain one.
    # Heads vary fastest and query blocks run in reverse, so the heaviest blocks of every head (causal: the last
    # ones) start first and no head's heavy block is left for the tail of the launch.
    hq = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    tok, len_q, len_k = seq_info(cu_seqlens, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    hk = hq // GROUP
    b64 = b.to(tl.int64)
    q_base = Q + tile_offset(b64, stride_qb, tok.to(tl.int64), stride_qt, hq, stride_qh, ALIGN8)
    k_base = K + tile_offset(b64, stride_kb, tok.to(tl.int64), stride_kt, hk, stride_kh, ALIGN8)
    v_base = V + tile_offset(b64, stride_vb, tok.to(tl.int64), stride_vt, hk, stride_vh, ALIGN8)
    ks_base = KS
    vs_base = VS
    if KV_FP8:  # fp8 is (B, L, H, D) only: no token offset
        if ALIGN8:  # one-byte elements: the host checked 16-element alignment too; promising 16 (not tile_offset's
            # 8) keeps the K/V loads 16 bytes wide
            k_base = K + tl.multiple_of(tile_offset(b64, stride_kb, 0, stride_kt, hk, stride_kh, False), 16)
            v_base = V + tl.multiple_of(tile_offset(b64, stride_vb, 0, stride_vt, hk, stride_vh, False), 16)
        ks_base = KS + b64 * stride_ksb + hk * stride_ksh
        vs_base = VS + b64 * stride_vsb + hk * stride_vsh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM,
                   EVEN_D, True)
    qpos = offs_m + (len_k - len_q)
    qk_scale = sm_scale * LOG2E  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_end, lo, f_lo, f_hi, hi = key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M, BLOCK_N, CAUSAL,
                                            WINDOW, GLOBAL_Q)
    if WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base,
                                   stride_kst, stride_vst, 0, g_end, qpos, offs_n, offs_d, len_k, qk_scale, window,
                                   num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                   KV_FP8)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base,
                                   stride_kst, stride_vst, lo, f_lo, qpos, offs_n, offs_d, len_k, qk_scale, window,
                                   num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                   KV_FP8)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base,
                               stride_kst, stride_vst, f_lo, f_hi, qpos, offs_n, offs_d, len_k, qk_scale, window,
                               num_global, False, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                               KV_FP8)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_base, vs_base,
                               stride_kst, stride_vst, f_hi, hi, qpos, offs_n, offs_d, len_k, qk_scale, window,
                               num_global, True, CAUSAL, WINDOW, GLOBAL_Q, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                               KV_FP8)
    empty = l_i == 0.0  # rows that see no key (causal with Lq > Lk): output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # natural log
    o = acc / l_safe[:, None]
    o_base = O + tile_offset(b64, stride_ob, tok.to(tl.int64), stride_ot, hq, stride_oh, ALIGN8)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + b64 * stride_lb + hq * stride_lh + tok + offs_m, lse, mask=offs_m < len_q)



def flash_forward(q, k, v, p: Problem, k_scale=None, v_scale=None):
    """Launch the forward kernel. Returns o (contiguous, q's shape and dtype) and the fp32 LSE buffer. With k_scale
    and v_scale ((B, Lk, Hkv) fp32), k and v are an fp8 e4m3 cache (kernels/attention/fp8.py)."""
    o = common.empty_output(q.shape, q.dtype, q.device)
    lse, slb, slh = p.lse_empty(q.device)
    grid = lambda meta: (p.hq, triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch)  # noqa: E731
    fwd_kernel[grid](q, k, v, o, lse, p.cu, k_scale, v_scale, *strides3(q, p.packed), *strides3(k, p.packed),
                      *strides3(v, p.packed), *strides3(o, p.packed), slb, slh, *scale_strides(k_scale),
                      *scale_strides(v_scale), **p.common(), ALIGN8=aligned8(p, q, k, v, o),
                      KV_FP8=k_scale is not None)
    return o, lse

