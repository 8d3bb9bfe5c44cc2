"""Flash attention as torch.library custom ops (forward and backward) with autograd: what `attention` calls.

The kernels: kernels/attention/forward.py and backward.py (FlashAttention-2 structure), their mask helpers in
masks.py, shared launch pieces in common.py. Masks (causal, sliding window, global prefix keys and optionally
global queries, packed documents through cu_seqlens, ragged tails) are flags of the launch (`common.Problem`).
Query i sits at key position Lk - Lq + i (bottom-right alignment, as in flash-attn).
"""
from __future__ import annotations

from typing import Optional

import torch

from .backward import flash_backward
from .common import Problem
from .forward import flash_forward


# The kernels as torch.library custom ops: eager calls dispatch straight to them, and torch.compile (inductor)
# keeps them as single opaque nodes of its graph (shapes from the fake implementations) instead of breaking the
# graph around a Python launcher it cannot trace. `window` 0 means no window.
@torch.library.custom_op("qwen3vl_lab::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                   max_seqlen: int, causal: bool, window: int, num_global: int, scale: float,
                   global_queries: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (o with q's shape and dtype, fp32 LSE (B, Hq, Lq) or packed (Hq, T))."""
    p = Problem(q, k, cu_seqlens, max_seqlen, causal, window or None, num_global, scale, global_queries)
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
    p = Problem(q, k, cu_seqlens, max_seqlen, causal, window or None, num_global, scale, global_queries)
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
    return (dq, dk, dv, None) + (None,) * len(ctx.args)  # nothing for cu_seqlens and the mask/scale arguments


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# Inference over an fp8 e4m3 KV cache (kernels/attention/fp8.py): the forward kernel with KV_FP8, no autograd (a
# quantised cache is not trained through); `attention` refuses fp8 inputs that require grad before calling it.
# Layout (B, L, H, D) only: chunked prefill, where the queries are the newest Lq tokens of Lk >= Lq keys.
@torch.library.custom_op("qwen3vl_lab::flash_attn_fwd_kv8", mutates_args=())
def flash_attn_fwd_kv8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor,
                       v_scale: torch.Tensor, causal: bool, window: int, num_global: int, scale: float,
                       global_queries: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over fp8 K/V (B, Lk, Hkv, D), fp32 scales (B, Lk, Hkv): (o with q's shape and dtype, LSE (B, Hq, Lq))."""
    p = Problem(q, k, None, 0, causal, window or None, num_global, scale, global_queries)
    return flash_forward(q, k, v, p, k_scale, v_scale)


@flash_attn_fwd_kv8.register_fake
def _(q, k, v, k_scale, v_scale, causal, window, num_global, scale, global_queries):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
