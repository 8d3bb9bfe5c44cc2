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

References: Qwen2-VL (Wang et al. 2024) MRoPE; transformers' Qwen3VLModel.get_rope_index.
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


def _sequence_position_ids(ids: torch.Tensor, grids: dict, merge: int, config, b: int) -> torch.Tensor:
    """The prefill rule on one unpadded, non-empty sequence: (L,) long ids -> (3, L) long positions.

    `grids` maps 1 (image) / 2 (video group) to an iterator of (t, h, w) rows, consumed in order of appearance.
    """
    device = ids.device
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
            t, h, w = next(grids[kind])
        except StopIteration:
            raise ValueError(f"sample {b}: more runs of {what} pad tokens than {what}_grid_thw rows") from None
        hh, ww = h // merge, w // merge
        if t * hh * ww != n:
            raise ValueError(f"sample {b}: a run of {n} {what} pad tokens does not match "
                             f"its grid (t={t}, h={h}, w={w}) -> {t * hh * ww} tokens")
        tpos = torch.arange(t, device=device).view(t, 1, 1).expand(t, hh, ww)
        hpos = torch.arange(hh, device=device).view(1, hh, 1).expand(t, hh, ww)
        wpos = torch.arange(ww, device=device).view(1, 1, ww).expand(t, hh, ww)
        pieces.append(torch.stack([tpos, hpos, wpos]).reshape(3, -1) + pos)
        pos += max(hh, ww)
    return torch.cat(pieces, dim=1)


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
        cu_seqlens: (n_docs + 1,) int32 for a packed batch (B == 1): positions restart in every document
            (`pack_position_ids`).
    Returns:
        position_ids (3, B, L) long, rope_deltas (B, 1) long such that a token decoded at cache length c sits at
        position c + rope_delta on all three axes (`decode_position_ids`; c counts padding, so the first new token
        is at max + 1).
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

    def delta(pos: torch.Tensor) -> int:
        return int(pos.max()) + 1 - L if pos.numel() else -L

    if cu_seqlens is not None:
        if B != 1 or attention_mask is not None:
            raise ValueError("cu_seqlens (packed batch) needs B == 1 and no attention_mask")
        bounds = cu_seqlens.tolist()
        docs = [_sequence_position_ids(input_ids[0, s:e], grids, merge, config, 0) if e > s
                else position_ids.new_zeros(3, 0) for s, e in zip(bounds[:-1], bounds[1:])]
        position_ids[:, :, bounds[0]:bounds[-1]] = pack_position_ids(docs)
        deltas = [delta(docs[-1])]  # decoding continues the last document
    else:
        deltas = []
        for b in range(B):
            keep = attention_mask[b].bool() if attention_mask is not None else slice(None)
            ids = input_ids[b][keep]
            pos = _sequence_position_ids(ids, grids, merge, config, b) if len(ids) else position_ids.new_zeros(3, 0)
            position_ids[:, b, keep] = pos
            deltas.append(delta(pos))
    for kind, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if next(grids[kind], None) is not None:
            raise ValueError(f"{name} has more rows than there are runs of pad tokens in input_ids")
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).view(B, 1)
