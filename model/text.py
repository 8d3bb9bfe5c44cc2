"""Qwen3 text decoder (`model.language_model`) with DeepStack injection.

Qwen3 (Yang et al. 2025): pre-norm RMSNorm, GQA attention with per-head RMSNorm on q and k before RoPE, SwiGLU MLP
(or the sparse MoE block of model/moe.py on the layers the MoEConfig selects). DeepStack (Qwen3-VL): after
decoder layer l < n_levels, the l-th DeepStack visual feature is added to the hidden states at the visual token
positions (model/deepstack.py). Follows transformers/models/qwen3_vl (Qwen3VLTextModel). Module names follow the official checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from .attention import attend
from .config import TextConfig
from .deepstack import inject
from .masks import AttentionMask
from .moe import SparseMoeBlock
from .rope import apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the reference), weight applied after casting back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """GQA self-attention with q/k RMSNorm (over head_dim, per head) before RoPE."""

    def __init__(self, cfg: TextConfig, layer_idx: int, backend: str):
        super().__init__()
        self.layer_idx, self.backend = layer_idx, backend
        self.hq, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, *, mask: AttentionMask, cache=None, backend: str | None = None):
        """x (B, L, D); cos/sin (B, L, hd); mask: AttentionMask (packed (B == 1) when it has cu_seqlens);
        cache: KVCache or None; backend: overrides the configured attention backend for this call."""
        B, L, _ = x.shape
        q = apply_rotary(self.q_norm(self.q_proj(x).view(B, L, self.hq, self.hd)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(B, L, self.hkv, self.hd)), cos, sin)
        v = self.v_proj(x).view(B, L, self.hkv, self.hd)
        scales = None
        if cache is not None:
            k, v, scales = cache.update(self.layer_idx, k, v)  # (B, Lk, Hkv, hd): past + new (FP8: + scales)
        if mask.cu_seqlens is not None:
            # packed batch: (1, T, H, hd) -> (T, H, hd), documents never see each other
            o = attend(q[0], k[0], v[0], mask, backend=backend or self.backend)[None]
        else:
            o = attend(q, k, v, mask, backend=backend or self.backend, kv_scales=scales)
        return self.o_proj(o.reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, backend: str):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, backend)
        self.sparse = cfg.moe is not None and cfg.moe.is_sparse(layer_idx)
        self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.moe) if self.sparse else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, backend: str | None = None):
        """Returns (x, router_logits or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache, backend=backend)
        h = self.post_attention_layernorm(x)
        if self.sparse:
            h, router_logits = self.mlp(h)
            return x + h, router_logits
        return x + self.mlp(h), None


class TextDecoder(nn.Module):
    """Embeddings -> decoder layers (+ DeepStack after the first layers) -> final norm."""

    def __init__(self, cfg: TextConfig, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, mask: AttentionMask | None = None,
                cache=None, backend: str | None = None, visual_mask: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Args:
            x: (B, L, D) input embeddings (visual features already scattered in).
            cos, sin: (B, L, head_dim) rotary tables.
            mask: AttentionMask (model/masks.py): causal, plus documents for a packed batch (B == 1) or key
                padding for a padded one; None: causal.
            cache: KVCache for decoding. backend: overrides the configured attention backend (None: keep it).
            visual_mask: (B, L) bool, positions of image/video tokens; deepstack: per level (n_visual, D).
        Returns: (hidden (B, L, D) after the final norm, router logits of the MoE layers).
        """
        mask = AttentionMask(causal=True) if mask is None else mask
        router_logits = []
        for i, layer in enumerate(self.layers):
            x, rl = layer(x, cos, sin, mask=mask, cache=cache, backend=backend)
            if rl is not None:
                router_logits.append(rl)
            x = inject(x, i, visual_mask, deepstack)  # DeepStack level i, after the whole layer
        return self.norm(x), tuple(router_logits)
