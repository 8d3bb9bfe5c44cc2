"""Position ids for the text decoder: the one home of the 3-axis (T, H, W) MRoPE position scheme.

Three rules, and every caller uses them (the model's forward, the decode loop, the training data packer, the
benchmarks):
  * prefill: `get_rope_index` derives (3, B, L) ids from input_ids and the image/video grids (Qwen2-VL / Qwen3-VL
    `get_rope_index` semantics, same name as in transformers). Text advances all three axes together; a visual
    run lays its merged patches out on a (t, h', w') grid starting at the current position.
  * decode: `decode_position_ids` -- a token appended after the prompt sits at cache length + rope delta on all
    three axes (the delta is what prefill returns: how far the visual runs pulled positions behind the length).
  * packing: `pack_position_ids` -- a packed row (several documents, B = 1, `cu_seqlens`) takes every document's
    own ids, concatenated; positions restart at 0 in every document.
How positions turn into rotary angles (which axis drives which frequency) is model/rope.py's business.

References: Qwen2-VL (Wang et al. 2024) MRoPE; transformers' Qwen3VLModel.get_rope_index; Qwen2.5-VL (Bai et al.
2025) absolute-time T ids; VideoRoPE (Wei et al. 2025, arXiv:2502.05173) diagonal layout and temporal spacing.
"""
from __future__ import annotations

import torch


def pack_position_ids(docs: list[torch.Tensor]) -> torch.Tensor:
    """Position ids of a packed row from its documents' own ids (each document starts again at 0).

    Args:
        docs: per document (3, L_i) long, e.g. `get_rope_index` of that document alone.
    Returns:
        (3, 1, sum L_i) long.
    """
    return torch.cat(docs, dim=1)[:, None]


def decode_position_ids(cache_len: int, rope_deltas: torch.Tensor) -> torch.Tensor:
    """Position ids of the next token decoded after `cache_len` cached tokens: all three axes at cache_len + delta.

    Args:
        cache_len: tokens in the KV cache (prompt padding included).
        rope_deltas: (B, 1) long, as returned by `get_rope_index` (or the model's prefill output).
    Returns:
        (3, B, 1) long.
    """
    B = rope_deltas.shape[0]
    return (cache_len + rope_deltas).view(1, B, 1).expand(3, B, 1)


def visual_run_positions(t: int, hh: int, ww: int, start: int, rope, time_interval: float = 1.0,
                         device=None) -> tuple[torch.Tensor, int]:
    """Position ids of one visual run: a (t, hh, ww) grid of merged tokens starting at position `start`.

    T = start + int(g * time_interval) for temporal group g; H, W = start + row, col ("grid") or T + row - (hh-1)//2,
    T + col - (ww-1)//2 ("diagonal", VideoRoPE's layout: the frame's spatial ids centred on its T id).
    Returns ((3, t*hh*ww) long, the position of the next token: max id + 1 ("grid"), last T id + 1 ("diagonal")).
    """
    g = [int(i * time_interval) for i in range(t)]  # truncation, as Qwen2.5-VL's .long()
    tpos = torch.tensor(g, device=device).add_(start).view(t, 1, 1).expand(t, hh, ww)
    rows = torch.arange(hh, device=device).view(1, hh, 1).expand(t, hh, ww)
    cols = torch.arange(ww, device=device).view(1, 1, ww).expand(t, hh, ww)
    if rope.spatial_ids == "diagonal":
        hpos, wpos = tpos + rows - (hh - 1) // 2, tpos + cols - (ww - 1) // 2
        nxt = start + g[-1] + 1
    else:
        hpos, wpos = rows + start, cols + start
        nxt = start + max(g[-1], hh - 1, ww - 1) + 1
    return torch.stack([tpos, hpos, wpos]).reshape(3, -1), nxt


def _sequence_position_ids(ids: torch.Tensor, grids: dict, merge: int, config, b: int) -> tuple[torch.Tensor, int]:
    """The prefill rule on one unpadded, non-empty sequence: (L,) long ids -> ((3, L) long positions, next position).

    `grids` maps 1 (image) / 2 (video run) to an iterator of (t, h, w, time_interval) rows, consumed in order of
    appearance.
    """
    device = ids.device
    rope = config.text.rope
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
        kind, n = tt[s], e - s
        if kind == 0:
            pieces.append(torch.arange(pos, pos + n, device=device).expand(3, n))
            pos += n
            continue
        what = "image" if kind == 1 else "video"
        try:
            t, h, w, interval = next(grids[kind])
        except StopIteration:
            raise ValueError(f"sample {b}: more runs of {what} pad tokens than {what}_grid_thw rows") from None
        hh, ww = h // merge, w // merge
        if t * hh * ww != n:
            layout = (" (temporal_ids " + repr(rope.temporal_ids) + ": a video is one run of all its groups)"
                      if kind == 2 and rope.temporal_ids != "timestamps" else "")
            raise ValueError(f"sample {b}: a run of {n} {what} pad tokens does not match "
                             f"its grid (t={t}, h={h}, w={w}) -> {t * hh * ww} tokens{layout}")
        run, pos = visual_run_positions(t, hh, ww, pos, rope, interval, device)
        pieces.append(run)
    return torch.cat(pieces, dim=1), pos


def _video_runs(video_grid_thw: torch.Tensor | None, second_per_grid_ts, rope) -> list[list]:
    """(t, h, w, time_interval) per run of video pads the rule expects, in order: one per temporal group
    ("timestamps", Qwen3-VL), or one per video ("absolute_time": interval second_per_grid_t * tokens_per_second,
    Qwen2.5-VL; "none": interval temporal_stride)."""
    if video_grid_thw is None:
        return []
    grids = video_grid_thw.tolist()
    if rope.temporal_ids == "timestamps":
        return [[1, h, w, 1.0] for t, h, w in grids for _ in range(t)]
    if rope.temporal_ids == "none":
        return [[t, h, w, rope.temporal_stride] for t, h, w in grids]
    spg = [1.0] * len(grids) if second_per_grid_ts is None else [float(x) for x in second_per_grid_ts]
    if len(spg) != len(grids):
        raise ValueError(f"second_per_grid_ts has {len(spg)} entries for {len(grids)} videos")
    return [[t, h, w, s * rope.tokens_per_second] for (t, h, w), s in zip(grids, spg)]


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   *, config, cu_seqlens: torch.Tensor | None = None,
                   second_per_grid_ts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis (T, H, W) position ids for a batch, derived from input_ids (Qwen3-VL get_rope_index semantics).

    Text runs advance all three axes together; a run of image/video pad tokens with merged grid (h', w') gets
    T = pos, H = pos + row, W = pos + col, then pos += max(h', w'). A video of t temporal groups is t separate runs
    (the timestamp text between groups is ordinary text). Padded positions (attention_mask == 0) are skipped and get 0.
    `config.text.rope` may ask for another video rule (position-encoding ablations, model/config.py RopeConfig):
    temporal_ids "absolute_time" (Qwen2.5-VL) or "none" (Qwen2-VL, VideoRoPE) take each video as ONE run of all its
    groups with T ids spaced by seconds or by `temporal_stride`, and the next text starts after the run's largest
    id (Qwen2.5-VL's original rule; transformers 5 restarts it at start + max(h', w') instead);
    spatial_ids "diagonal" centres H / W on T (VideoRoPE), see `visual_run_positions`.

    Args:
        input_ids: (B, L) long.  image_grid_thw / video_grid_thw: (n, 3) long, in order of appearance over the batch.
        attention_mask: (B, L) 0/1 or None.  config: Qwen3VLConfig (token ids, merge size, rope.temporal_ids).
        cu_seqlens: (n_docs + 1,) int32 for a packed batch (B == 1): positions restart in every document
            (`pack_position_ids`).
        second_per_grid_ts: seconds per temporal group of each video (n_videos,), for temporal_ids
            "absolute_time" (None: 1.0 each, as transformers' Qwen2.5-VL).
    Returns:
        position_ids (3, B, L) long, rope_deltas (B, 1) long such that a token decoded at cache length c sits at
        position c + rope_delta on all three axes (`decode_position_ids`; c counts padding, so the first new token
        is at max + 1).
    """
    B, L = input_ids.shape
    merge = config.vision.spatial_merge_size
    device = input_ids.device
    grids = {
        1: iter([[t, h, w, 1.0] for t, h, w in image_grid_thw.tolist()] if image_grid_thw is not None else ()),
        # Qwen3-VL: every temporal group of a video is its own run of pads
        2: iter(_video_runs(video_grid_thw, second_per_grid_ts, config.text.rope)),
    }
    position_ids = torch.zeros(3, B, L, dtype=torch.long, device=device)

    def delta(next_pos: int) -> int:  # the next token's position - L (the max id + 1 for Qwen3-VL's rule)
        return next_pos - L

    if cu_seqlens is not None:
        if B != 1 or attention_mask is not None:
            raise ValueError("cu_seqlens (packed batch) needs B == 1 and no attention_mask")
        bounds = cu_seqlens.tolist()
        docs = [_sequence_position_ids(input_ids[0, s:e], grids, merge, config, 0) if e > s
                else (position_ids.new_zeros(3, 0), 0) for s, e in zip(bounds[:-1], bounds[1:])]
        position_ids[:, :, bounds[0]:bounds[-1]] = pack_position_ids([d for d, _ in docs])
        deltas = [delta(docs[-1][1])]  # decoding continues the last document
    else:
        deltas = []
        for b in range(B):
            keep = attention_mask[b].bool() if attention_mask is not None else slice(None)
            ids = input_ids[b][keep]
            pos, nxt = (_sequence_position_ids(ids, grids, merge, config, b) if len(ids)
                        else (position_ids.new_zeros(3, 0), 0))
            position_ids[:, b, keep] = pos
            deltas.append(delta(nxt))
    for kind, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if next(grids[kind], None) is not None:
            raise ValueError(f"{name} has more rows than there are runs of pad tokens in input_ids")
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).view(B, 1)
