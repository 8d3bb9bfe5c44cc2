"""Block-sparse prefill: the `attn_sparsity` option of the decoder's prefill (none | xattention | vertical_slash |
window) and the attention call that runs it.

A `SparsityConfig` rides on the prefill's `AttentionMask` (model/masks.py, field `sparsity`); model/attention.py's
`attend` then estimates a block pattern from this chunk's queries and the cached keys
(kernels/attention/sparse_patterns.py: XAttention, MInference vertical-slash, a static window) and runs the
block-sparse kernel (kernels/attention/sparse.py) instead of dense attention. Only `Qwen3VL.prefill` sets it
(model/qwen3vl.py): decoding steps and chunks shorter than `min_queries` stay dense, and the vision tower builds its
own masks, so it is never affected. The kernels are imported on first use (model/ does not import Triton at import
time); they run on CUDA, and on the CPU through the Triton interpreter (tests).
The estimators' parameters and their published values are documented in kernels/attention/sparse_patterns.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

METHODS = ("none", "xattention", "vertical_slash", "window")
# parameters each estimator accepts (besides q, k, block_size, causal)
PARAMS = {"xattention": ("stride", "threshold", "sink_blocks", "chunk_q"),
          "vertical_slash": ("last_q", "vertical_size", "slash_size", "sink_blocks", "init_columns",
                             "local_diagonals"),
          "window": ("window", "num_global", "sink_blocks"),
          "none": ()}


@dataclass(frozen=True)
class SparsityConfig:
    """Which block-sparse pattern the prefill uses.

    Args:
        method: none | xattention | vertical_slash | window.
        block_size: query and key block side (64 or 128; the kernel tile).
        min_queries: chunks with fewer queries than this run dense (decoding, short tails).
        params: the estimator's keyword parameters (e.g. {"threshold": 0.9, "stride": 16}); unset ones take the
            published defaults of kernels/attention/sparse_patterns.py.
    """

    method: str = "none"
    block_size: int = 128
    min_queries: int = 128
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"attn_sparsity: method {self.method!r} unknown; expected one of {METHODS}")
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"attn_sparsity: block_size must be 16, 32, 64 or 128, got {self.block_size!r}")
        if not isinstance(self.min_queries, int) or self.min_queries < 1:
            raise ValueError(f"attn_sparsity: min_queries must be an int >= 1, got {self.min_queries!r}")
        unknown = sorted(set(self.params) - set(PARAMS[self.method]))
        if unknown:
            raise ValueError(f"attn_sparsity: {self.method} takes no parameter {unknown}; it takes "
                             f"{list(PARAMS[self.method])}")
        object.__setattr__(self, "params", dict(self.params))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def replace(self, **kw) -> "SparsityConfig":
        return dataclasses.replace(self, **kw)


def as_sparsity(x) -> SparsityConfig | None:
    """None, a method name, a dict of SparsityConfig fields, or a SparsityConfig -> a SparsityConfig, or None when
    the method is "none"."""
    if x is None:
        return None
    if isinstance(x, str):
        x = SparsityConfig(method=x)
    elif isinstance(x, dict):
        x = SparsityConfig(**x)
    elif not isinstance(x, SparsityConfig):
        raise TypeError(f"attn_sparsity: expected None, a method name, a dict or a SparsityConfig, got "
                        f"{type(x).__name__}")
    return x if x.enabled else None


def sparse_mask(q: torch.Tensor, k: torch.Tensor, cfg: SparsityConfig, scale: float | None = None) -> torch.Tensor:
    """The block mask (B, Hq, ceil(Lq / b), ceil(Lk / b)) bool of `cfg`'s estimator for q (B, Lq, Hq, D) against
    k (B, Lk, Hkv, D), causal and bottom-right aligned."""
    from kernels.attention.sparse_patterns import ESTIMATORS  # plain torch, but beside the kernels

    kw = dict(cfg.params)
    if scale is not None and cfg.method != "window":
        kw["scale"] = scale
    return ESTIMATORS[cfg.method](q, k, (cfg.block_size, cfg.block_size), causal=True, **kw)


def applies(cfg: SparsityConfig | None, q: torch.Tensor) -> bool:
    """Whether a call with queries q (B, Lq, H, D) runs sparse: prefill chunks of at least min_queries."""
    return cfg is not None and cfg.enabled and q.dim() == 4 and q.shape[1] >= cfg.min_queries


def sparse_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparsityConfig,
                  scale: float | None = None) -> torch.Tensor:
    """Causal block-sparse attention of a prefill chunk: estimate the pattern, run the kernel.

    Args:
        q: (B, Lq, Hq, D); k, v: (B, Lk, Hkv, D) (the cache plus this chunk; queries bottom-right aligned).
    Returns:
        (B, Lq, Hq, D) in q's dtype.
    """
    from kernels.attention import sparse_attention

    block_mask = sparse_mask(q, k, cfg, scale)
    b = cfg.block_size
    return sparse_attention(q, k, v, block_mask, block_size=(b, b), causal=True, scale=scale)


__all__ = ["SparsityConfig", "METHODS", "as_sparsity", "sparse_attend", "sparse_mask", "applies"]
