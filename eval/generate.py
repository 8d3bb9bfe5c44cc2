"""Batched greedy generation for evaluation: left-pad a list of encoded prompts into one batch and decode.

Left padding keeps every prompt's last token in the last column, so one `model.generate` call (model/generation.py,
KV cache) continues all of them; the attention mask hides the pads (and is dropped when nothing is padded).
"""
from __future__ import annotations

import torch

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@torch.no_grad()
def generate_batch(model, prompts: list, tokenizer, max_new_tokens: int, device, return_ids: bool = False,
                   **sampling) -> list:
    """Greedy (default) or sampled answers for encoded prompts, as one left-padded batch.

    Args:
        model: Qwen3VL.  prompts: objects with `input_ids` (P_i,) long and the media tensors `pixel_values`,
            `image_grid_thw`, `pixel_values_videos`, `video_grid_thw` (or None), e.g. train.data.Encoded.
        tokenizer: with `pad_token_id` and `batch_decode`.  max_new_tokens: answer budget.  device: the model's.
        return_ids: return the new token ids (pads dropped) instead of stripped strings.
        sampling: `model.generate` options (do_sample, temperature, top_k, top_p, generator); none = greedy.
    Returns: one answer per prompt, in order. Autocast, if any, is the caller's context.
    """
    L = max(p.input_ids.numel() for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - p.input_ids.numel():] = p.input_ids
        mask[r, L - p.input_ids.numel():] = 1
    kw = {}
    for key in MEDIA_KEYS:
        parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
        if parts:
            kw[key] = torch.cat(parts).to(device)
    out = model.generate(ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None,
                         max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling, **kw)
    new = out[:, L:].cpu()
    if return_ids:
        return [[t for t in row.tolist() if t != pad] for row in new]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
