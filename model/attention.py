"""The attention backend interface: every attention call in the model goes through `attend`.

The mask is an `AttentionMask` (model/masks.py); the backend renders it:
- `torch`: scaled_dot_product_attention (the default, works everywhere): plain causal calls use SDPA's own mask
  (GQA natively), packed documents take the fast paths below, anything else a dense boolean mask;
- `triton`: our kernels (`kernels.attention`, imported on first use so `model/` does not import Triton at import
  time): causal, window, global keys/queries, documents; no key padding. On a GPU, non-causal calls over one
  document or equal-length documents (the vision tower's frames) go to SDPA, which is faster there
  (`_sdpa_is_faster`);
- `flex`: FlexAttention (torch.nn.attention.flex_attention) with the mask's `mask_mod`: every mask, for ablations of
  masks our kernels lack (on CPU: eager, forward only, small sizes; compile it for speed).
A mask a backend cannot run raises NotImplementedError naming the backend and the mask feature.
A mask with `sparsity` (block-sparse prefill, model/sparsity.py) runs the pattern's estimator and the block-sparse
kernel on prefill chunks of at least `min_queries` queries, whatever the backend; shorter calls stay dense.
Tensors are in flash-attn's layout: (B, L, H, D), or packed (T, H, D) with the mask's `cu_seqlens`.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .autocast import to_autocast_dtype
from .masks import AttentionMask

BACKENDS = ("torch", "triton", "flex")
# mask features (AttentionMask.features) each backend lacks
UNSUPPORTED = {"torch": (), "triton": ("key padding",), "flex": ("key length",)}

_MAX_DOC_CALLS = 16          # more documents than this: use one block-diagonal masked call ...
_MAX_MASKED_TOKENS = 16384   # ... if the (T, T) boolean mask stays small (<= 256 MB)


def unsupported(backend: str, mask: AttentionMask) -> list[str]:
    """The features of `mask` that `backend` cannot run (empty: it can)."""
    return [f for f in mask.features() if f in UNSUPPORTED[backend]]


def supports(backend: str, mask: AttentionMask) -> bool:
    """True when `backend` can run `mask`."""
    return not unsupported(backend, mask)


def _sdpa_dense(q, k, v, keep: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), keep broadcastable to (B, Hq, Lq, Lk) bool -> (B, Lq, Hq, D)."""
    hq, hkv = q.shape[2], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hq != hkv:  # with an explicit mask SDPA would not take GQA on every backend: repeat K/V
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale).transpose(1, 2)


@functools.cache
def _lower_right_bias():
    """torch's lower-right causal bias for SDPA, and whether it takes enable_gqa (recent torch; older ones need
    repeated K/V). Imported on first use: torch.nn.attention.bias pulls in torch._dynamo (~900 modules)."""
    from torch.nn.attention.bias import CausalBias, causal_lower_right

    return causal_lower_right, "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters


def _sdpa(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), a mask without documents -> (B, Lq, Hq, D) through SDPA."""
    lq, lk = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    if mask.window is None and mask.key_padding is None and mask.key_length is None:
        if not mask.causal or lq == lk or lq == 1:
            # SDPA's own (top-left aligned) causal mask is ours when Lq == Lk, and one bottom-right aligned query
            # sees every key; flash / math backends take GQA directly, so no repeated K/V copies are saved for
            # backward and no mask over a long cache is built while decoding
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=mask.causal and lq == lk, scale=scale, enable_gqa=gqa)
            return out.transpose(1, 2)
        if lq < lk:
            # a chunk of queries after a cache (chunked prefill): SDPA's lower-right causal bias, never an (Lq, Lk)
            # mask on the GPU (the memory-efficient kernel takes the alignment natively)
            causal_lower_right, bias_gqa = _lower_right_bias()
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kw = {"enable_gqa": gqa} if bias_gqa else {}
            if gqa and not bias_gqa:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), scale=scale, **kw)
            return out.transpose(1, 2)
    return _sdpa_dense(q, k, v, mask.dense(lq, lk, q.device), scale)


def _torch(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    """The SDPA backend; packed documents as one call, a batch of equal documents, one masked call or a loop."""
    if mask.cu_seqlens is None:
        return _sdpa(q, k, v, mask, scale)
    cu_seqlens, one = mask.cu_seqlens, mask.within_document()
    if cu_seqlens.numel() == 2:  # one document: a plain call (no host sync, so no graph break under compile)
        return _sdpa(q[None], k[None], v[None], one, scale)[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) == 1:
        # equal documents (e.g. the frames of a video): one batched call, (n, len, H, D)
        n = len(lengths)
        out = _sdpa(q.view(n, lengths[0], *q.shape[1:]), k.view(n, lengths[0], *k.shape[1:]),
                    v.view(n, lengths[0], *v.shape[1:]), one, scale)
        return out.reshape(q.shape)
    T = q.shape[0]
    if len(lengths) > _MAX_DOC_CALLS and T <= _MAX_MASKED_TOKENS:
        # many short documents (packed training batches): one masked call beats hundreds of tiny launches
        return _sdpa_dense(q[None], k[None], v[None], mask.dense(T, T, q.device), scale)[0]
    outs = [_sdpa(qi[None], ki[None], vi[None], one, scale)[0]
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outs, dim=0)


def _flex(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    """The FlexAttention backend: the mask's mask_mod as a block mask (built once per mask object and shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    packed = mask.cu_seqlens is not None
    if packed:  # (T, H, D) -> one row (1, T, H, D)
        q, k, v = q[None], k[None], v[None]
    q, k, v = to_autocast_dtype(q, k, v)  # flex_attention takes one dtype (fp32 RoPE outputs meet bf16 v)
    lq, lk = q.shape[1], k.shape[1]
    key = (lq, lk, q.device)
    block_mask = mask._block_masks.get(key)
    if block_mask is None:
        batch = None if mask.key_padding is None else q.shape[0]  # only padding depends on the batch row
        block_mask = create_block_mask(mask.mask_mod(lq, lk), batch, None, lq, lk, device=q.device)
        mask._block_masks[key] = block_mask
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
                         enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return out[0] if packed else out


def _sdpa_is_faster(q: torch.Tensor, mask: AttentionMask) -> bool:
    """The vision tower's calls, where SDPA (cuDNN / flash) beats our kernel on a GPU: non-causal attention over one
    document or over packed documents of one length (the frames of a video, same-size images), known without a
    host sync (n documents x max_seqlen == T). Measured on an H100 (docs/benchmarks.md, "Attention kernels"):
    16 x 784 d64 / d72 and 1 x 12,544 d72, SDPA 1.0-1.4x faster forward and 1.5-2.3x backward. Unequal documents
    (mixed image sizes) stay on the varlen kernel, which SDPA can only run as a loop or a dense mask."""
    if not q.is_cuda or mask.features() not in ((), ("documents",)):
        return False
    if mask.cu_seqlens is None:
        return True
    n = mask.cu_seqlens.numel() - 1
    return mask.max_seqlen is not None and n * mask.max_seqlen == q.shape[0]


def _triton(q, k, v, mask: AttentionMask, scale: float | None, kv_scales=None) -> torch.Tensor:
    from kernels.attention import attention  # Triton is imported only when asked for

    if kv_scales is None and _sdpa_is_faster(q, mask):
        q, k, v = to_autocast_dtype(q, k, v)
        if mask.cu_seqlens is None:
            return _sdpa(q, k, v, mask, scale)
        n = mask.cu_seqlens.numel() - 1
        out = _sdpa(*(t.view(n, mask.max_seqlen, *t.shape[1:]) for t in (q, k, v)), mask.within_document(), scale)
        return out.reshape(q.shape)
    if kv_scales is not None:  # FP8 cache: the kernels dequantise tile by tile (no bf16 copy of the cache)
        return attention(q, k, v, **mask.kernel_args(), scale=scale, k_scale=kv_scales[0], v_scale=kv_scales[1])
    q, k, v = to_autocast_dtype(q, k, v)  # as SDPA under autocast (fp32 RoPE outputs meet bf16 v)
    return attention(q, k, v, **mask.kernel_args(), scale=scale)


_RUN = {"torch": _torch, "triton": _triton, "flex": _flex}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None, *,
           backend: str = "torch", scale: float | None = None, kv_scales=None) -> torch.Tensor:
    """Attention in flash layout.

    Args:
        q: (B, Lq, Hq, D), or packed (T, Hq, D) when the mask has cu_seqlens. k, v: (B, Lk, Hkv, D) or (T, Hkv, D).
        mask: which keys each query sees (model/masks.py); None: every key. Queries are bottom-right aligned when
            Lq < Lk (decoding with a cache).
        backend: "torch" (SDPA), "triton" (kernels.attention) or "flex" (FlexAttention).
        scale: softmax scale, default D ** -0.5.
        kv_scales: (k_scale, v_scale), each (B, Lk, Hkv) fp32, when k and v are float8_e4m3fn (an FP8 KV cache,
            model/generation.py's `quantize_kv`): the Triton backend dequantises inside its kernels, the others
            dequantise to q's dtype first.
    Returns: same layout as q.
    """
    if backend not in _RUN:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    mask = AttentionMask() if mask is None else mask
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"attend: mask must be a model.masks.AttentionMask or None, got {type(mask).__name__}")
    missing = unsupported(backend, mask)
    if missing:
        raise NotImplementedError(f"attention backend {backend!r} cannot run a mask with {', '.join(missing)}; "
                                  f"use backend 'torch' or 'flex' for it")
    if mask.sparsity is not None:
        from .sparsity import applies, sparse_attend

        if applies(mask.sparsity, q):
            if mask.features() != ("causal",):
                raise NotImplementedError(f"block-sparse prefill runs plain causal (B, L, H, D) calls only; the mask "
                                          f"has {', '.join(mask.features())}")
            if kv_scales is not None:  # FP8 cache: dequantised to q's dtype (the sparse kernel reads 16-bit K/V)
                k = (k.float() * kv_scales[0][..., None]).to(q.dtype)
                v = (v.float() * kv_scales[1][..., None]).to(q.dtype)
            q, k, v = to_autocast_dtype(q, k, v)
            return sparse_attend(q, k, v, mask.sparsity, scale)
    if kv_scales is not None:
        if backend == "triton":
            return _triton(q, k, v, mask, scale, kv_scales)
        k = (k.float() * kv_scales[0][..., None]).to(q.dtype)
        v = (v.float() * kv_scales[1][..., None]).to(q.dtype)
    return _RUN[backend](q, k, v, mask, scale)
