"""Qwen3-VL vision tower (`model.visual`): SigLIP-2-style ViT with 2-D RoPE, per-frame attention, a PatchMerger
and the DeepStack mergers that tap intermediate blocks.

Reference: Qwen3-VL technical report (DeepStack multi-level fusion; DeepStack, Meng et al. 2024).
The mergers and the DeepStack taps are in model/deepstack.py. Module names follow the official checkpoint
(`patch_embed.proj`, `pos_embed`, `blocks.N.attn.qkv`, `merger`, `deepstack_merger_list.i`) so loading is
key-for-key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attend
from .config import VisionConfig
from .deepstack import DeepStackMergers, PatchMerger
from .masks import AttentionMask
from .rope import apply_rotary, merge_block_order, vision_rotary


class PatchEmbed(nn.Module):
    """Conv3d(3, D, kernel=stride=(2, 16, 16)) over one pixel row = a linear map of the 1536 inputs."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C*t*p*p) -> (N, D). A matmul with the flattened kernel, same math as the strided Conv3d."""
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, backend: str):
        super().__init__()
        self.num_heads, self.backend = cfg.num_heads, backend
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cu_seqlens, cos, sin, max_seqlen=None):
        """x (N, D); cu_seqlens (n_frames + 1,) int32 (longest frame max_seqlen); cos/sin (N, head_dim) fp32."""
        q, k, v = rearrange(self.qkv(x), "n (three h d) -> three n h d", three=3, h=self.num_heads)  # (N, H, hd)
        # RoPE in fp32, as the reference does, then back to the activation dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        # bidirectional within each frame (or image): the frames are the documents of a packed row
        o = attend(q, k, v, AttentionMask(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen), backend=self.backend)
        return self.proj(o.flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg, backend)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin, max_seqlen=None):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, max_seqlen)
        return x + self.mlp(self.norm2(x))


def _interpolate_one(table: torch.Tensor, side: int, h: int, w: int, merge: int) -> torch.Tensor:
    """Bilinear (align_corners=True) resampling of the (side*side, D) table to an h x w grid, merge-block order."""
    def taps(n):
        src = torch.arange(n, dtype=torch.float32, device=table.device) * (side - 1) / max(n - 1, 1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long()
        return lo, (lo + 1).clamp(max=side - 1), frac

    h0, h1, fh = taps(h)
    w0, w1, fw = taps(w)
    # four corners: (rows, cols) index grids and weights, each (h, w)
    idx = [(h0[:, None] * side + w0[None]), (h0[:, None] * side + w1[None]),
           (h1[:, None] * side + w0[None]), (h1[:, None] * side + w1[None])]
    wts = [((1 - fh)[:, None] * (1 - fw)[None]), ((1 - fh)[:, None] * fw[None]),
           (fh[:, None] * (1 - fw)[None]), (fh[:, None] * fw[None])]
    # fp32 weights: the weighted sum promotes to fp32 like the reference, cast by the caller
    emb = sum(table[i].float() * wt[..., None] for i, wt in zip(idx, wts))  # (h, w, D)
    return merge_block_order(emb, merge)  # (h * w, D)


def interpolate_pos_embed(table: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Bilinear (align_corners=True) resampling of the square learned table to each grid, in merge-block order.

    Each distinct (h, w) is resampled once and every image gathers its rows with one index_select, so a packed
    batch of hundreds of same-sized images costs a handful of kernels instead of ~30 per image.

    Args: table (side*side, D); grid_thw (n, 3). Returns (N_patches, D) fp32.
    """
    side = int(round(table.shape[0] ** 0.5))
    offsets: dict[tuple[int, int], int] = {}
    parts, index, n = [], [], 0
    for t, h, w in grid_thw.tolist():
        if (h, w) not in offsets:
            offsets[(h, w)] = n
            parts.append(_interpolate_one(table, side, h, w, merge))
            n += h * w
        o = offsets[(h, w)]
        index.append(torch.arange(o, o + h * w).repeat(t))
    return torch.cat(parts).index_select(0, torch.cat(index).to(table.device, non_blocking=True))


class VisionTower(nn.Module):
    """pixel rows (N, 1536) + grid_thw -> merged tokens (N/4, out_hidden) and one DeepStack level per tap."""

    def __init__(self, cfg: VisionConfig, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, backend) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = DeepStackMergers(cfg)

    def _block_outputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Embed the patches, then yield (i, patch features after block i) for every block, in order.

        A generator, so that a caller keeps only the outputs it needs (a video's patches times 27 blocks would
        not fit). Args as in `forward`.
        """
        cfg = self.cfg
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be (N, {cfg.patch_dim}), got {tuple(pixel_values.shape)}")
        n_expected = int(grid_thw.prod(-1).sum())
        if n_expected != pixel_values.shape[0]:
            raise ValueError(f"grid_thw describes {n_expected} patches but pixel_values has {pixel_values.shape[0]} rows")
        if ((grid_thw[:, 1:] % cfg.spatial_merge_size) != 0).any():
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size {cfg.spatial_merge_size}: {grid_thw.tolist()}")
        x = self.patch_embed(pixel_values)
        x = x + interpolate_pos_embed(self.pos_embed.weight, grid_thw, cfg.spatial_merge_size).to(x.dtype)
        cos, sin = vision_rotary(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        # attention stays inside each temporal group (frame pair): one document per (t index, image/video)
        frame_len = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(frame_len.cumsum(0), (1, 0)).to(device=x.device, dtype=torch.int32)
        max_seqlen = int(frame_len.max())
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_seqlens, cos, sin, max_seqlen)
            yield i, x

    def forward_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The last block's patch features, before any merger (the vision warm-up reads them).

        Args: pixel_values (N, 1536); grid_thw (n, 3) long (t, h, w) in patches.
        Returns: (N, hidden), in the processor's merge-block order.
        """
        for _, x in self._block_outputs(pixel_values, grid_thw):
            pass
        return x

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: pixel_values (N, 1536); grid_thw (n, 3) long (t, h, w) in patches.

        Returns: (merged (N/4, out_hidden), DeepStack levels [(N/4, out_hidden)] in deepstack_visual_indexes order).
        """
        levels = []
        for i, x in self._block_outputs(pixel_values, grid_thw):
            levels += self.deepstack_merger_list.tap(i, x)
        return self.merger(x), levels
