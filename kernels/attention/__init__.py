"""Triton flash attention: `attention(q, k, v, ...)` with causal / sliding-window / global-token / packed masks.

Layout as flash-attn: q (B, L, Hq, D), k and v (B, L, Hkv, D), or packed (T, H, D) with `cu_seqlens`. The forward
and backward kernels are in `forward.py` and `backward.py` (FlashAttention-2 structure), their mask helpers in
`masks.py`, shared launch pieces in `common.py`, the custom ops and autograd in `flash.py`, the long-cache decoding
path in `decode.py` (flash-decoding), block-sparse prefill in `sparse.py` (its patterns in
`sparse_patterns.py`), the fp8 e4m3 KV cache format (quantisation, checks) in `fp8.py`, and the fp32
reference the tests use in `naive.py` (visibility from model/masks.py, the model's mask description).
"""
from __future__ import annotations

import weakref

import torch

from .decode import decode_attention
from .flash import flash_attn_fwd, flash_attn_fwd_kv8
from .fp8 import FP8_DTYPE, check_kv8, dequantize_kv, quantize_kv
from .naive import attention_flops, attention_naive, visibility_mask
from .sparse import sparse_attention, sparse_attention_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DECODE_MIN_KEYS = 1024  # the split-KV path pays off only once the keys outnumber what a few programs can stream
_DECODE_MAX_ROWS = 64  # Lq * Hq / Hkv rows per KV head handled by one decode program


def _check(q, k, v, cu_seqlens, window, num_global, scale, global_queries=False, max_seqlen=None, k_scale=None,
           v_scale=None):
    """Validate the inputs of `attention`; returns (packed, max_seqlen)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    packed = cu_seqlens is not None
    kv8 = k.dtype == FP8_DTYPE or v.dtype == FP8_DTYPE
    if not kv8:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dtype not in _DTYPES:
                raise TypeError(f"attention: {name} has dtype {x.dtype}; expected one of float16, bfloat16, float32 "
                                f"(or float8_e4m3fn k and v with k_scale, v_scale)")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"attention: k_scale / v_scale are for float8_e4m3fn k and v; got k, v in {k.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    want = 3 if packed else 4
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, L, H, D)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != want:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if kv8:
        check_kv8(q, k, v, k_scale, v_scale, packed)
    if q.shape[0] != k.shape[0]:
        what = "total tokens T" if packed else "batch size B"
        raise ValueError(f"attention: q and k differ in {what} ({q.shape[0]} vs {k.shape[0]})")
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"attention: q head_dim {d} != k/v head_dim {k.shape[-1]}")
    if not 1 <= d <= 128:
        raise ValueError(f"attention: head_dim {d} not supported (1..128; tuned for 64, 72, 80, 96, 128)")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"attention: query heads {hq} must be a multiple of key/value heads {hkv}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"attention: window must be None or an int >= 1, got {window!r}")
    if not isinstance(num_global, int) or num_global < 0:
        raise ValueError(f"attention: num_global must be an int >= 0, got {num_global!r}")
    if not isinstance(global_queries, bool):
        raise TypeError(f"attention: global_queries must be a bool, got {type(global_queries).__name__}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a Python number or None, got {type(scale).__name__}")
    if packed:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"attention: cu_seqlens must be a 1-D int32 tensor (num_docs + 1,), got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"attention: cu_seqlens on {cu_seqlens.device}, q on {q.device}")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
            raise ValueError(f"attention: max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
        if torch.compiler.is_compiling():
            # no host sync inside a compiled graph: trust the caller's bound, else the total (correct, slower grid)
            return packed, q.shape[0] if max_seqlen is None else max_seqlen
        longest = _max_seqlen(cu_seqlens, q.shape[0])
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"attention: max_seqlen={max_seqlen} but the longest document has {longest} tokens")
        return packed, longest
    return packed, 0


# id(cu_seqlens) -> (weakref to it, its version counter, T, max_seqlen): the checks and the longest document need
# the boundaries on the host (a device sync); a model passes the same cu_seqlens tensor to every layer, so the
# sync happens once per tensor. An in-place change of the tensor bumps its version and triggers a new check.
_MAX_SEQLEN_CACHE: dict[int, tuple] = {}


def _max_seqlen(cu_seqlens: torch.Tensor, total: int) -> int:
    """Validate packed boundaries (0 = cu[0] <= ... <= cu[-1] = T) and return the longest document length."""
    key = id(cu_seqlens)
    hit = _MAX_SEQLEN_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version and hit[2] == total:
        return hit[3]
    bounds = cu_seqlens.cpu()  # host sync: the grid needs the longest document
    lengths = bounds[1:] - bounds[:-1]
    if bounds[0] != 0 or bounds[-1] != total or (lengths < 0).any():
        raise ValueError(f"attention: cu_seqlens must rise from 0 to T={total}, got {bounds.tolist()}")
    max_seqlen = int(lengths.max())
    ref = weakref.ref(cu_seqlens, lambda _, key=key: _MAX_SEQLEN_CACHE.pop(key, None))
    _MAX_SEQLEN_CACHE[key] = (ref, cu_seqlens._version, total, max_seqlen)
    return max_seqlen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, window: int | None = None,
              num_global: int = 0, scale: float | None = None, return_lse: bool = False,
              global_queries: bool = False, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None, kv_length: torch.Tensor | None = None):
    """Exact softmax attention with fp32 accumulation, differentiable in q, k, v (except over an fp8 cache).

    Key j is visible to query i when (not causal or j <= i) and (window is None or |i - j| < window or
    j < num_global or (global_queries and i < num_global)), positions counted inside each document; with
    Lq != Lk query i sits at key position Lk - Lq + i (that position is the i above).

    Args:
        q: (B, Lq, Hq, D) or packed (T, Hq, D); fp16, bf16 or fp32; D <= 128 (64, 72, 80, 96, 128 tuned).
        k, v: (B, Lk, Hkv, D) or packed (T, Hkv, D), Hq % Hkv == 0 (GQA/MQA without repeating K/V). q's dtype,
            or float8_e4m3fn (an fp8 KV cache: (B, Lk, Hkv, D) layout only, with k_scale and v_scale, forward only).
        causal: causal mask (bottom-right aligned).
        cu_seqlens: (num_docs + 1,) int32 boundaries of the packed documents; no attention across documents.
        max_seqlen: the longest document of a packed call, if the caller knows it (as in flash-attn). Eager calls
            check it against cu_seqlens (one host sync per cu_seqlens tensor, cached); inside torch.compile it
            saves that sync, which a graph cannot hold (without it the grid is sized for T, correct but slower).
        window: sliding window size W (keys with |i - j| < W), or None.
        num_global: the first G keys of each sequence are visible to every query (with a window).
        global_queries: the queries at the first G positions also attend to every key (with a window). With
            causal=True it changes nothing: such a query's keys j <= i < G are global keys already.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the natural-log log-sum-exp, (B, Hq, Lq) or (Hq, T) fp32 (no gradient).
        k_scale, v_scale: (B, Lk, Hkv) fp32 scales of fp8 k and v (`quantize_kv`): key j of head h is
            k[:, j, h].float() * k_scale[:, j, h]. The kernels dequantise each tile as they load it.
        kv_length: (B,) int32 on q's device, or None: row b of a preallocated cache holds only its first
            kv_length[b] keys, and the queries are the last of them (decoding; read on the device, so a CUDA graph
            of the step replays at any length). Few queries only (the split-KV decode path), no gradient.
    Returns:
        o with q's shape and dtype (contiguous); and lse when return_lse.

    torch.compile traces this function: the kernels are the custom ops qwen3vl_lab::flash_attn_fwd / _bwd, one
    graph node each (no graph break), and qwen3vl_lab::flash_attn_fwd_kv8 over an fp8 cache; the split-KV decode
    path is eager-only.
    """
    packed, max_seqlen = _check(q, k, v, cu_seqlens, window, num_global, scale, global_queries, max_seqlen,
                                k_scale, v_scale)
    kv8 = k.dtype == FP8_DTYPE
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if window is not None and window >= max(q.shape[-3], k.shape[-3]) + 1 and num_global == 0:
        window = None  # covers everything: the plain path is cheaper
    # global queries change the mask only without causality, with a window, and when some query sits below G
    global_queries = (global_queries and not causal and window is not None and num_global > 0
                      and (packed or k.shape[1] - q.shape[1] < num_global))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.full(lse_shape, float("-inf"), device=q.device)
        return (o, lse) if return_lse else o
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                  for x in (q, k, v, k_scale, v_scale))
    if kv8 and needs_grad:
        raise RuntimeError("attention: fp8 K/V is forward only; call it under torch.no_grad() / inference_mode() "
                           "or detach q")
    group = q.shape[-2] // k.shape[-2]
    if kv_length is not None:
        if packed or needs_grad or q.shape[1] * group > 128:
            raise ValueError("attention: kv_length is for decoding (B, Lq, H, D) queries over a preallocated cache: "
                             "no cu_seqlens, no gradient, Lq * Hq / Hkv <= 128")
        o, lse = decode_attention(q, k, v, causal=causal, window=window, num_global=num_global, scale=scale,
                                  global_queries=global_queries, k_scale=k_scale, v_scale=v_scale,
                                  kv_length=kv_length)
    elif (not packed and not needs_grad and not torch.compiler.is_compiling() and k.shape[1] >= _DECODE_MIN_KEYS
            and q.shape[1] * group <= _DECODE_MAX_ROWS):
        o, lse = decode_attention(q, k, v, causal=causal, window=window, num_global=num_global, scale=scale,
                                  global_queries=global_queries, k_scale=k_scale, v_scale=v_scale)
    elif kv8:
        o, lse = flash_attn_fwd_kv8(q, k, v, k_scale, v_scale, causal, window or 0, num_global, scale,
                                    global_queries)
    else:
        o, lse = flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, window or 0, num_global, scale,
                                global_queries)
    return (o, lse) if return_lse else o


__all__ = ["attention", "attention_naive", "decode_attention", "visibility_mask", "attention_flops", "quantize_kv",
           "dequantize_kv", "sparse_attention", "sparse_attention_reference"]
