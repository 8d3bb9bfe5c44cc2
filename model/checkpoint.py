"""Checkpoint I/O in the official Hugging Face layout: `config.json` + `model.safetensors`, or shards
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` (`metadata.total_size`, `weight_map`).

Loading is strict (missing / unexpected / mis-shaped keys are named), builds the model on the meta device and
streams tensors one at a time through `safetensors.safe_open`, converting each to the target dtype and device as it
is read, so peak host memory stays near one copy of the weights in the target dtype (`scripts/measure_load_memory.py`
measures it). Only safetensors are read: nothing is unpickled. `safe_open` validates every header (offsets in
order, contiguous, inside the file and matching each shape and dtype) before a byte is used, so a tampered
header is a CheckpointError, never aliased or garbage weights; shard names in the index must be strings that stay
inside the checkpoint directory (tests/test_checkpoint_and_config.py).

MoE expert tensors exist in two on-disk layouts: the official release (`gate_up_proj` [E, H, 2I], `down_proj`
[E, I, H], which is also our in-memory layout) and what transformers 5 `save_pretrained` writes ([E, 2I, H],
[E, H, I]). The layout is decided from the shapes; when H == 2I the shapes cannot tell and a `moe_layout` hint is
required. We always save the official layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import Qwen3VLConfig
from .qwen3vl import Qwen3VL
from .rope import TextRotary

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated, corrupted or does not match the model it describes
    (model checkpoints here, training checkpoints in `train/checkpoint.py`)."""


def _shard_files(path: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} for a checkpoint directory (single file or sharded)."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: malformed index ({type(e).__name__}: {e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX}: weight_map must be an object, got {type(weight_map).__name__}")
        files: dict[str, list[str]] = defaultdict(list)
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{path / INDEX}: weight_map[{name!r}] must be a file name, got {fname!r}"[:300])
            files[fname].append(name)
        root = path.resolve()
        for fname in files:
            # a shard name is a file name relative to the checkpoint: refuse '../x', absolute paths and symlinks
            # that resolve elsewhere, so an index cannot make us read files outside the directory it describes
            if not (path / fname).resolve().is_relative_to(root):
                raise CheckpointError(f"{path / INDEX} names shard {fname!r}, which resolves outside {path}")
            if not (path / fname).is_file():
                raise CheckpointError(f"{path / INDEX} names shard {fname}, which is missing from {path}")
        return dict(files)
    if (path / SINGLE).is_file():
        return {SINGLE: []}  # names read from the file itself
    raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX} found")


def _expert_transform(name: str, shape: tuple[int, ...], want: tuple[int, ...], layout: str | None) -> bool:
    """Whether an on-disk expert tensor must be transposed (dims 1, 2) to our layout; raises if undecidable."""
    official, transposed = tuple(want), (want[0], want[2], want[1])
    if official == transposed:  # H == 2I (gate_up) or I == H (down): the shapes cannot tell
        if layout is None:
            raise CheckpointError(
                f"{name}: shape {shape} fits both the official [E, H, 2I] and the transformers [E, 2I, H] layout "
                "(H == 2I); pass moe_layout='official' or moe_layout='transformers' to load_pretrained")
        return layout == "transformers"
    if layout is not None:
        expect = official if layout == "official" else transposed
        if shape != expect:
            raise CheckpointError(f"{name}: shape {shape} does not fit moe_layout={layout!r} (expected {expect})")
    if shape == official:
        return False
    if shape == transposed:
        return True
    raise CheckpointError(f"{name}: shape {shape} fits neither {official} nor {transposed}")


def _open_shard(path: Path):
    """safe_open one shard (tensors come out as CPU copies, one at a time); a malformed file is a CheckpointError."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (truncated, bad header) is not a public class in every version
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _read(f, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {e})") from e


def _load_shard(path: Path, names, model, params, expected, optional, moe_layout, dtype, device,
                seen, unexpected, misshaped):
    """Stream one safetensors file into the meta-built model, tensor by tensor."""
    with _open_shard(path) as f:
        keys = list(f.keys())
        if names and set(names) - set(keys):
            missing_in_file = sorted(set(names) - set(keys))[:5]
            raise CheckpointError(f"{path}: index lists {missing_in_file} but the file does not hold them")
        for name in keys:
            if name not in expected:
                unexpected.append(name)
                continue
            if name in optional:
                seen.add(name)
                continue
            shape, want = tuple(f.get_slice(name).get_shape()), expected[name]
            is_expert = bool(_EXPERT_RE.search(name))
            if (sorted(shape) != sorted(want) or len(shape) != 3) if is_expert else shape != want:
                misshaped.append(f"{name}: file {shape}, model {want}")
                continue
            # One tensor at a time: the source-dtype CPU tensor is dropped as soon as it is converted.
            t = _read(f, path, name)
            if is_expert and _expert_transform(name, shape, want, moe_layout):
                t = t.to(dtype).transpose(1, 2).contiguous()
            t = t.to(device=device, dtype=dtype)
            p = params[name]
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=p.requires_grad))
            seen.add(name)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    *, attn_backend: str | None = None, moe_backend: str | None = None,
                    moe_layout: str | None = None, progress: bool = True) -> Qwen3VL:
    """Load an official-layout checkpoint directory strictly.

    Args:
        path: directory with config.json and model.safetensors or sharded model-*.safetensors + index.json.
        dtype: target parameter dtype; device: target device (tensors are converted as they stream in).
        attn_backend: override the attention backend ("torch" | "triton"); moe_backend likewise for experts.
        moe_layout: None (infer from shapes), "official" or "transformers" (needed only when H == 2I).
    Returns: Qwen3VL in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if moe_layout not in (None, "official", "transformers"):
        raise ValueError(f"moe_layout must be None, 'official' or 'transformers', got {moe_layout!r}")
    config = Qwen3VLConfig.from_file(path / "config.json")
    if attn_backend is not None:
        config = config.replace(attn_backend=attn_backend)
    if moe_backend is not None and config.is_moe:
        config = config.replace(text=dataclasses.replace(
            config.text, moe=dataclasses.replace(config.text.moe, backend=moe_backend)))
    with torch.device("meta"):
        model = Qwen3VL(config, init_weights=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.text.tie_word_embeddings else set()
    params = dict(model.named_parameters(remove_duplicate=False))

    files = _shard_files(path)
    seen: set[str] = set()
    unexpected, misshaped = [], []
    bar = tqdm(total=len(files), desc=f"loading {path.name}", unit="shard", disable=not progress or len(files) < 2)
    for fname, names in files.items():
        _load_shard(path / fname, names, model, params, expected, optional, moe_layout, dtype, device,
                    seen, unexpected, misshaped)
        bar.update(1)
    bar.close()
    missing = sorted(set(expected) - seen - optional)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:10]}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): {misshaped[:10]}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems))
    # Non-persistent buffers (rotary tables) were built on the meta device: rebuild them for real.
    model.rotary = TextRotary(config.text).to(device)
    model.tie_weights()
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"cannot parse shard size {size!r} (use e.g. '5GB', '500MB' or bytes)")
    unit = m.group(2).upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(model: Qwen3VL, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json and the weights in the official layout (sharded with an index when over max_shard_size).

    Files are written under temporary names and renamed into place, so a crash never leaves a half-written shard
    under its final name. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    sd = model.state_dict()
    if model.config.text.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the official files omit it
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    for stale in list(path.glob("model-*-of-*.safetensors")) + [path / SINGLE, path / INDEX]:
        stale.unlink(missing_ok=True)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                 for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        tmp = path / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: fname for fname, s in zip(names, shards) for k in s}}
        _atomic_write(path / INDEX, json.dumps(index, indent=2, sort_keys=True))
    _atomic_write(path / "config.json", json.dumps(model.config.to_hf(), indent=2))
    return path


def _atomic_write(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
