"""The attention backend interface: every attention call in the model goes through `attend`.

`torch` uses scaled_dot_product_attention (the default, works everywhere); `triton` uses our kernels
(`kernels.attention`, imported on first use so `model/` does not import Triton at import time).
Tensors are in flash-attn's layout: (B, L, H, D), or packed (T, H, D) with `cu_seqlens`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .autocast import to_autocast_dtype


def _sdpa(q, k, v, *, causal: bool, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> (B, Lq, Hq, D) through SDPA (GQA natively, else by repeating K/V)."""
    hq, hkv = q.shape[2], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hq != hkv and mask is None and (causal is False or q.shape[2] == k.shape[2]) and _SDPA_GQA:
        # flash / math backends take GQA directly: no repeated K/V copies saved for backward
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if causal and mask is None and q.shape[2] != k.shape[2]:
        # bottom-right aligned causal mask (queries are the last Lq positions of the keys)
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return out.transpose(1, 2)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # the argument exists (torch >= 2.5)
_MAX_DOC_CALLS = 16          # more documents than this: use one block-diagonal masked call ...
_MAX_MASKED_TOKENS = 16384   # ... if the (T, T) boolean mask stays small (<= 256 MB)


def _doc_mask(lengths: list[int], causal: bool, device) -> torch.Tensor:
    """(T, T) boolean keep-mask of a packed sequence: block-diagonal over documents, optionally causal."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask = mask.tril()
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "torch", causal: bool = False,
           cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
           mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention in flash layout.

    Args:
        q: (B, Lq, Hq, D) or packed (T, Hq, D) when cu_seqlens is given. k, v: (B, Lk, Hkv, D) or (T, Hkv, D).
        backend: "torch" (SDPA) or "triton" (kernels.attention).
        causal: causal mask (bottom-right aligned when Lq < Lk, i.e. decoding with a cache).
        cu_seqlens: (n_docs + 1,) int32 document boundaries of a packed sequence.
        max_seqlen: its longest document, if known (saves the Triton backend a host sync; needed under compile).
        mask: optional boolean (B, 1, Lq, Lk) keep-mask (padding); torch backend only.
        scale: softmax scale, default D ** -0.5.
    Returns: same layout as q.
    """
    if backend == "triton" and mask is None:
        from kernels.attention import attention  # Triton is imported only when asked for

        q, k, v = to_autocast_dtype(q, k, v)  # as SDPA under autocast (fp32 RoPE outputs meet bf16 v)
        return attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown attention backend {backend!r}")
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("cu_seqlens and an explicit mask cannot be combined")
        if cu_seqlens.numel() == 2:  # one document: a plain call (no host sync, so no graph break under compile)
            return _sdpa(q[None], k[None], v[None], causal=causal, mask=None, scale=scale)[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(set(lengths)) == 1:
            # equal documents (e.g. the frames of a video): one batched call, (n, len, H, D)
            n = len(lengths)
            out = _sdpa(q.view(n, lengths[0], *q.shape[1:]), k.view(n, lengths[0], *k.shape[1:]),
                        v.view(n, lengths[0], *v.shape[1:]), causal=causal, mask=None, scale=scale)
            return out.reshape(q.shape)
        T = q.shape[0]
        if len(lengths) > _MAX_DOC_CALLS and T <= _MAX_MASKED_TOKENS:
            # many short documents (packed training batches): one masked call beats hundreds of tiny launches
            return _sdpa(q[None], k[None], v[None], causal=False, mask=_doc_mask(lengths, causal, q.device),
                         scale=scale)[0]
        outs = [_sdpa(qi[None], ki[None], vi[None], causal=causal, mask=None, scale=scale)[0]
                for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return torch.cat(outs, dim=0)
    return _sdpa(q, k, v, causal=causal, mask=mask, scale=scale)
