"""Rotary position embeddings for Qwen3-VL: the text decoder's MRoPE tables (with the registry of rotary layouts),
context scaling, and the vision tower's 2-D RoPE. Position ids themselves (prefill, decode, packing) live in
model/positions.py; this file turns them into cos/sin tables.

A rotary layout says which position axis (T, H or W) drives each of the head_dim/2 frequency slots. Layouts live
in `ROTARY_LAYOUTS`, filled by the `@rotary_layout(name)` decorator: adding one is a function
`(mrope_section, n_freq) -> (n_freq,) long axis ids` plus its decorator line. model/config.py validates
`RopeConfig.layout` against this registry and reads/writes config.json through each entry's `hf_spellings`, so a
new layout round-trips with no other edit (one transformers does not know is spelled `"mrope_layout": name`).
This file imports model/config.py only for type hints, so config.py can import the registry without a cycle.

References: RoFormer (Su et al. 2021); Qwen2-VL MRoPE (chunked T|H|W sections); Qwen3-VL interleaved MRoPE
(frequency slot i takes H for i = 1 mod 3, W for i = 2 mod 3, T otherwise, within 3 * section); VideoRoPE (Wei et al.
2025, arXiv:2502.05173: T on the lowest frequencies, H / W alternating on the rest); YaRN
(Peng et al. 2023) and NTK/linear position interpolation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
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


# ---------------------------------------------------------------------------------------------- rotary layouts
SECTION = "<mrope_section>"  # placeholder in an hf spelling: the layout's mrope_section goes here


@dataclass(frozen=True)
class RotaryLayout:
    """One way of sharing the rotary frequencies between the T, H and W position axes.

    axis_map: (mrope_section (s_t, s_h, s_w), n_freq) -> (n_freq,) long, the axis (0=T, 1=H, 2=W) of each slot.
    uses_section: whether mrope_section matters (checked against head_dim, written to config.json).
    hf_spellings: the config.json `rope_scaling` layout keys that mean this layout, the first one written by
        `to_hf`; the value SECTION stands for the mrope_section list. Reading needs an exact match of the keys.
    """

    name: str
    axis_map: Callable[[tuple[int, int, int], int], torch.Tensor]
    uses_section: bool
    hf_spellings: tuple[dict[str, Any], ...]


ROTARY_LAYOUTS: dict[str, RotaryLayout] = {}


def rotary_layout(name: str, *, uses_section: bool = True, hf_spellings: tuple[dict[str, Any], ...] = ()):
    """Decorator registering `fn(mrope_section, n_freq) -> (n_freq,) long axis ids` as layout `name`.

    Args:
        name: the value of `RopeConfig.layout` (and of Hydra's `model.text.rope.layout`).
        uses_section: False for layouts that ignore mrope_section (it is then neither checked nor written).
        hf_spellings: see RotaryLayout; only for layouts transformers knows. By default the layout is written to
            config.json as {"mrope_layout": name} (plus "mrope_section" when uses_section), which transformers
            does not read but our `from_hf` does.
    """
    def register(fn):
        if name in ROTARY_LAYOUTS:
            raise ValueError(f"rotary layout {name!r} is already registered")
        default = {"mrope_section": SECTION} if uses_section else {}
        spellings = tuple(hf_spellings) or ({**default, "mrope_layout": name},)
        if ("mrope_section" in spellings[0]) != uses_section:
            raise ValueError(f"rotary layout {name!r}: the first hf spelling must write mrope_section iff uses_section")
        ROTARY_LAYOUTS[name] = RotaryLayout(name, fn, uses_section, spellings)
        return fn
    return register


@rotary_layout("interleaved", hf_spellings=(
    {"mrope_section": SECTION, "mrope_interleaved": True},
    {"mrope_section": SECTION},       # transformers' Qwen3-VL: a section without the flag is interleaved
    {"mrope_interleaved": True}))     # flag without a section: the default section
def interleaved(section: tuple[int, int, int], n_freq: int) -> torch.Tensor:
    """Qwen3-VL: THWTHW...THW then T for the remainder: slots 1,4,..,3*s_h-2 take H; 2,5,..,3*s_w-1 take W."""
    _, s_h, s_w = section
    axis = torch.zeros(n_freq, dtype=torch.long)
    axis[1:3 * s_h:3] = 1
    axis[2:3 * s_w:3] = 2
    return axis


@rotary_layout("chunked", hf_spellings=({"mrope_section": SECTION, "mrope_interleaved": False},))
def chunked(section: tuple[int, int, int], n_freq: int) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL: [T]*s_t [H]*s_h [W]*s_w."""
    s_t, s_h, s_w = section
    axis = torch.zeros(n_freq, dtype=torch.long)
    axis[s_t:s_t + s_h] = 1
    axis[s_t + s_h:s_t + s_h + s_w] = 2
    return axis


@rotary_layout("videorope")
def videorope(section: tuple[int, int, int], n_freq: int) -> torch.Tensor:
    """VideoRoPE's low-frequency temporal allocation (Wei et al. 2025, arXiv:2502.05173, section 4.1): T takes the
    s_t lowest frequencies (the LAST slots), H and W alternate over the others starting with H (HWHW...HW TT..T).
    As in the paper, the H / W split of the spatial slots follows from alternation alone (s_h and s_w only count
    together: s_h + s_w spatial slots). Pair it with `RopeConfig.spatial_ids="diagonal"` and a
    `temporal_stride` (model/positions.py) for the paper's full scheme.
    """
    s_t = section[0]
    axis = torch.zeros(n_freq, dtype=torch.long)
    axis[:n_freq - s_t] = 1 + torch.arange(n_freq - s_t) % 2  # 1 (H), 2 (W), 1, 2, ...
    return axis


@rotary_layout("1d", uses_section=False, hf_spellings=({}, {"mrope_interleaved": False}))
def one_d(section: tuple[int, int, int], n_freq: int) -> torch.Tensor:
    """Plain RoPE on the temporal/text axis only (an ablation): H and W are ignored."""
    return torch.zeros(n_freq, dtype=torch.long)


def mrope_axis_map(rope: RopeConfig, n_freq: int) -> torch.Tensor:
    """Which position axis (0=T, 1=H, 2=W) drives each of the n_freq frequency slots: (n_freq,) long."""
    axis = ROTARY_LAYOUTS[rope.layout].axis_map(rope.mrope_section, n_freq)
    # shape and dtype only: the model may be built on the meta device, where values cannot be read
    if axis.shape != (n_freq,) or axis.dtype != torch.long:
        raise ValueError(f"rotary layout {rope.layout!r} must return ({n_freq},) long axis ids in {{0, 1, 2}}, "
                         f"got {tuple(axis.shape)} {axis.dtype}")
    return axis


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
def merge_block_order(x: torch.Tensor, merge: int) -> torch.Tensor:
    """Raster (h, w, ...) -> merge-block order (h*w, ...): block row, block column, then row and column inside
    the merge x merge block. The vision tower's patch rows, position embeddings and 2-D RoPE all use this order
    (the processor's patchify writes pixels in it, model/processing/patchify.py).
    """
    return rearrange(x, "(bh m1) (bw m2) ... -> (bh bw m1 m2) ...", m1=merge, m2=merge)


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch in merge-block order, repeated per temporal group.

    Args: grid_thw (n, 3) long. Returns (N_patches, 2) long.
    """
    out, seen = [], {}
    for t, h, w in grid_thw.tolist():
        rc = seen.get((h, w))
        if rc is None:  # packed batches repeat a few sizes hundreds of times: build each once
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
            rc = seen[(h, w)] = merge_block_order(torch.stack([rows, cols], dim=-1), merge)
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
