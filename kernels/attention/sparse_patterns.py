"""Block-sparse attention patterns for prefill: which key blocks each (head, query block) of `sparse_attention`
(kernels/attention/sparse.py) visits. Plain PyTorch (no Triton): the estimators are a few matmuls and sorts.

Every estimator takes q (B, Lq, Hq, D) and k (B, Lk, Hkv, D) in the kernel's layout (GQA: a query head reads its
group's key head), returns a bool (B, Hq, ceil(Lq / bm), ceil(Lk / bn)) block mask, always keeps the first key
block(s) (attention sinks; Xiao et al., StreamingLLM, arXiv 2309.17453) and the blocks on the causal diagonal of
each query block, and drops blocks the causal rule hides (query i at key position Lk - Lq + i: a chunk of queries
after a KV cache is bottom-right aligned, as in the kernel).

- `xattention_mask`: XAttention (Xu et al., arXiv 2503.16428). Inside every stride x stride tile of the score
  matrix only the antidiagonal is scored (q rows in reverse order against k rows: a strided reshape and one
  matmul); the softmax of those scores over all key groups, summed per (query block, key block), is the block's
  importance; each query block keeps its highest blocks until their sum reaches `threshold` of the row's total.
  Published parameters: block 128, stride 8 or 16, threshold 0.9 (the paper's Tables; stride 16 for video).
- `vertical_slash_mask`: MInference's vertical-slash pattern (Jiang et al., arXiv 2407.02490, Sec. 3.2). The last
  `last_q` = 64 queries estimate the attention; the `vertical_size` key columns and the `slash_size` diagonals
  (key = query - offset) with the most probability mass are kept, the first 30 columns and the nearest 100
  diagonals always (MInference's settings). Published budgets: vertical 1000, slash 6096 per head (its searched
  LLaMA-3-8B-262K configuration); both may be given per query head. The kernel works on blocks, so a kept column
  keeps its key block for every query block and a kept diagonal the (at most two) key blocks it crosses in each
  query block: the block density is higher than MInference's column-and-block kernel would touch.
- `window_mask`: a static pattern for comparison: a sliding window of `window` keys plus the first `num_global`
  keys (global tokens; the A-shape of MInference, StreamingLLM). Defaults 4096 and 128 are a choice, not a
  published search.
`ESTIMATORS` maps the names of the model option `attn_sparsity` (model/sparsity.py) to these functions.
"""
from __future__ import annotations

import math

import torch

from .sparse import block_visibility

_SCORE_ELEMENTS = 1 << 28  # fp32 scores per XAttention chunk (1 GiB): the query chunk is sized from it


def _grid(lq: int, lk: int, block_size) -> tuple[int, int, int, int]:
    bm, bn = block_size
    return bm, bn, math.ceil(lq / bm), math.ceil(lk / bn)


def always_kept(lq: int, lk: int, block_size: tuple[int, int], *, causal: bool = True, sink_blocks: int = 1,
                device=None) -> torch.Tensor:
    """The blocks every pattern keeps: the first `sink_blocks` key blocks and each query block's diagonal blocks.

    Args:
        lq, lk: query and key lengths; block_size: (bm, bn).
    Returns:
        (ceil(lq / bm), ceil(lk / bn)) bool. Diagonal: the key blocks holding the key positions of the block's own
        queries (Lk - Lq + i); without causality the same blocks (the local neighbourhood).
    """
    bm, bn, nm, nn = _grid(lq, lk, block_size)
    m = torch.arange(nm, device=device)
    n = torch.arange(nn, device=device)
    q_first = m * bm + (lk - lq)
    q_last = torch.clamp(m * bm + bm, max=lq) - 1 + (lk - lq)
    k_first = n * bn
    k_last = torch.clamp(k_first + bn, max=lk) - 1
    diag = (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None])
    return diag | (n < sink_blocks)[None, :]


def _finish(sel: torch.Tensor, lq: int, lk: int, block_size, causal: bool, sink_blocks: int) -> torch.Tensor:
    """Add the always-kept blocks and drop the blocks the causal rule hides."""
    keep = always_kept(lq, lk, block_size, causal=causal, sink_blocks=sink_blocks, device=sel.device)
    any_vis, _ = block_visibility(lq, lk, block_size[0], block_size[1], causal, sel.device)
    return (sel | keep) & any_vis


def block_density(block_mask: torch.Tensor, lq: int, lk: int, block_size: tuple[int, int], *,
                  causal: bool = True) -> float:
    """Fraction of the blocks dense (causal) attention computes that `block_mask` keeps: the work ratio."""
    any_vis, _ = block_visibility(lq, lk, block_size[0], block_size[1], causal, block_mask.device)
    total = any_vis.sum() * block_mask.shape[0] * block_mask.shape[1]
    return float((block_mask & any_vis).sum() / total)


def _check(q, k, block_size, what):
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: q must be (B, Lq, Hq, D) and k (B, Lk, Hkv, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: query heads {q.shape[2]} must be a multiple of key heads {k.shape[2]}")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and b >= 1 for b in block_size)):
        raise ValueError(f"{what}: block_size must be (bm, bn) positive ints, got {block_size!r}")


def _select_threshold(scores: torch.Tensor, forced: torch.Tensor, threshold: float) -> torch.Tensor:
    """XAttention's selection per row: the forced blocks, then the others in descending order of score while the
    kept mass before each is below threshold x the row total. scores (..., nN) >= 0, forced (..., nN) bool."""
    total = scores.sum(-1, keepdim=True)
    forced_sum = (scores * forced).sum(-1, keepdim=True)
    rest, order = torch.sort(scores.masked_fill(forced, -1.0), dim=-1, descending=True)  # forced ones last
    before = forced_sum + rest.clamp(min=0).cumsum(-1) - rest.clamp(min=0)  # mass kept before each candidate
    take = (before < threshold * total) & (rest >= 0)
    return forced | torch.zeros_like(forced).scatter(-1, order, take)


def xattention_mask(q: torch.Tensor, k: torch.Tensor, block_size: tuple[int, int] = (128, 128), *,
                    stride: int = 16, threshold: float = 0.9, causal: bool = True, sink_blocks: int = 1,
                    scale: float | None = None, chunk_q: int | None = None) -> torch.Tensor:
    """XAttention block selection by antidiagonal scoring (see the module docstring).

    Args:
        q: (B, Lq, Hq, D); k: (B, Lk, Hkv, D).
        block_size: (bm, bn), both multiples of `stride`.
        stride: S, the antidiagonal tile (each S x S tile is scored by its S antidiagonal products, averaged).
        threshold: cumulative share of each query block's estimated probability mass to keep, in (0, 1].
        causal: causal rule, bottom-right aligned.
        sink_blocks: first key blocks always kept. scale: softmax scale, default D ** -0.5.
        chunk_q: query tokens estimated per step (memory); default sized for ~1 GiB of fp32 scores.
    Returns:
        (B, Hq, ceil(Lq / bm), ceil(Lk / bn)) bool.
    """
    _check(q, k, block_size, "xattention_mask")
    bm, bn, nm, nn = _grid(q.shape[1], k.shape[1], block_size)
    if not isinstance(stride, int) or stride < 1 or bm % stride or bn % stride:
        raise ValueError(f"xattention_mask: stride {stride!r} must be an int dividing both block sizes {block_size}")
    if not 0 < threshold <= 1:
        raise ValueError(f"xattention_mask: threshold must be in (0, 1], got {threshold!r}")
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    S, g = stride, hq // hkv
    scale = d ** -0.5 if scale is None else scale
    # key groups: row h of kr is k[hS], k[hS+1], ..., k[hS+S-1] side by side; query group g of qr is q[gS+S-1],
    # ..., q[gS] (reversed), so qr[g] . kr[h] = sum_j q[gS+S-1-j] . k[hS+j], the antidiagonal of tile (g, h)
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, nn * bn - lk))
    kr = kp.reshape(B, nn * bn // S, S, hkv, d).permute(0, 3, 1, 2, 4).reshape(B, hkv, nn * bn // S, S * d)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, nm * bm - lq))
    qr = qp.reshape(B, nm * bm // S, S, hkv, g, d).flip(2)  # (B, Gq, S reversed, Hkv, group, D)
    qr = qr.permute(0, 3, 4, 1, 2, 5).reshape(B, hkv, g, nm * bm // S, S * d)
    kg_first = torch.arange(nn * bn // S, device=q.device) * S  # first key of each key group
    key_ok = kg_first < lk
    per_q = max(1, _SCORE_ELEMENTS // max(1, B * hq * (nn * bn // S)))
    chunk_q = chunk_q or max(bm, per_q * S // bm * bm)
    rows_per_block, cols_per_block = bm // S, bn // S
    out = torch.empty(B, hq, nm, nn, dtype=torch.bool, device=q.device)
    forced_all = always_kept(lq, lk, block_size, causal=causal, sink_blocks=sink_blocks, device=q.device)
    any_vis, _ = block_visibility(lq, lk, bm, bn, causal, q.device)
    for m0 in range(0, nm, max(1, chunk_q // bm)):
        m1 = min(nm, m0 + max(1, chunk_q // bm))
        g0, g1 = m0 * rows_per_block, m1 * rows_per_block
        n_end = nn  # key blocks this chunk can see (causal: up to its last query), so the estimate is ~1/(2S) of
        if causal:  # dense attention's FLOPs rather than 1/S
            n_end = max(1, min(nn, (min(m1 * bm, lq) - 1 + lk - lq) // bn + 1))
        c_end = n_end * cols_per_block
        # scores in the inputs' dtype (fp32 accumulation on the GPU), softmax in fp32
        s = torch.einsum("bhgqe,bhke->bhgqk", qr[:, :, :, g0:g1], kr[:, :, :c_end]).float() * (scale / S)
        vis = key_ok[None, :c_end].expand(g1 - g0, -1)
        if causal:  # a key group is visible when its first key is at or before the group's last query
            q_last = (torch.arange(g0, g1, device=q.device) * S + S - 1).clamp(max=lq - 1) + (lk - lq)
            vis = vis & (kg_first[None, :c_end] <= q_last[:, None])
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # query groups that see nothing: all zero
        qg_real = (torch.arange(g0, g1, device=q.device) * S < lq)[:, None]  # padded query groups count nothing
        p = p * qg_real
        # (B, Hkv, group, rows, key groups) -> block sums (B, Hq, query blocks, key blocks)
        blk = p.reshape(B, hkv, g, m1 - m0, rows_per_block, n_end, cols_per_block).sum((4, 6))
        blk = torch.nn.functional.pad(blk.reshape(B, hq, m1 - m0, n_end), (0, nn - n_end))
        forced = (forced_all[m0:m1] & any_vis[m0:m1]).expand_as(blk)
        out[:, :, m0:m1] = _select_threshold(blk, forced, threshold)
    return _finish(out, lq, lk, block_size, causal, sink_blocks)


def _per_head(x, hq: int, what: str, device) -> torch.Tensor:
    """An int budget, or one per query head -> (Hq,) long."""
    t = torch.as_tensor(x, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(hq)
    if t.numel() != hq or (t < 0).any():
        raise ValueError(f"vertical_slash_mask: {what} must be an int >= 0 or {hq} of them (one per query head), "
                         f"got {x!r}")
    return t


def vertical_slash_mask(q: torch.Tensor, k: torch.Tensor, block_size: tuple[int, int] = (128, 128), *,
                        last_q: int = 64, vertical_size=1000, slash_size=6096, causal: bool = True,
                        sink_blocks: int = 1, init_columns: int = 30, local_diagonals: int = 100,
                        scale: float | None = None) -> torch.Tensor:
    """MInference vertical-slash block selection (see the module docstring).

    Args:
        q: (B, Lq, Hq, D); k: (B, Lk, Hkv, D).
        block_size: (b, b): equal query and key blocks (a diagonal then covers the same block diagonals in every
            query block).
        last_q: queries (the last ones) that estimate the pattern.
        vertical_size, slash_size: key columns and diagonals kept, an int or one per query head.
        init_columns, local_diagonals: columns (first keys) and diagonals (nearest) always kept.
        causal, sink_blocks, scale: as `xattention_mask`.
    Returns:
        (B, Hq, ceil(Lq / b), ceil(Lk / b)) bool.
    """
    _check(q, k, block_size, "vertical_slash_mask")
    bm, bn, nm, nn = _grid(q.shape[1], k.shape[1], block_size)
    if bm != bn:
        raise ValueError(f"vertical_slash_mask: block_size must be square (b, b), got {block_size}")
    B, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    vs = _per_head(vertical_size, hq, "vertical_size", q.device)
    ss = _per_head(slash_size, hq, "slash_size", q.device)
    scale = d ** -0.5 if scale is None else scale
    n_est = min(last_q, lq)
    # (B, Hkv, group, n, Lk) scores in the inputs' dtype (no repeated or upcast copy of a 1M-token K), then fp32
    qe = q[:, lq - n_est:].reshape(B, n_est, hkv, hq // hkv, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qe, k).float().reshape(B, hq, n_est, lk) * scale
    qpos = torch.arange(lq - n_est, lq, device=q.device) + (lk - lq)  # key positions of the estimating queries
    kpos = torch.arange(lk, device=q.device)
    if causal:
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    vertical = p.sum(2)  # (B, Hq, Lk): mass per key column
    vertical[..., :init_columns] = float("inf")
    # slash index o + Lk, o = query position - key position (>= 0 under causality), in [1, 2Lk): row i's keys
    # j = Lk-1 .. 0 land on qpos_i + 1 .. qpos_i + Lk
    slash = torch.zeros(B, hq, 2 * lk, device=q.device)
    for i in range(n_est):
        a0 = int(qpos[i]) + 1
        slash[..., a0:a0 + lk] += p[:, :, i].flip(-1)
    near = (torch.arange(2 * lk, device=q.device) - lk).abs() < local_diagonals
    slash[..., near] = float("inf")
    # the top-v columns and top-s diagonals of each head (budgets differ per head: rank against the budget)
    v_rank = torch.argsort(torch.argsort(vertical, dim=-1, descending=True), dim=-1)
    s_rank = torch.argsort(torch.argsort(slash, dim=-1, descending=True), dim=-1)
    v_keep = (v_rank < vs[None, :, None]) & (vertical > 0)
    s_keep = (s_rank < ss[None, :, None]) & (slash > 0)
    # columns -> key blocks (every query block); diagonals -> block diagonals n - m: for b x b blocks and alignment
    # A = Lk - Lq, offset o crosses key blocks m + floor((A - o) / b) and m + floor((A - o + b - 1) / b)
    col_blocks = torch.zeros(B, hq, nn, dtype=torch.int32, device=q.device).scatter_add_(
        -1, (kpos // bn).expand(B, hq, -1), v_keep.int()) > 0
    o = torch.arange(2 * lk, device=q.device) - lk
    a = lk - lq
    d_lo = torch.div(a - o, bn, rounding_mode="floor") + nm  # shifted block diagonal, in [.., nm + nn)
    d_hi = torch.div(a - o + bn - 1, bn, rounding_mode="floor") + nm
    n_diag = nm + nn + 1
    diag = torch.zeros(B, hq, n_diag, dtype=torch.int32, device=q.device)
    for dd in (d_lo, d_hi):
        ok = (dd >= 0) & (dd < n_diag)
        diag.scatter_add_(-1, dd.clamp(0, n_diag - 1).expand(B, hq, -1), (s_keep & ok).int())
    mi = torch.arange(nm, device=q.device)
    ni = torch.arange(nn, device=q.device)
    sel = diag[..., (ni[None, :] - mi[:, None] + nm)] > 0  # (B, Hq, nm, nn)
    # the ragged last query block: its real rows end at key position Lk - 1, not at the block's end
    if lq % bm:
        lo = torch.div((nm - 1) * bm + a - o, bn, rounding_mode="floor")
        hi = torch.div(lk - 1 - o, bn, rounding_mode="floor")
        last = torch.zeros(B, hq, nn + 1, dtype=torch.int32, device=q.device)
        for nb in (lo, hi):
            ok = (nb >= 0) & (nb < nn) & (lk - 1 - o >= 0)
            last.scatter_add_(-1, torch.where(ok, nb, nn).expand(B, hq, -1), (s_keep & ok).int())
        sel[:, :, nm - 1] = last[..., :nn] > 0
    sel = sel | col_blocks[:, :, None, :]
    return _finish(sel, lq, lk, block_size, causal, sink_blocks)


def window_mask(q: torch.Tensor, k: torch.Tensor, block_size: tuple[int, int] = (128, 128), *,
                window: int = 4096, num_global: int = 128, causal: bool = True, sink_blocks: int = 1) -> torch.Tensor:
    """Static sliding-window + global-token blocks: every block holding a pair with |p - j| < window or
    j < num_global (model/masks.py's rule), plus the sinks and diagonal. Uses only the shapes of q and k.

    Returns:
        (B, Hq, ceil(Lq / bm), ceil(Lk / bn)) bool (one pattern, expanded over batch and heads).
    """
    _check(q, k, block_size, "window_mask")
    if not isinstance(window, int) or window < 1 or not isinstance(num_global, int) or num_global < 0:
        raise ValueError(f"window_mask: window must be an int >= 1 and num_global an int >= 0, got {window!r}, "
                         f"{num_global!r}")
    bm, bn, nm, nn = _grid(q.shape[1], k.shape[1], block_size)
    B, lq, hq, _ = q.shape
    lk = k.shape[1]
    m = torch.arange(nm, device=q.device)
    n = torch.arange(nn, device=q.device)
    q_first = (m * bm + (lk - lq))[:, None]
    q_last = (torch.clamp(m * bm + bm, max=lq) - 1 + (lk - lq))[:, None]
    k_first = (n * bn)[None, :]
    k_last = (torch.clamp(n * bn + bn, max=lk) - 1)[None, :]
    near = (k_last > q_first - window) & (k_first < q_last + window)  # some pair with |p - j| < window
    sel = near | (k_first < num_global)
    return _finish(sel, lq, lk, block_size, causal, sink_blocks).expand(B, hq, nm, nn)


ESTIMATORS = {"xattention": xattention_mask, "vertical_slash": vertical_slash_mask, "window": window_mask}

__all__ = ["xattention_mask", "vertical_slash_mask", "window_mask", "always_kept", "block_density", "ESTIMATORS"]
