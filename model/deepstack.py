"""Patch mergers and DeepStack: how vision features become LLM tokens, at several depths of the vision tower.

DeepStack (Meng et al. 2024, "DeepStack: Deeply Stacking Visual Tokens is Surprisingly Simple and Effective for
LMMs"), as Qwen3-VL uses it (Qwen3-VL technical report): besides the final merger, whose tokens replace the
<|image_pad|> / <|video_pad|> embeddings, the outputs of a few intermediate vision blocks are merged into extra
feature *levels* that are added to the decoder's hidden states at the same visual positions, one level after each
of the first decoder layers. The idea has three steps, all here:

1. Tap (vision tower): after block `deepstack_visual_indexes[l]`, `DeepStackMergers` merges the patch features
   into level l (its own PatchMerger, module name `model.visual.deepstack_merger_list.l` as in the official
   checkpoints, so loading is key-for-key).
2. Join (full model): images and videos are merged by separate tower calls; `join_levels` lays each level out in
   the order of the joint visual mask (image and video tokens interleaved as they occur in the sequence).
3. Inject (text decoder): `inject` adds level l to the hidden states at the visual positions after decoder layer
   l (no-op for layers past the last level).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchMerger(nn.Module):
    """Merge each 2x2 block of patches into one LLM token: LayerNorm, (4D -> 4D), exact GELU, (4D -> out).

    postshuffle_norm=False (main merger): LayerNorm(D) per patch, then concatenate the 4 patches.
    postshuffle_norm=True (DeepStack mergers): concatenate first, then LayerNorm(4D).
    """

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) in merge-block order -> (N / merge^2, out_hidden)."""
        x = self.norm(x.view(-1, self.merged)) if self.postshuffle_norm else self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact (erf) GELU here, unlike the blocks


class DeepStackMergers(nn.ModuleList):
    """One PatchMerger (postshuffle_norm=True) per tapped vision block; `indexes` are the tapped blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)
        self.indexes = tuple(cfg.deepstack_visual_indexes)

    def tap(self, block_idx: int, x: torch.Tensor) -> list[torch.Tensor]:
        """The level made from vision block `block_idx`'s output, as a 0- or 1-element list.

        Args: block_idx: index of the block that produced x; x: (N, D) patch features, merge-block order.
        Returns: [] if the block is not tapped, else [(N / merge^2, out_hidden)].
        """
        if block_idx not in self.indexes:
            return []
        return [self[self.indexes.index(block_idx)](x)]


def join_levels(masks: list[torch.Tensor], levels: list[list[torch.Tensor]]
                ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """One visual mask and one feature tensor per level, for images and videos together.

    Args:
        masks: per modality present (images, then videos), its (B, L) bool token mask.
        levels: per modality, the tower's DeepStack levels, each (n_tokens of that modality, D).
    Returns: (visual_mask (B, L) bool, per level (n_visual, D) in the order of visual_mask's True entries), or
        (None, None) without visual input.
    """
    if not masks:
        return None, None
    if len(masks) == 1:
        return masks[0], levels[0]
    visual_mask = masks[0] | masks[1]
    # images and videos share one joint visual mask in sequence order
    img_sel, vid_sel = masks[0][visual_mask], masks[1][visual_mask]
    joint_levels = []
    for d_img, d_vid in zip(*levels):
        joint = d_img.new_zeros(int(visual_mask.sum()), d_img.shape[-1])
        joint[img_sel], joint[vid_sel] = d_img, d_vid
        joint_levels.append(joint)
    return visual_mask, joint_levels


def inject(x: torch.Tensor, layer_idx: int, visual_mask: torch.Tensor | None,
           levels: list[torch.Tensor] | None) -> torch.Tensor:
    """After decoder layer `layer_idx`: add level `layer_idx` at the visual positions (x unchanged past the last).

    Args: x: (B, L, D) hidden states after the whole layer; visual_mask: (B, L) bool; levels: per level
        (n_visual, D), or None.
    """
    if levels is None or visual_mask is None or layer_idx >= len(levels):
        return x
    return x.index_put((visual_mask,), x[visual_mask] + levels[layer_idx].to(x.dtype))
