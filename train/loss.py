"""Losses: chunked cross-entropy from hidden states (never materialises fp32 logits for the whole batch), MoE aux.

The language-model loss only needs logits at positions whose label is not -100, so the hidden states of those
positions are gathered first (for SFT / OCR this is the answer tokens only), then `ChunkedLinearCrossEntropy`
computes `h @ W.T` chunk by chunk in fp32, keeps only the per-token loss and log-sum-exp, and recomputes each
chunk's logits in backward (the Liger-Kernel / Cut-Cross-Entropy idea, in plain PyTorch). Peak extra memory is
one (chunk, vocab) fp32 block instead of (tokens, vocab).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.config import IGNORE_INDEX


def _lse_and_loss(logits: torch.Tensor, labels: torch.Tensor):
    """(c, V) logits (any float dtype) -> fp32 (log-sum-exp, loss) per row."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return lse, lse - x.gather(1, labels[:, None]).squeeze(1)


def _dlogits(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(softmax(logits) - onehot(labels)) * grad[:, None], computed in fp32, returned in the logits' dtype."""
    p = (logits.float() - lse[:, None]).exp()
    onehot = torch.arange(p.shape[1], device=p.device)[None, :] == labels[:, None]
    return ((p - onehot.float()) * grad[:, None]).to(logits.dtype)


@functools.cache
def _compiled_stages():
    return torch.compile(_lse_and_loss, dynamic=False), torch.compile(_dlogits, dynamic=False)


def _fused_kernels(hidden: torch.Tensor):
    """On CUDA: the two elementwise stages above compiled (inductor fuses each into one pass over the logits;
    eager PyTorch makes ~6 passes and an fp32 copy of every (chunk, vocab) block). None elsewhere: CPU runs stay
    free of a C++ toolchain requirement, and use the equivalent eager code."""
    return _compiled_stages() if hidden.is_cuda else None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `softmax(h @ W.T)`; logits exist one chunk at a time, in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        """Args: hidden (N, D) any float dtype, weight (V, D), labels (N,) long in [0, V), chunk_size int.

        Returns: (N,) fp32 per-token losses.
        """
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        fused = _fused_kernels(hidden)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            if fused:  # one pass over the (c, V) logits in their matmul dtype, no fp32 copy
                lse[s:e], losses[s:e] = fused[0](hidden[s:e] @ weight.t(), labels[s:e])
                continue
            # fp32 logits for this chunk only (matches an fp32 softmax over autocast bf16 logits up to rounding)
            logits = (hidden[s:e] @ weight.t()).float()                     # (c, V)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            losses[s:e] = lse[s:e] - logits.gather(1, labels[s:e, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, c = hidden.shape[0], ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        fused = _fused_kernels(hidden)
        for s in range(0, n, c):
            e = min(n, s + c)
            if fused:  # softmax - onehot, times the upstream grad, in one pass (fp32 math, weight-dtype result)
                g = fused[1](hidden[s:e] @ weight.t(), lse[s:e], labels[s:e], grad_losses[s:e].float())
            else:
                g = (hidden[s:e] @ weight.t()).float()                      # recomputed logits (c, V)
                g.sub_(lse[s:e, None]).exp_()                               # softmax, in place
                g[torch.arange(e - s, device=g.device), labels[s:e]] -= 1.0
                g.mul_(grad_losses[s:e, None].float())                      # dL/dlogits (c, V)
                g = g.to(weight.dtype)  # matmuls in the input dtype (bf16 on GPU), fp32 accumulation inside
            if need_h:
                grad_h[s:e] = (g @ weight).to(hidden.dtype)
            if need_w:
                part = (g.t() @ hidden[s:e]).float()                        # (V, D)
                grad_w = part if grad_w is None else grad_w.add_(part)
        if need_w:
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else torch.zeros_like(weight)
        return grad_h, grad_w, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Per-token CE losses at the positions where `labels != -100` (next-token shift NOT applied here).

    Args:
        hidden: (..., D) hidden states (after the final norm), any float dtype.
        weight: (V, D) lm_head weight.
        labels: (...) long target ids, -100 = ignore.
        chunk_size: tokens per lm_head chunk.
    Returns:
        (N,) fp32 losses for the N kept positions, in flattened order.
    """
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        # range(0, n, c) with c <= 0 would skip every chunk and return the uninitialised loss buffer
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    if y.numel() and bool(((y < 0) | (y >= weight.shape[0])).any()):  # one host sync
        raise ValueError(f"labels outside [0, {weight.shape[0]}): min {int(y.min())}, max {int(y.max())}")
    if h.is_cuda and torch.is_autocast_enabled("cuda"):
        h = h.to(torch.get_autocast_dtype("cuda"))
        w = weight.to(h.dtype)
    else:
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    return ChunkedLinearCrossEntropy.apply(h, w, y, int(chunk_size))


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain full-logits fp32 reference of `chunked_cross_entropy` (for tests). Shapes as there."""
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    return F.cross_entropy(h[keep] @ weight.float().t(), y[keep], reduction="none")
