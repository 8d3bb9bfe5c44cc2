"""Plain-PyTorch fp32 reference for `kernels.attention.attention` (the oracle the kernel tests compare against).

Materialises the full (Lq, Lk) score matrix per sequence, so it is only for small shapes. Visibility is model/masks.py's
`AttentionMask` (the one definition the model's backends use too; flash-attn conventions, bottom-right aligned when
Lq != Lk): query i sits at key position p = Lk - Lq + i, and key j is visible when
(not causal or j <= p) and (window is None or |p - j| < window or j < num_global
                            or (global_queries and p < num_global)),
positions counted inside each document of a packed row. A query that sees no key returns output 0 and LSE -inf.
"""
from __future__ import annotations

import torch

from model.masks import AttentionMask  # plain torch: no Triton, no model weights

from .fp8 import dequantize_kv


def visibility_mask(lq: int, lk: int, *, causal: bool = False, window: int | None = None, num_global: int = 0,
                    global_queries: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (lq, lk) mask, True where query i may attend to key j (`AttentionMask.dense`).

    Args:
        lq, lk: query and key lengths of one sequence (queries bottom-right aligned to keys).
        causal, window, num_global, global_queries: the mask options of `attention`.
    """
    return AttentionMask(causal=causal, window=window, num_global=num_global,
                         global_queries=global_queries).dense(lq, lk, device)


def _attend_one(q, k, v, vis, scale):
    """fp32 attention of one sequence: q (Lq, Hq, D), k/v (Lk, Hkv, D), vis (Lq, Lk) -> o (Lq, Hq, D), lse (Hq, Lq)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (Lk, Hq, D): the reference may repeat K/V; the kernels do not
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale  # (Hq, Lq, Lk)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Lq); -inf for rows that see nothing
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # rows with no visible key: all zeros
    o = torch.einsum("hqk,khd->qhd", p, v)
    return o, lse


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    cu_seqlens: torch.Tensor | None = None, window: int | None = None, num_global: int = 0,
                    global_queries: bool = False, scale: float | None = None, return_lse: bool = False,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
    """Reference attention in fp32 (differentiable through autograd), same contract as `attention`.

    Args:
        q: (B, Lq, Hq, D) or packed (T, Hq, D) with cu_seqlens.
        k, v: (B, Lk, Hkv, D) or packed (T, Hkv, D); Hq % Hkv == 0. float8_e4m3fn with k_scale, v_scale: the
            reference runs on the dequantised values (`dequantize_kv`, fp32).
        cu_seqlens: (num_docs + 1,) int32 document boundaries of the packed layout.
        causal, window, num_global, global_queries: see the module docstring.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the natural-log LSE, (B, Hq, Lq) or (Hq, T), fp32.
        k_scale, v_scale: (B, Lk, Hkv) fp32 scales of fp8 k, v (kernels/attention/fp8.py), or None.
    Returns:
        o in q's dtype and layout (and lse in fp32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf = q.float()
    kf = k.float() if k_scale is None else dequantize_kv(k, k_scale)  # fp32 values x8 * scale, as the kernels use them
    vf = v.float() if v_scale is None else dequantize_kv(v, v_scale)
    mask = AttentionMask(causal=causal, window=window, num_global=num_global, global_queries=global_queries)
    if cu_seqlens is None:
        vis = mask.dense(q.shape[1], k.shape[1], q.device)
        outs = [_attend_one(qf[b], kf[b], vf[b], vis, scale) for b in range(q.shape[0])]
        o = torch.stack([x[0] for x in outs])  # (B, Lq, Hq, D)
        lse = torch.stack([x[1] for x in outs])  # (B, Hq, Lq)
    else:
        bounds = cu_seqlens.tolist()
        os_, lses = [], []
        for s, e in zip(bounds[:-1], bounds[1:]):  # one document at a time: the same mask inside each
            o_d, lse_d = _attend_one(qf[s:e], kf[s:e], vf[s:e], mask.dense(e - s, e - s, q.device), scale)
            os_.append(o_d)
            lses.append(lse_d)
        o = torch.cat(os_, dim=0)  # (T, Hq, D)
        lse = torch.cat(lses, dim=1)  # (Hq, T)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def attention_flops(lq: int, lk: int, heads: int, head_dim: int, *, causal: bool = False,
                    window: int | None = None) -> float:
    """Forward FLOPs by the standard count (FlashAttention papers): 4*H*N^2*D, halved for causal, 4*H*D*(N*W - W^2/2) for a
    causal sliding window W. Backward is 2.5x this.

    Args:
        lq, lk: query and key lengths of one sequence; heads: query heads; head_dim: D.
    """
    if window is not None and window < lk:
        return 4.0 * heads * head_dim * (lq * window - window * window / 2)
    f = 4.0 * heads * lq * lk * head_dim
    return f / 2 if causal else f


__all__ = ["attention_naive", "visibility_mask", "attention_flops"]
