"""Block-sparse attention forward (prefill) in Triton: every (sequence, query head, query block) visits only the key
blocks its row of a boolean block mask selects, with the online softmax of kernels/attention/forward.py.

The block mask is (B, Hq, ceil(Lq / bm), ceil(Lk / bn)); the host turns it into a compact list of selected key-block
indices per row (`compact_block_mask`), so the work is proportional to the selected blocks. One program per
(query head, query block, sequence) walks its list: first the blocks that are fully visible to the whole query
block (no element mask), then the ones that cross the causal diagonal or the ragged end of the keys (element mask),
each through forward.py's `fwd_tile`. GQA reads the shared K/V head (no repeat). Query i sits at key position
Lk - Lq + i (bottom-right alignment, as in flash-attn): a chunk of queries after a long KV cache (the long-video
engine's chunked prefill, model/qwen3vl.py's `prefill`) is the Lq < Lk case.
The block patterns themselves come from kernels/attention/sparse_patterns.py (XAttention, MInference
vertical-slash, a static window); block-sparse FlashAttention in this form is the kernel both papers use
(XAttention, arXiv 2503.16428; MInference, arXiv 2407.02490).
Forward only (no backward): the methods are prefill accelerations.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import common
from .common import FP32_CONFIG, INTERPRET, LN2, LOG2E, load_rows, tile_offset
from .forward import fwd_tile

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCKS = (16, 32, 64, 128)
_COMPACT_ROWS = 1 << 16  # block-mask rows turned into index lists per step (bounds nonzero()'s int64 output)


@triton.jit
def sparse_fwd_kernel(Q, K, V, O, LSE, IDX, CNT, NFULL,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
                      stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
                      seqlen_q, seqlen_k, sm_scale, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                      MASK_M: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # IDX (B, Hq, nM, max_count) int32: the selected key blocks of each row, ascending; CNT, NFULL (B, Hq, nM)
    # int32: how many, and how many of them (a prefix) are fully visible to every row of the query block.
    # MASK_M x MASK_N are the mask's blocks, BLOCK_M x BLOCK_N the kernel's tiles (divisors of them: fp32 tiles
    # must be smaller to fit shared memory): a program owns one query tile and walks each selected key block in
    # MASK_N / BLOCK_N tiles. As forward.py: heads vary fastest, query tiles run in reverse (causal: the heaviest
    # rows start first).
    hq = tl.program_id(0)
    pid_t = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_m = pid_t // (MASK_M // BLOCK_M)  # the mask row of this query tile
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk = hq // GROUP
    m0 = pid_t * BLOCK_M
    zero = b64 * 0
    q_base = Q + tile_offset(b64, stride_qb, zero, stride_qt, hq, stride_qh, False)
    k_base = K + tile_offset(b64, stride_kb, zero, stride_kt, hk, stride_kh, False)
    v_base = V + tile_offset(b64, stride_vb, zero, stride_vt, hk, stride_vh, False)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM,
                  EVEN_D, True)
    qpos = offs_m + (seqlen_k - seqlen_q)
    qk_scale = sm_scale * LOG2E  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = b64 * stride_cb + hq * stride_ch + pid_m
    count = tl.load(CNT + row)
    n_full = tl.load(NFULL + row)
    idx_base = IDX + b64 * stride_ib + hq * stride_ih + pid_m * stride_im
    for i in range(0, n_full * (MASK_N // BLOCK_N)):
        t = i % (MASK_N // BLOCK_N)
        kn = tl.load(idx_base + i // (MASK_N // BLOCK_N)) * MASK_N + t * BLOCK_N + offs_n
        acc, l_i, m_i = fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, K, V, 0, 0, kn, qpos,
                                 offs_d, seqlen_k, qk_scale, 0, 0, False, CAUSAL, False, False, HEAD_DIM, EVEN_D,
                                 PRECISION, False)
    for i in range(n_full * (MASK_N // BLOCK_N), count * (MASK_N // BLOCK_N)):
        t = i % (MASK_N // BLOCK_N)
        kn = tl.load(idx_base + i // (MASK_N // BLOCK_N)) * MASK_N + t * BLOCK_N + offs_n
        acc, l_i, m_i = fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, K, V, 0, 0, kn, qpos,
                                 offs_d, seqlen_k, qk_scale, 0, 0, True, CAUSAL, False, False, HEAD_DIM, EVEN_D,
                                 PRECISION, False)
    empty = l_i == 0.0  # rows that see no selected key: output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # natural log
    o = acc / l_safe[:, None]
    o_base = O + tile_offset(b64, stride_ob, zero, stride_ot, hq, stride_oh, False)
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + b64 * stride_lb + hq * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def block_visibility(lq: int, lk: int, bm: int, bn: int, causal: bool, device=None):
    """Which blocks hold at least one visible (query, key) pair, and which are visible in full.

    Args:
        lq, lk: query and key lengths (queries bottom-right aligned: query i at key position lk - lq + i).
        bm, bn: query and key block sizes.
    Returns:
        (any_visible, fully_visible), each (ceil(lq / bm), ceil(lk / bn)) bool. Fully visible: every real query
        row of the block sees every key of the key block (the kernel skips the element mask there).
    """
    nm, nn = math.ceil(lq / bm), math.ceil(lk / bn)
    m = torch.arange(nm, device=device)
    n = torch.arange(nn, device=device)
    q_first = m * bm + (lk - lq)  # key position of each block's first query row
    k_first = n * bn
    k_last = torch.clamp(k_first + bn, max=lk) - 1
    in_range = (k_first + bn <= lk)[None, :].expand(nm, nn)  # no ragged key tail inside the block
    if not causal:
        return torch.ones(nm, nn, dtype=torch.bool, device=device), in_range.clone()
    q_last = torch.clamp(m * bm + bm, max=lq) - 1 + (lk - lq)
    any_vis = k_first[None, :] <= q_last[:, None]
    full = (k_last[None, :] <= q_first[:, None]) & in_range
    return any_vis, full


def compact_block_mask(block_mask: torch.Tensor, full: torch.Tensor):
    """Turn a boolean block mask into per-row lists of selected key blocks for the kernel.

    Args:
        block_mask: (B, H, nM, nN) bool, already restricted to blocks with a visible pair.
        full: (nM, nN) bool: blocks fully visible to their whole query block.
    Returns:
        idx (B, H, nM, max(1, max_count)) int32: selected key blocks of each row, fully visible ones first (each
        group ascending), the rest of the row padding; count and n_full (B, H, nM) int32.
    """
    B, H, nm, nn = block_mask.shape
    # Visibility is monotone in the key position, so a row's fully visible blocks are its lowest selected columns
    # (only the ragged last key block and the blocks crossing the diagonal need the mask): ascending order puts
    # them first, and n_full counts them.
    count = block_mask.sum(-1, dtype=torch.int32)
    n_full = (block_mask & full).sum(-1, dtype=torch.int32)
    width = max(1, int(count.max()) if count.numel() else 1)
    idx = torch.zeros(B * H * nm, width, dtype=torch.int32, device=block_mask.device)
    flat = block_mask.reshape(-1, nn)
    starts = count.reshape(-1).cumsum(0, dtype=torch.int64) - count.reshape(-1)  # first slot of each row
    for r0 in range(0, flat.shape[0], _COMPACT_ROWS):  # bounded memory for 1M-token masks
        rows, cols = flat[r0:r0 + _COMPACT_ROWS].nonzero(as_tuple=True)  # row-major: columns ascend in a row
        rows = rows + r0
        rank = torch.arange(rows.numel(), device=flat.device) + starts[r0] - starts[rows]  # slot within the row
        idx[rows, rank] = cols.to(torch.int32)
    return idx.view(B, H, nm, width), count, n_full


def kernel_tiles(dtype: torch.dtype, bm: int, bn: int) -> tuple[int, int]:
    """The kernel's (query, key) tile for mask blocks bm x bn: the blocks themselves for 16-bit inputs; for fp32
    at most 64 x 32 (common.FP32_CONFIG: ieee fp32 tiles need twice the shared memory). Same rule on the CPU, so
    the tests run the sub-tiled path too."""
    if dtype == torch.float32:
        return min(bm, FP32_CONFIG.kwargs["BLOCK_M"]), min(bn, FP32_CONFIG.kwargs["BLOCK_N"])
    return bm, bn


def _check_sparse(q, k, v, block_mask, block_size, scale):
    """Validate the inputs of `sparse_attention`; returns (bm, bn)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"sparse_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"sparse_attention: {name} must be (B, L, H, D), got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"sparse_attention: {name} has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sparse_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device == block_mask.device):
        raise ValueError(f"sparse_attention: q, k, v, block_mask are on different devices ({q.device}, {k.device}, "
                         f"{v.device}, {block_mask.device})")
    if k.shape != v.shape:
        raise ValueError(f"sparse_attention: k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    B, lq, hq, d = q.shape
    if k.shape[0] != B:
        raise ValueError(f"sparse_attention: q and k differ in batch size ({B} vs {k.shape[0]})")
    hkv = k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"sparse_attention: q head_dim {d} != k/v head_dim {k.shape[3]}")
    if not 1 <= d <= 128:
        raise ValueError(f"sparse_attention: head_dim {d} not supported (1..128)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"sparse_attention: query heads {hq} must be a multiple of key/value heads {hkv}")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and b in _BLOCKS for b in block_size)):
        raise ValueError(f"sparse_attention: block_size must be (bm, bn) with each in {_BLOCKS}, got {block_size!r}")
    bm, bn = block_size
    want = (B, hq, math.ceil(lq / bm), math.ceil(k.shape[1] / bn))
    if block_mask.dtype != torch.bool:
        raise TypeError(f"sparse_attention: block_mask must be a bool tensor, got {block_mask.dtype}")
    if tuple(block_mask.shape) != want:
        raise ValueError(f"sparse_attention: block_mask must be (B, Hq, ceil(Lq/bm), ceil(Lk/bn)) = {want} for "
                         f"block_size {(bm, bn)}, got {tuple(block_mask.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"sparse_attention: scale must be a Python number or None, got {type(scale).__name__}")
    return bm, bn


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                     block_size: tuple[int, int] = (128, 128), causal: bool = True, scale: float | None = None,
                     return_lse: bool = False):
    """Block-sparse softmax attention (forward, no gradient): query block m of head h attends only to the key
    blocks n with block_mask[b, h, m, n]; inside a selected block the causal rule applies.

    Args:
        q: (B, Lq, Hq, D) fp16, bf16 or fp32; D <= 128.
        k, v: (B, Lk, Hkv, D), q's dtype, Hq % Hkv == 0 (GQA without repeating K/V).
        block_mask: (B, Hq, ceil(Lq / bm), ceil(Lk / bn)) bool; lengths need not be multiples of the blocks.
        block_size: (bm, bn), each 16, 32, 64 or 128 (the kernel's tile sizes).
        causal: key j visible to query i only when j <= Lk - Lq + i (bottom-right aligned when Lq < Lk).
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the natural-log LSE (B, Hq, Lq) fp32 (-inf for rows that see nothing).
    Returns:
        o (B, Lq, Hq, D) in q's dtype (0 for a query row with no visible selected key); and lse when return_lse.
    """
    bm, bn = _check_sparse(q, k, v, block_mask, block_size, scale)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise RuntimeError("sparse_attention is forward only (prefill): call it under torch.no_grad() / "
                           "inference_mode() or detach q, k, v")
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    scale = float(d ** -0.5 if scale is None else scale)
    if q.numel() == 0 or k.numel() == 0:
        o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((B, hq, lq), float("-inf"), device=q.device)
        return (o, lse) if return_lse else o
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    any_vis, full = block_visibility(lq, lk, bm, bn, causal, q.device)
    idx, count, n_full = compact_block_mask(block_mask & any_vis, full)
    o = common.empty_output(q.shape, q.dtype, q.device)
    lse = common.empty_output((B, hq, lq), torch.float32, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    tm, tn = kernel_tiles(q.dtype, bm, bn)
    if INTERPRET:
        launch = {}
    else:  # a 128 x 128 tile wants 8 warps (forward.py's tuned configs)
        launch = dict(num_warps=8 if tm * tn >= 128 * 128 else 4, num_stages=3 if q.dtype != torch.float32 else 2)
    grid = (hq, math.ceil(lq / bm) * (bm // tm), B)
    sparse_fwd_kernel[grid](q, k, v, o, lse, idx, count, n_full, q.stride(0), q.stride(1), q.stride(2),
                            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                            idx.stride(0), idx.stride(1), idx.stride(2), count.stride(0), count.stride(1),
                            lq, lk, scale, hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=block_d == d,
                            CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                            MASK_M=bm, MASK_N=bn, BLOCK_M=tm, BLOCK_N=tn, **launch)
    return (o, lse) if return_lse else o


def expand_block_mask(block_mask: torch.Tensor, lq: int, lk: int, block_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, nM, nN) block mask -> (B, H, lq, lk) element mask (each block repeated over its rows and columns)."""
    bm, bn = block_size
    return block_mask.repeat_interleave(bm, dim=2)[:, :, :lq].repeat_interleave(bn, dim=3)[..., :lk]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                               block_size: tuple[int, int] = (128, 128), causal: bool = True,
                               scale: float | None = None, return_lse: bool = False):
    """fp32 reference of `sparse_attention` (same contract): dense scores masked by the expanded block mask AND the
    causal rule (model/masks.py's `AttentionMask`, bottom-right aligned). Materialises (B, Hq, Lq, Lk): small
    shapes only."""
    from model.masks import AttentionMask  # plain torch

    bm, bn = _check_sparse(q, k, v, block_mask, block_size, scale)
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    keep = expand_block_mask(block_mask, lq, lk, (bm, bn)) & AttentionMask(causal=causal).dense(lq, lk, q.device)
    kf = k.float().repeat_interleave(hq // hkv, dim=2)  # (B, Lk, Hq, D): the reference may repeat K/V
    vf = v.float().repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Lq); -inf where a row sees nothing
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # such rows: all zeros, output 0
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)
    return (o, lse) if return_lse else o


__all__ = ["sparse_attention", "sparse_attention_reference", "expand_block_mask", "block_visibility",
           "compact_block_mask"]
