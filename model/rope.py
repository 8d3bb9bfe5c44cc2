"""Rotary position embeddings for Qwen3-VL: text MRoPE (interleaved / chunked / 1-D), context scaling, the vision
tower's 2-D RoPE, and the 3-axis position-id builder (`get_rope_index`).

References: RoFormer (Su et al. 2021); Qwen2-VL MRoPE (chunked T|H|W sections); Qwen3-VL interleaved MRoPE
(frequency slot i takes H for i = 1 mod 3, W for i = 2 mod 3, T otherwise, within 3 * section); YaRN
(Peng et al. 2023) and NTK/linear position interpolation. SPEC.md sections 1 and 4.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import RopeConfig, TextConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, H, D) by angles whose cos/sin are (..., L, D) (broadcast over heads)."""
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------- text rotary
def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) fp32 and the cos/sin scale for the configured scaling type."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta
    if rope.rope_type == "default":
        return 1.0 / (base**exponents), 1.0
    if rope.rope_type == "linear":
        return 1.0 / (base**exponents) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        # NTK-aware: stretch the base once the sequence outgrows the trained context.
        orig = rope.original_max_position_embeddings or max_position_embeddings
        if seq_len is not None and seq_len > orig:
            base = base * ((rope.factor * seq_len / orig) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    # YaRN: interpolate low frequencies, extrapolate high ones, linear ramp in between; scale cos/sin by mscale.
    factor, orig = rope.factor, rope.original_max_position_embeddings

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rot):
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the frequency is extrapolated unchanged
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def mrope_axis_map(rope: RopeConfig, n_freq: int) -> torch.Tensor:
    """Which position axis (0=T, 1=H, 2=W) drives each of the n_freq frequency slots."""
    axis = torch.zeros(n_freq, dtype=torch.long)
    s_t, s_h, s_w = rope.mrope_section
    if rope.layout == "interleaved":
        # THWTHW...THW then T for the remainder: slots 1,4,..,3*s_h-2 take H; 2,5,..,3*s_w-1 take W.
        axis[1:3 * s_h:3] = 1
        axis[2:3 * s_w:3] = 2
    elif rope.layout == "chunked":
        axis[s_t:s_t + s_h] = 1
        axis[s_t + s_h:s_t + s_h + s_w] = 2
    return axis  # "1d": all T


class TextRotary(nn.Module):
    """cos/sin tables for the text decoder from 3-axis position ids (MRoPE) or plain positions."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_scaling = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", mrope_axis_map(cfg.rope, cfg.head_dim // 2), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (3, B, L) long -> cos, sin (B, L, head_dim) in `dtype` (computed in fp32, like the reference)."""
        inv_freq, scale = self.inv_freq, self.attention_scaling
        if self.cfg.rope.rope_type == "dynamic":
            inv_freq, scale = rope_inv_freq(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings,
                                            int(position_ids.max()) + 1)
            inv_freq = inv_freq.to(position_ids.device)
        # Pick per frequency slot the position of its axis: (B, L, D/2).
        pos = position_ids.float()  # (3, B, L)
        pos = pos.permute(1, 2, 0)[..., self.axis]  # (B, L, D/2)
        freqs = pos * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        # fp32 cos/sin, cast to the activation dtype as the reference does.
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


# ---------------------------------------------------------------------------------------------- vision rotary
def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch in merge-block order, repeated per temporal group.

    Args: grid_thw (n, 3) long. Returns (N_patches, 2) long.
    """
    out, seen = [], {}
    for t, h, w in grid_thw.tolist():
        rc = seen.get((h, w))
        if rc is None:  # packed batches repeat a few sizes hundreds of times: build each once
            rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
            cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
            # merge-block order: (block_row, block_col, in_row, in_col)
            rc = seen[(h, w)] = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1),
                                             cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out, dim=0)


def vision_rotary(grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D axial rotary tables for the vision tower: cos, sin (N_patches, head_dim) fp32.

    head_dim/4 frequencies per axis; angles [row*f | col*f] concatenated with themselves to head_dim.
    """
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))
    pos = vision_position_ids(grid_thw, merge).to(device)  # (N, 2)
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # (N, 2 * head_dim/4): [row freqs | col freqs]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


# ---------------------------------------------------------------------------------------------- position ids
def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   *, config, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis (T, H, W) position ids for a batch, derived from input_ids (Qwen3-VL get_rope_index semantics).

    Text runs advance all three axes together; a run of image/video pad tokens with merged grid (h', w') gets
    T = pos, H = pos + row, W = pos + col, then pos += max(h', w'). A video of t temporal groups is t separate runs
    (the timestamp text between groups is ordinary text). Padded positions (attention_mask == 0) are skipped and get 0.

    Args:
        input_ids: (B, L) long.  image_grid_thw / video_grid_thw: (n, 3) long, in order of appearance over the batch.
        attention_mask: (B, L) 0/1 or None.  config: Qwen3VLConfig (token ids, merge size).
        cu_seqlens: (n_docs + 1,) int32 for a packed batch (B == 1): positions restart in every document.
    Returns:
        position_ids (3, B, L) long, rope_deltas (B, 1) long such that a token decoded at cache length c sits at
        position c + rope_delta on all three axes (c counts padding, so the first new token is at max + 1).
    """
    B, L = input_ids.shape
    merge = config.vision.spatial_merge_size
    device = input_ids.device
    grids = {
        1: iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(()),
        # every temporal group of a video is its own run of pads
        2: iter([[1, h, w] for t, h, w in video_grid_thw.tolist() for _ in range(t)])
        if video_grid_thw is not None else iter(()),
    }
    position_ids = torch.zeros(3, B, L, dtype=torch.long, device=device)
    deltas = []
    if cu_seqlens is not None:
        if B != 1 or attention_mask is not None:
            raise ValueError("cu_seqlens (packed batch) needs B == 1 and no attention_mask")
        bounds = cu_seqlens.tolist()
        segments = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        segments = [(b, 0, L) for b in range(B)]
    for b, seg_start, seg_end in segments:
        keep = torch.zeros(L, dtype=torch.bool, device=device)
        keep[seg_start:seg_end] = True
        if attention_mask is not None:
            keep &= attention_mask[b].bool()
        ids = input_ids[b][keep]
        types = torch.zeros_like(ids)
        types[ids == config.image_token_id] = 1
        types[ids == config.video_token_id] = 2
        # run boundaries of equal token type
        change = torch.nonzero(types[1:] != types[:-1]).flatten() + 1
        starts = [0] + change.tolist()
        ends = change.tolist() + [len(ids)]
        tt = types.tolist()
        pieces, pos = [], 0
        for s, e in zip(starts, ends):
            kind, n = tt[s] if len(tt) else 0, e - s
            if kind == 0:
                pieces.append(torch.arange(pos, pos + n, device=device).expand(3, n))
                pos += n
                continue
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                what = "image_grid_thw" if kind == 1 else "video_grid_thw"
                raise ValueError(f"sample {b}: more runs of {'image' if kind == 1 else 'video'} pad tokens than {what} rows") from None
            hh, ww = h // merge, w // merge
            if t * hh * ww != n:
                raise ValueError(f"sample {b}: a run of {n} {'image' if kind == 1 else 'video'} pad tokens does not match "
                                 f"its grid (t={t}, h={h}, w={w}) -> {t * hh * ww} tokens")
            tpos = torch.arange(t, device=device).view(t, 1, 1).expand(t, hh, ww)
            hpos = torch.arange(hh, device=device).view(1, hh, 1).expand(t, hh, ww)
            wpos = torch.arange(ww, device=device).view(1, 1, ww).expand(t, hh, ww)
            pieces.append(torch.stack([tpos, hpos, wpos]).reshape(3, -1) + pos)
            pos += max(hh, ww)
        if len(ids):
            llm = torch.cat(pieces, dim=1)
            position_ids[:, b, keep] = llm
            deltas.append(int(llm.max()) + 1 - L)
        else:
            deltas.append(-L)
    if cu_seqlens is not None:
        deltas = deltas[-1:]  # decoding continues the last document
    for kind, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if next(grids[kind], None) is not None:
            raise ValueError(f"{name} has more rows than there are runs of pad tokens in input_ids")
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).view(B, 1)


def text_position_ids(attention_mask: torch.Tensor | None, B: int, L: int, offset: int | torch.Tensor = 0,
                      device=None) -> torch.Tensor:
    """Plain positions replicated on 3 axes: (3, B, L). With a mask, padding is skipped (left padding)."""
    if attention_mask is None:
        pos = torch.arange(L, device=device).view(1, L).expand(B, L)
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    pos = pos + (offset if not torch.is_tensor(offset) else offset.view(-1, 1))
    return pos.unsqueeze(0).expand(3, B, L)
