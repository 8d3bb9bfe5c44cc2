"""Scoring for the long-context evaluations: teacher-forced answer matching (V-NIAH / LongVA protocol).
(Character error rate for generated text is in eval/metrics.py.)

Teacher forcing: the gold answer is appended to the prompt and the sample counts as correct only if the argmax of
the logits at every answer position equals the gold token (Zhang et al. 2024, "Long Context Transfer from Language
to Vision", V-NIAH). One forward pass per sample, no sampling noise, and only A + 1 positions get logits.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_correct(model, inputs: dict, answer_ids: list[int]) -> tuple[bool, float]:
    """Whether the model's argmax reproduces `answer_ids` after the prompt, and the fraction of answer tokens right.

    Args:
        model: Qwen3VL. inputs: processor output for ONE prompt ending with the generation prompt
            (input_ids (1, P), pixel tensors ...). answer_ids: gold answer token ids (A,).
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("teacher_forced_correct scores one prompt at a time")
    if not answer_ids:
        raise ValueError("empty answer")
    dev = model.device
    ans = torch.tensor([answer_ids], device=dev)
    ids = torch.cat([inputs["input_ids"].to(dev), ans], dim=1)
    kw = {k: v.to(dev) for k, v in inputs.items()
          if k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kw:
            kw[k] = kw[k].to(model.dtype)
    A = len(answer_ids)
    # logits at positions P-1 .. P+A-2 predict the A answer tokens: the last A+1 positions, minus the final one
    logits = model(ids, logits_to_keep=A + 1, **kw).logits[0, :A]
    hits = logits.argmax(-1) == ans[0]
    return bool(hits.all()), float(hits.float().mean())
