"""Patchify: normalised frames -> the vision tower's input rows, one function for images and videos.

A clip of T frames (an image is one frame, repeated to fill the temporal patch; an odd video repeats its last
frame) is cut into tubelets of temporal_patch_size (2) x patch_size x patch_size (16 x 16) pixels. Rows are ordered
temporal group, then merge block (row-major over the (h / patch / merge) x (w / patch / merge) blocks), then the
merge_size x merge_size (2 x 2) patches inside a block, so the vision merger can fold 4 consecutive rows into one
token; each row is laid out (C, t, p, p) = 3 * 2 * 16 * 16 = 1536 values. This is the layout of transformers'
`Qwen2VLImageProcessor` / `Qwen3VLVideoProcessor` `pixel_values`.
Normalisation is the fused rescale + normalise of transformers' torchvision backend, (x - 255 * mean) / (255 * std)
in fp32, computed a few temporal groups at a time straight into the output rows (peak memory: the output plus one
chunk; the same numbers as normalising the whole clip first).
"""
from __future__ import annotations

import torch
from einops import rearrange

from .config import VisionPreprocessConfig
from .geometry import grid_thw


def patchify(frames: torch.Tensor, config: VisionPreprocessConfig, groups_per_chunk: int = 16):
    """Normalise frames and cut them into vision-tower rows.

    Args:
        frames: (T, C, H, W) uint8 or float on the 0..255 scale; H and W multiples of patch_size * merge_size.
            T is padded to a multiple of temporal_patch_size by repeating the last frame.
        config: patch geometry and normalisation.
        groups_per_chunk: temporal groups normalised at a time (memory only; results do not depend on it).
    Returns:
        pixel_values (grid_t * grid_h * grid_w, C * tp * p * p) fp32 and grid_thw (grid_t, grid_h, grid_w).
    """
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    t, c, h, w = frames.shape
    if pad := -t % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
    gt, gh, gw = grid_thw(t, h, w, config)
    src = rearrange(frames, "(gt tp) c (bh m1 ph) (bw m2 pw) -> gt bh bw m1 m2 c tp ph pw",
                    tp=tp, m1=m, m2=m, ph=p, pw=p)
    out = torch.empty(gt * gh * gw, c * tp * p * p, dtype=torch.float32, device=frames.device)
    out_v = out.view(src.shape)
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=frames.device)[:, None] * 255.0
    std = torch.tensor(config.image_std, dtype=torch.float32, device=frames.device)[:, None] * 255.0
    rows_per_group = gh * gw
    for g0 in range(0, gt, groups_per_chunk):
        g1 = min(gt, g0 + groups_per_chunk)
        out_v[g0:g1].copy_(src[g0:g1])
        out[g0 * rows_per_group: g1 * rows_per_group].view(-1, c, tp * p * p).sub_(mean).div_(std)
    return out, (gt, gh, gw)
