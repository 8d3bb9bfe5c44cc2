"""Mask helpers of the Triton attention kernels: the element mask of a tile and the block ranges a program visits.

The rule is model/masks.py's `AttentionMask.visible` (causal, sliding window, global keys and queries; documents
and ragged tails come from the caller's bounds), evaluated on tiles: `visible` masks one (query, key) tile;
`key_ranges` (per query block: forward, dQ) and `query_ranges` (per key block: dK/dV) split the blocks that can
hold a visible pair into ranges that need the element mask and ranges that are fully visible, so no fully masked
tile is ever loaded. Query i sits at key position Lk - Lq + i (bottom-right alignment, as in flash-attn).
To add a mask feature: the rule in model/masks.py, its tile form here, the flags in kernels/attention/common.py's
`Problem.common`, and the argument through kernels/attention/flash.py (custom ops) and decode.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def visible(qpos, kpos, q_ok, k_ok, window, num_global, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
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
def key_ranges(m0, len_q, len_k, window, num_global, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
def query_ranges(n0, len_q, len_k, window, num_global, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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

