"""Attention masks: one description of which keys each query may see, and its renderings for every backend.

`AttentionMask` names the mask (causal, sliding window, global keys and queries, packed documents, key padding, the
valid length of a preallocated cache);
the attention backends of model/attention.py render it: a dense boolean keep-mask for SDPA and the fp32 references
(`dense`), the arguments of the Triton kernels (`kernel_args`, kernels/attention/), a FlexAttention `mask_mod`.
All three come from one rule, `AttentionMask.visible`; the Triton kernels evaluate the same rule per tile
(kernels/attention/masks.py), and the kernel tests check them against `dense` through kernels/attention/naive.py.

The rule (flash-attn conventions). Query i of Lq sits at key position p = Lk - Lq + i: the queries are the last Lq
positions of the keys (bottom-right aligned, as when decoding with a KV cache or prefilling in chunks). In a packed
row (`cu_seqlens`, Lq == Lk == T) positions count from the start of each document. Key j is visible to query p when
    j is in p's document
    and (not causal or j <= p)
    and (window is None or |p - j| < window or j < num_global or (global_queries and p < num_global))
    and (key j is real or j == p)      # key padding: a padded query sees itself, so no row is empty (NaN in SDPA)
    and j < key_length                 # key length: a preallocated cache holds key_length valid keys, and then the
                                       # queries sit at its end (p = key_length - Lq + i), not at Lk's
`num_global` and `global_queries` refine the window and change nothing without one (Longformer, Beltagy et al.
2020: global tokens attend to and are attended by every token).

A new mask feature: a field here, its clause in `visible` (then `dense` and `mask_mod` follow: the torch and flex
backends run it) and its name in `features`; the Triton kernels either learn it (kernels/attention/masks.py, the
flags of kernels/attention/common.py's `Problem`, `kernel_args` here) or list it in model/attention.py's
UNSUPPORTED, and tests/test_masks.py's loop reference gets the clause too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Which keys each query may attend to (see the module docstring for the rule).

    Args:
        causal: key j is visible to query p only when j <= p.
        window: sliding window W (keys with |p - j| < W), or None.
        num_global: the first G keys of each sequence (document) are visible to every query (with a window).
        global_queries: the queries at the first G positions see every key (with a window).
        cu_seqlens: (n_docs + 1,) int32 document boundaries of a packed row (T, H, D); no attention across them.
        max_seqlen: the longest document, if known (the Triton kernels size their grid with it; no host sync).
        key_padding: (B, Lk) bool, True at real tokens (left padding of a batch, with or without a KV cache).
        key_length: (B,) int32: row b holds only its first key_length[b] keys (a preallocated KV cache read whole,
            as a CUDA-graph decode step does); the queries are the last of them.
        sparsity: a model.sparsity.SparsityConfig, or None: not part of the rule above but an approximation of it
            that the prefill asks for (model/sparsity.py); `attend` runs it on causal (B, L, H, D) calls without
            the other features, everything else (dense, kernel_args, mask_mod) ignores it.
    """

    causal: bool = False
    window: int | None = None
    num_global: int = 0
    global_queries: bool = False
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    key_padding: torch.Tensor | None = None
    key_length: torch.Tensor | None = None
    sparsity: object | None = None
    # FlexAttention block masks already built for this mask, by (Lq, Lk, device): a model shares one mask object
    # across its layers, so the block mask is built once per forward
    _block_masks: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"AttentionMask: causal must be a bool, got {self.causal!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"AttentionMask: window must be None or an int >= 1, got {self.window!r}")
        if not isinstance(self.num_global, int) or self.num_global < 0:
            raise ValueError(f"AttentionMask: num_global must be an int >= 0, got {self.num_global!r}")
        if not isinstance(self.global_queries, bool):
            raise TypeError(f"AttentionMask: global_queries must be a bool, got {self.global_queries!r}")
        if self.cu_seqlens is not None and (self.cu_seqlens.dtype != torch.int32 or self.cu_seqlens.dim() != 1):
            raise ValueError(f"AttentionMask: cu_seqlens must be a 1-D int32 tensor, got {self.cu_seqlens.dtype} "
                             f"{tuple(self.cu_seqlens.shape)}")
        if self.key_padding is not None:
            if self.key_padding.dtype != torch.bool or self.key_padding.dim() != 2:
                raise ValueError(f"AttentionMask: key_padding must be a (B, Lk) bool tensor, got "
                                 f"{self.key_padding.dtype} {tuple(self.key_padding.shape)}")
            if self.cu_seqlens is not None:
                raise ValueError("AttentionMask: cu_seqlens and key_padding cannot be combined (a packed row has "
                                 "no padding between its documents)")
        if self.key_length is not None:
            if self.key_length.dtype != torch.int32 or self.key_length.dim() != 1:
                raise ValueError(f"AttentionMask: key_length must be a (B,) int32 tensor, got "
                                 f"{self.key_length.dtype} {tuple(self.key_length.shape)}")
            if self.cu_seqlens is not None:
                raise ValueError("AttentionMask: cu_seqlens and key_length cannot be combined")

    # ------------------------------------------------------------------ what the mask uses
    def features(self) -> tuple[str, ...]:
        """The mask features in use, by name ("causal", "window", "global keys", "global queries", "documents",
        "key padding"); a backend that lacks one of them refuses the mask (model/attention.py)."""
        used = {"causal": self.causal, "window": self.window is not None,
                "global keys": self.window is not None and self.num_global > 0,
                "global queries": self.window is not None and self.num_global > 0 and self.global_queries,
                "documents": self.cu_seqlens is not None, "key padding": self.key_padding is not None,
                "key length": self.key_length is not None}
        return tuple(name for name, on in used.items() if on)

    def within_document(self) -> AttentionMask:
        """The same mask for one document of a packed row (documents dropped), as a plain (B, L) call sees it."""
        return dataclasses.replace(self, cu_seqlens=None, max_seqlen=None)

    # ------------------------------------------------------------------ the rule
    def visible(self, b: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor, lq: int, lk: int,
                documents: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The visibility rule on broadcastable index tensors: True where query i may attend to key j.

        Args:
            b: batch index (used with key_padding only), broadcastable with i and j; or None.
            i: query index in [0, lq) (row of the packed T with documents); j: key index in [0, lk).
            lq, lk: query and key lengths (queries bottom-right aligned to the keys).
            documents: `document_table(T)` of a packed row, computed once by the caller (else here).
        Works on whole grids (`dense`) and on FlexAttention's scalar indices (`mask_mod`, under vmap).
        """
        end = lk if self.key_length is None else self.key_length[b].long()  # keys of the sequence: [0, end)
        p = i + (end - lq)  # query position in key coordinates
        p_doc, j_doc = p, j
        if self.cu_seqlens is not None:
            doc, start = self.document_table(lk) if documents is None else documents
            p_doc, j_doc = p - start[p], j - start[j]  # positions inside the document
        vis = torch.ones_like(p_doc - j_doc, dtype=torch.bool)
        if self.causal:
            vis = vis & (j_doc <= p_doc)
        if self.window is not None:
            near = ((p_doc - j_doc).abs() < self.window) | (j_doc < self.num_global)
            if self.global_queries:
                near = near | (p_doc < self.num_global)
            vis = vis & near
        if self.cu_seqlens is not None:
            vis = vis & (doc[p] == doc[j])
        if self.key_padding is not None:
            vis = vis & (self.key_padding[b, j] | (j == p))
        if self.key_length is not None:
            vis = vis & (j < end)
        return vis

    def document_table(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Document id (T,) and the document's first row (T,) of every row of the packed row (no host sync)."""
        cu = self.cu_seqlens
        rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
        doc = torch.searchsorted(cu[1:], rows, right=True)
        return doc, cu[doc]

    def _check_lengths(self, lq: int, lk: int):
        if self.cu_seqlens is not None and lq != lk:
            raise ValueError(f"AttentionMask: a packed row has as many queries as keys, got Lq={lq}, Lk={lk}")
        if self.key_padding is not None and self.key_padding.shape[1] != lk:
            raise ValueError(f"AttentionMask: key_padding covers {self.key_padding.shape[1]} keys, not Lk={lk}")

    # ------------------------------------------------------------------ renderings
    def dense(self, lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean keep-mask for SDPA and the references: (Lq, Lk), or (B, 1, Lq, Lk) with key_padding or
        key_length.

        Args:
            lq, lk: query and key lengths (with documents, both are the packed length T).
        """
        self._check_lengths(lq, lk)
        i = torch.arange(lq, device=device)[:, None]  # (Lq, 1)
        j = torch.arange(lk, device=device)[None, :]  # (1, Lk)
        b = None
        rows = self.key_padding if self.key_padding is not None else self.key_length
        if rows is not None:
            b = torch.arange(rows.shape[0], device=device)[:, None, None, None]  # (B, 1, 1, 1)
            i, j = i[None, None], j[None, None]  # (1, 1, Lq, 1), (1, 1, 1, Lk)
        return self.visible(b, i, j, lq, lk)

    def kernel_args(self) -> dict:
        """Keyword arguments of the Triton kernels (`kernels.attention.attention`) for this mask; key padding has
        no kernel argument (the caller refuses it first, naming the backend)."""
        if self.key_padding is not None:
            raise NotImplementedError("the Triton attention kernels cannot run a mask with key padding")
        args = dict(causal=self.causal, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen,
                    window=self.window, num_global=self.num_global, global_queries=self.global_queries)
        if self.key_length is not None:
            args["kv_length"] = self.key_length
        return args

    def mask_mod(self, lq: int, lk: int):
        """FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` for Lq queries over Lk keys (torch.nn.attention.
        flex_attention; the packed layout is one batch row of T)."""
        self._check_lengths(lq, lk)
        documents = self.document_table(lk) if self.cu_seqlens is not None else None  # once, outside the mod

        def mask_mod(b, h, q_idx, kv_idx):
            return self.visible(b, q_idx, kv_idx, lq, lk, documents)
        return mask_mod


__all__ = ["AttentionMask"]
