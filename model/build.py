"""Building a model from a small typed description, for every entry point (training, evaluation, notebooks).

`ModelSpec` says which model: a preset (random init, with field overrides) or a checkpoint directory, and the
dtype of its weights; `build_model(spec, device)` makes it. Hydra's `model.*` keys (conf/model/*.yaml) are the
fields of `ModelSpec`; `config_from_dict` turns a composed config (a plain nested dict) into such dataclasses
strictly: an unknown key, a missing required key or a value of the wrong type raises a `ConfigError` naming the
key path (torchtitan's JobConfig and litgpt's dataclass configs follow the same rule). Plain Python: no Hydra here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .config import ConfigError, Qwen3VLConfig, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build.

    Args:
        preset: name for `model.preset(...)` (random init) when `path` is None.
        path: checkpoint directory in the official safetensors layout (`load_pretrained`); wins over `preset`.
        text / vision / top: field overrides applied with `dataclasses.replace` on the preset's `.text`,
            `.vision` and top-level `Qwen3VLConfig` (ignored when loading from `path`, except `top`).
        dtype: dtype of the weights (float32 or bfloat16); training sets autocast separately.
    """
    preset: str = "tiny"
    path: Optional[str] = None
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"config: model.dtype={self.dtype!r} is invalid; expected float32|bfloat16")


def _replace_nested(dc, overrides: dict, where: str):
    """dataclasses.replace that recurses into nested dataclass fields and turns lists into tuples."""
    fields = {f.name for f in dataclasses.fields(dc)}
    kw = {}
    for k, v in overrides.items():
        if k not in fields:
            raise ValueError(f"config: unknown field {where}.{k}; valid: {sorted(fields)}")
        cur = getattr(dc, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            v = _replace_nested(cur, v, f"{where}.{k}")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return dataclasses.replace(dc, **kw)


def model_config(spec: ModelSpec) -> Qwen3VLConfig:
    """The Qwen3VLConfig a random-init model gets: the preset with text / vision / top overrides applied."""
    base = preset(spec.preset)
    text = _replace_nested(base.text, spec.text, "model.text")
    vis_over = dict(spec.vision)
    vis_over.setdefault("out_hidden_size", text.hidden_size)    # the merger projects into the LLM width
    vision = _replace_nested(base.vision, vis_over, "model.vision")
    return _replace_nested(dataclasses.replace(base, text=text, vision=vision), spec.top, "model.top")


def build_model(spec: ModelSpec, device: str | torch.device = "cpu"):
    """Qwen3VL from `spec.path` (load_pretrained) or a random-init preset (seed the global RNG first).

    Args:
        spec: ModelSpec.  device: where the parameters live.
    Returns: Qwen3VL in train mode, as every new nn.Module (evaluation calls `.eval()`).
    """
    from .checkpoint import load_pretrained
    from .qwen3vl import Qwen3VL

    dtype = DTYPES[spec.dtype]
    if spec.path:
        m = load_pretrained(spec.path, dtype=dtype, device=device, progress=False,
                            attn_backend=spec.top.get("attn_backend"))
    else:
        m = Qwen3VL(model_config(spec)).to(device=device, dtype=dtype)
    return m.train()


# ----------------------------------------------------------------------------------------------- typed configs
def config_from_dict(d: dict, cls: type, path: str = "") -> Any:
    """Convert a plain nested dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`) into dataclass `cls`.

    Args:
        d: nested dict of plain Python values; every key must be a field of `cls` (recursively).
        cls: the dataclass to build.
        path: key prefix for error messages.
    Raises:
        ConfigError naming the offending key path for unknown keys or wrong types.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"config: {path or '<root>'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = path or "<root>"
        raise ConfigError(f"config: unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _convert(value, tp, path):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(value, tp, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {path} must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {path} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {path} must be a string, got {value!r}")
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {path} must be a list, got {value!r}")
        return tuple(value)
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config: {path} must be a mapping, got {value!r}")
        return dict(value)
    return value
