"""Optimisation setup: parameter groups, freezing, AdamW with per-group learning rates, the learning-rate schedule.

Groups follow the official parameter names (model.visual.*, model.language_model.*, lm_head), so freezing and
per-group learning rates work the same for a preset, a loaded checkpoint and a LoRA-wrapped model.
"""
from __future__ import annotations

import math

import torch

from .config import FreezeConfig, OptimConfig


def param_group(name: str) -> str:
    """Which freezing / learning-rate group a parameter belongs to.

    Args:
        name: parameter name in the official layout (e.g. `model.visual.blocks.0.attn.qkv.weight`).
    Returns:
        one of lora, deepstack, merger, vision, lm_head, embed, llm.
    """
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.startswith("model.visual.deepstack_merger_list."):
        return "deepstack"
    if name.startswith("model.visual.merger."):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.language_model.embed_tokens."):
        return "embed"
    return "llm"


def apply_freezing(model: torch.nn.Module, freeze: FreezeConfig) -> dict[str, int]:
    """Set requires_grad=False on every parameter of the frozen groups; returns trainable counts per group.

    A tied lm_head shares the embedding parameter, so it follows the `embed` group.
    """
    counts: dict[str, int] = {}
    for n, p in model.named_parameters():
        g = param_group(n)
        if g != "lora" and getattr(freeze, g):
            p.requires_grad_(False)
        if p.requires_grad:
            counts[g] = counts.get(g, 0) + p.numel()
    if not counts:
        raise ValueError("every parameter is frozen: nothing to train (check train.freeze / train.mode)")
    return counts


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one param group per (module group, decay / no decay).

    Args:
        model: the model (frozen parameters are left out).
        cfg: OptimConfig; `module_lr[group]` overrides `lr`; no weight decay on 1-D params (norms, biases).
    """
    groups: dict[tuple[str, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((param_group(n), p.ndim >= 2), []).append(p)
    param_groups = []
    for (g, decay), ps in sorted(groups.items()):
        lr = cfg.module_lr.get(g, cfg.lr)
        param_groups.append({"params": ps, "lr": lr, "base_lr": lr, "name": f"{g}{'' if decay else '.no_decay'}",
                             "weight_decay": cfg.weight_decay if decay else 0.0})
    kw = {"fused": True} if cfg.fused else {"foreach": True}  # foreach: one kernel per op for all params (CPU too)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    Args:
        step: steps already taken.  total: planned steps.  cfg: warmup_steps, min_lr_ratio.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
