"""LoRA (Hu et al., 2021, arXiv:2106.09685) on chosen nn.Linear modules, with merge / unmerge and PEFT-format I/O.

`apply_lora(model, ...)` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the same `weight` / `bias`
Parameters (so the official names `...q_proj.weight` are unchanged) and adds `lora_A` (r, in) and `lora_B`
(out, r) with PEFT's defaults (A Kaiming-uniform, B zero, scale alpha / r):  y = x W^T + b + s * B(A(drop(x))).

Adapters are saved in PEFT's layout: `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and `adapter_config.json` (peft_type LORA),
so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads them; our module paths are the official
checkpoint names, which are transformers' module names. `merge_lora` folds the adapters into the base weights
for export; `unmerge_lora` takes them out again (exact up to fp rounding).
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank adapter; shares `weight` and `bias` with the Linear it replaces."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))       # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., in_features). Returns (..., out_features)."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense (out, in) matrix: scaling * B @ A (computed in fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into `weight` (forward then skips the adapter)."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the adapter from `weight` again."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the current (merged or base) weight and bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _is_target(name: str, targets, exclude_vision: bool) -> bool:
    if exclude_vision and (name.startswith("model.visual.") or ".visual." in name):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, target_modules=("q_proj", "v_proj"),
               exclude_vision: bool = True) -> list[str]:
    """Replace targeted nn.Linear modules by LoRALinear in place and freeze everything but the adapters.

    Args:
        model: the model (e.g. Qwen3VL); module names are the official checkpoint names.
        r, alpha, dropout: LoRA rank, scale numerator, dropout on the adapter input.
        target_modules: module-name suffixes (PEFT semantics), e.g. ("q_proj", "v_proj").
        exclude_vision: only adapt modules outside `model.visual`.
    Returns:
        the adapted module names.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and _is_target(n, target_modules,
                                                                                           exclude_vision)]
    if not names:
        raise ValueError(f"LoRA: no nn.Linear matches target_modules={list(target_modules)} "
                         f"(exclude_vision={exclude_vision})")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        parent_name, _, leaf = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear for every adapter in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module):
    """Fold every adapter into its base weight."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    """Take every adapter out of its base weight again."""
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True):
    """Replace each LoRALinear by a plain nn.Linear (merged first when `merge`), e.g. before `save_pretrained`."""
    for n, m in lora_modules(model).items():
        if merge:
            m.merge()
        parent_name, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, m.to_linear())


def _target_regex(names: list[str]) -> str:
    """A full-match regex for PEFT's target_modules covering exactly `names` (layer indices folded to \\d+)."""
    pats = sorted({re.sub(r"\.(\d+)\.", ".<n>.", n) for n in names})
    pats = [re.escape(p).replace("<n>", r"\d+") for p in pats]
    return "^(?:" + "|".join(pats) + ")$"


def save_lora_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None):
    """Write `adapter_model.safetensors` + `adapter_config.json` in PEFT's layout (unmerged adapter weights).

    Args:
        model: a model with LoRALinear modules.
        path: output directory (created).
        base_model_name_or_path: recorded in adapter_config.json (PEFT uses it only as a hint).
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_lora_adapter: the model has no LoRA modules")
    r = {m.r for m in mods.values()}
    alpha = {m.alpha for m in mods.values()}
    if len(r) != 1 or len(alpha) != 1:
        raise ValueError(f"save_lora_adapter: mixed ranks {r} / alphas {alpha} are not supported")
    tensors = {}
    for n, m in mods.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    dropout = next(iter(mods.values())).lora_dropout
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r.pop(), "lora_alpha": alpha.pop(), "lora_dropout": getattr(dropout, "p", 0.0),
        "target_modules": _target_regex(list(mods)), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load_lora_adapter(model: nn.Module, path: str):
    """Apply adapters saved by `save_lora_adapter` (or PEFT) to `model`: creates LoRALinear modules and loads A, B.

    Args:
        model: the base model (without adapters).
        path: directory with adapter_model.safetensors and adapter_config.json.
    """
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    names = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in sd})
    for n in names:
        parent_name, _, leaf = n.rpartition(".")
        try:
            base = model.get_submodule(n)
        except AttributeError as e:
            raise KeyError(f"{path}: adapter for {n!r}, which the model does not have") from e
        m = LoRALinear(base, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
        with torch.no_grad():
            m.lora_A.weight.copy_(sd[f"base_model.model.{n}.lora_A.weight"])
            m.lora_B.weight.copy_(sd[f"base_model.model.{n}.lora_B.weight"])
        setattr(model.get_submodule(parent_name), leaf, m)
    return names
