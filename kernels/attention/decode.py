"""Split-KV decoding attention in Triton (flash-decoding: Dao et al., 2023, "Flash-Decoding for long-context
inference").

For generation with a long KV cache: few queries, very long keys. The keys are split into chunks, one program per
(chunk, KV head, sequence) computes a partial softmax over its chunk for all the query heads of its GQA group at
once (rows = group x queries, so K/V are read once per KV head), and a second kernel combines the partial outputs
through their log-sum-exps. Forward only (no autograd); the masks of kernels/attention/masks.py and the bottom-right
alignment of `flash.py`. K/V may be an fp8 e4m3 cache with per-key scales (kernels/attention/fp8.py), dequantised
tile by tile as in forward.py (the KV_FP8 flag).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import INTERPRET, LN2, LOG2E
from .fp8 import FP8_DTYPE
from .masks import visible


@triton.jit
def _decode_partial_kernel(Q, K, V, OP, LP, KS, VS, KLEN,
                           stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                           stride_vb, stride_vt, stride_vh,
                           stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
                           seqlen_q, seqlen_k, keys_per_split, sm_scale, window, num_global,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                           WINDOW: tl.constexpr, GLOBAL_Q: tl.constexpr, PRECISION: tl.constexpr,
                           KV_FP8: tl.constexpr, DEVICE_LEN: tl.constexpr):
    """Partial attention of one key chunk. OP: (S, B, Hq, Lq, D) fp32 normalised outputs, LP: (S, B, Hq, Lq) fp32
    natural-log LSE (-inf where the chunk holds no visible key). KV_FP8: K, V are float8_e4m3fn with fp32 scales
    KS, VS (B, Lk, Hkv), dequantised as in forward.py's `_fwd_inner`; otherwise KS, VS are None."""
    s = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_batch = tl.num_programs(2)
    if DEVICE_LEN:  # a preallocated cache: sequence b holds KLEN[b] valid keys (read on the device: CUDA graphs)
        seqlen_k = tl.load(KLEN + b)
    rows = tl.arange(0, BLOCK_R)  # row r = g * Lq + i: query i of query head hk * GROUP + g
    g = rows // seqlen_q
    i = rows % seqlen_q
    row_ok = rows < GROUP * seqlen_q
    hq = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + i[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = i + (seqlen_k - seqlen_q)
    qk_scale = sm_scale * LOG2E
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    ks_base = KS
    vs_base = VS
    if KV_FP8:
        ks_base = KS + b * stride_ksb + hk * stride_ksh
        vs_base = VS + b * stride_vsb + hk * stride_vsh
    start = s * keys_per_split
    end = tl.minimum(start + keys_per_split, seqlen_k)
    # visible keys of all rows: [0, num_global) and [lowest window start, end) when windowed. That covers global
    # queries too: when the first row (key position Lk - Lq) is one, the window start is below num_global.
    r1_end = start
    r2_start = start
    if WINDOW:
        r1_end = tl.minimum(end, tl.maximum(start, (num_global + BLOCK_N - 1) // BLOCK_N * BLOCK_N))
        w_lo = tl.maximum(seqlen_k - seqlen_q - window + 1, 0) // BLOCK_N * BLOCK_N
        r2_start = tl.maximum(r1_end, w_lo)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for phase in tl.static_range(2):
        if phase == 0:
            lo = start
            hi = r1_end
        else:
            lo = r2_start
            hi = end
        for start_n in range(lo, hi, BLOCK_N):
            kn = start_n + offs_n
            k_ok = kn < end
            k = tl.load(k_base + kn[:, None] * stride_kt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if KV_FP8:  # dequantise in fp32, round once to q's dtype (as forward.py)
                ksc = tl.load(ks_base + kn * stride_kst, mask=k_ok, other=0.0)
                k = (k.to(tl.float32) * ksc[:, None]).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            vis = visible(qpos[:, None], kn[None, :], row_ok[:, None], k_ok[None, :], window, num_global, CAUSAL,
                           WINDOW, GLOBAL_Q)
            qk = tl.where(vis, qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + kn[:, None] * stride_vt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if KV_FP8:
                vsc = tl.load(vs_base + kn * stride_vst, mask=k_ok, other=0.0)
                v = (v.to(tl.float32) * vsc[:, None]).to(q.dtype)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_ij
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o = acc / l_safe[:, None]
    n_heads = tl.num_programs(1) * GROUP
    row_idx = ((s * n_batch + b) * n_heads + hq) * seqlen_q + i  # flat index into (S, B, Hq, Lq)
    tl.store(OP + row_idx[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LP + row_idx, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(OP, LP, O, LSE, stride_ob, stride_ot, stride_oh, n_split, n_rows, seqlen_q, n_heads,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the partial outputs of the splits for one (b, hq, i) row: o = sum_s exp(lse_s - lse) o_s."""
    row = tl.program_id(0)  # flat (b, hq, i)
    b = row // (n_heads * seqlen_q)
    hq = (row // seqlen_q) % n_heads
    i = row % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_split
    lse_s = tl.load(LP + offs_s * n_rows + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # (BLOCK_S,), 0 for empty splits
    total = tl.sum(w, 0)
    o_s = tl.load(OP + (offs_s[:, None] * n_rows + row) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(O + b.to(tl.int64) * stride_ob + i * stride_ot + hq * stride_oh + offs_d, o.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, lse)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     window: int | None = None, num_global: int = 0, scale: float | None = None,
                     num_splits: int | None = None, global_queries: bool = False,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     kv_length: torch.Tensor | None = None):
    """Split-KV attention for few queries over a long cache (forward only).

    Args:
        q: (B, Lq, Hq, D) with small Lq * Hq / Hkv (<= 128 rows per KV head); last dim contiguous.
        k, v: (B, Lk, Hkv, D), last dim contiguous; q's dtype, or float8_e4m3fn with k_scale and v_scale.
        causal, window, num_global, scale: as in `attention` (bottom-right aligned).
        num_splits: key chunks per (sequence, KV head); default fills the GPU about twice.
        global_queries: as in `attention` (queries at key positions < num_global ignore the window).
        k_scale, v_scale: (B, Lk, Hkv) fp32 scales of an fp8 K/V cache (kernels/attention/fp8.py), else None.
        kv_length: (B,) int32 on q's device, or None: sequence b holds only its first kv_length[b] keys (a
            preallocated cache; the queries are the last of them). Read by the kernel, so one launch serves every
            length: a decode step captured in a CUDA graph replays as the cache grows (model/generation.py).
    Returns:
        o (B, Lq, Hq, D) in q's dtype and the natural-log LSE (B, Hq, Lq) fp32.
    """
    bsz, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = group * lq
    if rows > 128:
        raise ValueError(f"decode_attention: Lq * Hq / Hkv = {rows} > 128 rows per KV head; use attention()")
    kv8 = k.dtype == FP8_DTYPE
    if kv8 != (k_scale is not None) or kv8 != (v_scale is not None) or v.dtype != k.dtype:
        raise ValueError(f"decode_attention: k_scale and v_scale go with float8_e4m3fn k and v, and only with them "
                         f"(k {k.dtype}, v {v.dtype}, k_scale {k_scale is not None}, v_scale {v_scale is not None})")
    scale = d ** -0.5 if scale is None else scale
    block_n = 32 if INTERPRET else 64
    if num_splits is None:
        want = triton.cdiv(2 * _num_sms(q.device), bsz * hkv)
        num_splits = max(1, min(want, triton.cdiv(lk, 256)))
    keys_per_split = triton.cdiv(triton.cdiv(lk, num_splits), block_n) * block_n
    num_splits = triton.cdiv(lk, keys_per_split)
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(16, triton.next_power_of_2(rows))
    if kv_length is not None and (kv_length.dtype != torch.int32 or tuple(kv_length.shape) != (bsz,)
                                  or kv_length.device != q.device):
        raise ValueError(f"decode_attention: kv_length must be a ({bsz},) int32 tensor on {q.device}, got "
                         f"{kv_length.dtype} {tuple(kv_length.shape)} on {kv_length.device}")
    op = common.empty_output((num_splits, bsz, hq, lq, d), torch.float32, q.device)
    lp = common.empty_output((num_splits, bsz, hq, lq), torch.float32, q.device)
    _decode_partial_kernel[(num_splits, hkv, bsz)](
        q, k, v, op, lp, k_scale, v_scale, kv_length, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *common.scale_strides(k_scale), *common.scale_strides(v_scale), lq, lk, keys_per_split, scale,
        window or 0, num_global, GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
        CAUSAL=causal, WINDOW=window is not None, GLOBAL_Q=bool(global_queries) and window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=kv8, DEVICE_LEN=kv_length is not None,
        num_warps=4, num_stages=1 if INTERPRET else (2 if q.dtype == torch.float32 else 3))
    o = common.empty_output(q.shape, q.dtype, q.device)
    lse = common.empty_output((bsz, hq, lq), torch.float32, q.device)
    n_rows = bsz * hq * lq
    _decode_combine_kernel[(n_rows,)](op, lp, o, lse, *o.stride()[:3], num_splits, n_rows, lq, hq, HEAD_DIM=d,
                                      BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                                      num_warps=4)
    return o, lse
