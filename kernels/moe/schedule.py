"""Routing bookkeeping for the grouped expert GEMMs: sort (token, choice) pairs by expert, build the tile schedule.

Everything is computed on the device with torch ops and fixed-size outputs, so no host sync is needed: the number
of row tiles is bounded by sum_e ceil(n_e / BLOCK_M) <= (N + E * (BLOCK_M - 1)) // BLOCK_M, and unused slots of
the schedule carry expert -1 (their programs exit at once).
"""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Schedule:
    """Pairs sorted by expert and the row tiles of the grouped GEMMs (N = T * k pairs; int32 on x's device).

    Attributes:
        block_m: rows per tile.
        sorted_pair: (N,) flat pair index t * k + j of each sorted row.
        sorted_token: (N,) token t of each sorted row.
        inv: (N,) sorted row of each flat pair (inverse permutation of sorted_pair).
        expert_offsets: (E + 1,) first sorted row of each expert; expert_offsets[E] = N.
        tile_expert: (max_tiles,) expert of each tile, -1 for unused slots.
        tile_row_start, tile_row_end: (max_tiles,) sorted rows [start, end) the tile may touch (end = expert's end).
    """

    block_m: int
    sorted_pair: Tensor
    sorted_token: Tensor
    inv: Tensor
    expert_offsets: Tensor
    tile_expert: Tensor
    tile_row_start: Tensor
    tile_row_end: Tensor


def build_schedule(topk_ids: Tensor, num_experts: int, block_m: int) -> Schedule:
    """Sort the T * k routing choices by expert and cut each expert's rows into tiles of `block_m`.

    Args:
        topk_ids: (T, k) int, values in [0, num_experts).
        num_experts: E.
        block_m: rows per tile of the grouped GEMMs.
    Returns:
        Schedule (see its attributes).
    """
    T, k = topk_ids.shape
    N, E, dev = T * k, num_experts, topk_ids.device
    flat = topk_ids.reshape(-1)
    sorted_ids, sorted_pair = torch.sort(flat, stable=True)  # stable: rows of one expert keep token order
    experts = torch.arange(E + 1, device=dev, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, experts)        # (E + 1,) first row of each expert, no atomics
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m                # (E,) tiles per expert (0 for an idle expert)
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = max(1, (N + E * (block_m - 1)) // block_m)
    t = torch.arange(max_tiles, device=dev)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # (max_tiles,) in [0, E]; E = unused slot
    e = tile_expert.clamp(max=E - 1)
    first_tile = tile_end[e] - tiles[e]
    row_start = offsets[e] + (t - first_tile) * block_m
    row_end = offsets[e + 1]
    tile_expert = torch.where(tile_expert < E, tile_expert, -1)
    inv = torch.empty_like(sorted_pair)
    inv[sorted_pair] = torch.arange(N, device=dev)
    i32 = torch.int32
    return Schedule(block_m, sorted_pair.to(i32), (sorted_pair // k).to(i32), inv.to(i32), offsets.to(i32),
                    tile_expert.to(i32), row_start.to(i32), row_end.to(i32))
