"""Shared helpers for the training tests (no tests here): a small synthetic OCR set and a small-model config.
Their fixtures (`data`, `single_thread`) are in tests/conftest.py.

The model is the `tiny` preset shrunk further (hidden 64, 2 decoder layers, 2 ViT blocks, one DeepStack level)
but with the real 151,936 vocabulary, so the chunked loss and the embedding behave as in real runs.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch

from train.config import OCRGenConfig, config_from_dict
from train.ocr_data import generate_ocr_dataset

SMALL_MODEL = {
    "preset": "tiny",
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32},
    "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
               "deepstack_visual_indexes": [0]},
}


def ocr_set(root, n_train: int = 48, n_val: int = 6, seed: int = 0) -> dict:
    """Generate (or reuse) a small digits OCR set under `root`; returns {"train": path, "val": path}."""
    return generate_ocr_dataset(OCRGenConfig(enabled=True, n_train=n_train, n_val=n_val, seed=seed, min_len=2,
                                             max_len=5), out_dir=os.path.join(str(root), f"ocr_{n_train}_{seed}"))


def small_config(paths: dict, out_dir, **overrides):
    """A typed Config for fast CPU runs; `overrides` are nested dicts merged into the defaults (e.g. train={...})."""
    d = {
        "name": "test",
        "model": copy.deepcopy(SMALL_MODEL),
        "data": {"train": paths["train"], "val": paths["val"], "token_budget": 160, "max_seq_len": 64,
                 "shuffle": True},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "train": {"out_dir": str(out_dir), "steps": 6, "seed": 0, "eval_every": 0, "eval_samples": 0,
                  "save_every": 0, "export": False, "log_every": 1000, "loss_chunk_size": 64},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
    }
    for k, v in overrides.items():
        d.setdefault(k, {})
        _merge(d[k], v) if isinstance(v, dict) else d.__setitem__(k, v)
    return config_from_dict(d)


def _merge(dst: dict, src: dict):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


@contextlib.contextmanager
def one_thread():
    """Run tiny CPU training with one intra-op thread: at these sizes threading costs more than it gives, and
    on a shared 2-core machine a second spinning thread slows every op several-fold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def params_snapshot(model) -> dict[str, torch.Tensor]:
    """Detached clones of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def chatty_model(cfg):
    """The config's random model (seed 0, eval mode) with larger weights: a fresh model answers "\n" to everything,
    this one answers varied text, so CER comparisons have something to compare."""
    import torch

    from model.build import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    return model
