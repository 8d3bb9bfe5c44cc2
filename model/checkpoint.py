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

Fine-grained FP8 checkpoints (the official `*-Instruct-FP8` releases; model/fp8.py has the layout) are recognised by
the companion `<weight>_scale_inv` tensor of every float8_e4m3fn weight, which requires the `quantization_config`
in config.json. `load_pretrained(fp8="dequantize")` (the default) turns each FP8 tensor into `dtype` as it streams
in (one tensor at a time in fp32, never the whole model); `fp8="keep"` keeps the weights of linear layers in FP8
(`model.fp8.FP8Linear`, W8A16) and dequantises the rest (MoE experts). `save_pretrained(fp8=...)` writes the layout
back, quantising as transformers' `Fp8Quantize` does (weights whose last two dims are not multiples of the block
stay unquantised and are listed in `modules_to_not_convert`).
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
from .fp8 import FP8_BACKENDS, FP8_DTYPE, SCALE_SUFFIX, FP8Config, FP8Linear, dequantize_blockwise, \
    quantize_blockwise, scale_name, weight_name
from .qwen3vl import Qwen3VL
from .rope import TextRotary

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
# one expert's projection, as the official FP8 MoE checkpoints store experts (per expert, nn.Linear [out, in])
_PER_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FP8_MODES = ("dequantize", "keep")


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


def _tensor_files(path: Path, files: dict[str, list[str]]) -> dict[str, str]:
    """{tensor name: shard file} over the whole checkpoint (a single file's names come from its header)."""
    where = {}
    for fname, names in files.items():
        if not names:
            with _open_shard(path / fname) as f:
                names = list(f.keys())
        where.update((n, fname) for n in names)
    return where


class _Scales:
    """Reads a weight's `_scale_inv` companion, from the shard being streamed or from another one."""

    def __init__(self, path: Path, where: dict[str, str], quant: FP8Config | None):
        self.path, self.where, self.quant = path, where, quant

    def dequantize(self, f, fname: str, name: str, t: torch.Tensor) -> torch.Tensor:
        """FP8 tensor `name` (read from shard `fname`, open as `f`) -> fp32, with its block scales."""
        sname = scale_name(name)
        if sname not in self.where:
            raise CheckpointError(f"{self.path / fname}: {name} is float8_e4m3fn but its scale tensor {sname} "
                                  "is missing from the checkpoint")
        if self.where[sname] == fname:
            s = _read(f, self.path / fname, sname)
        else:
            with _open_shard(self.path / self.where[sname]) as g:
                s = _read(g, self.path / self.where[sname], sname)
        try:
            return dequantize_blockwise(t, s, self.quant.weight_block_size)
        except ValueError as e:
            raise CheckpointError(f"{self.path / self.where[sname]}: {sname}: {e}") from None


class _PerExpert:
    """Assembles per-expert tensors (`experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I])
    into our fused `experts.gate_up_proj` [E, H, 2I] and `experts.down_proj` [E, I, H], piece by piece."""

    def __init__(self, model, params, expected, dtype, device):
        self.model, self.params, self.expected, self.dtype, self.device = model, params, expected, dtype, device
        self.filled: dict[str, set[tuple[int, str]]] = defaultdict(set)

    def target(self, name: str) -> tuple[str, int, str] | None:
        """(fused parameter name, expert index, projection) when `name` is a per-expert tensor of ours."""
        m = _PER_EXPERT_RE.match(name)
        if not m:
            return None
        fused = f"{m.group(1)}.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}"
        if fused not in self.expected or int(m.group(2)) >= self.expected[fused][0]:
            return None
        return fused, int(m.group(2)), m.group(3)

    def put(self, name: str, fused: str, e: int, proj: str, t: torch.Tensor):
        """Copy one expert's projection (transposed to our layout) into the fused parameter."""
        E, rows, cols = self.expected[fused]
        want = (cols // 2, rows) if proj != "down_proj" else (cols, rows)  # nn.Linear [out, in]
        if tuple(t.shape) != want:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)}, expected {want} for {fused} {(E, rows, cols)}")
        mod_name, _, attr = fused.rpartition(".")
        mod = self.model.get_submodule(mod_name)
        if not self.filled[fused]:  # first piece: materialise the fused parameter from the meta device
            setattr(mod, attr, torch.nn.Parameter(torch.empty((E, rows, cols), dtype=self.dtype, device=self.device),
                                                  requires_grad=self.params[fused].requires_grad))
        dst = getattr(mod, attr).data[e]
        if proj == "gate_proj":
            dst = dst[:, : cols // 2]
        elif proj == "up_proj":
            dst = dst[:, cols // 2:]
        with torch.no_grad():
            dst.copy_(t.T)
        self.filled[fused].add((e, proj))

    def _absent(self, fused: str) -> list[str]:
        need = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}[fused.rpartition(".")[2]]
        prefix = fused.rpartition(".")[0]
        return [f"{prefix}.{e}.{p}.weight" for e in range(self.expected[fused][0]) for p in need
                if (e, p) not in self.filled[fused]]

    def complete(self) -> set[str]:
        """The fused parameters every piece of which arrived; the others stay missing."""
        return {f for f in self.filled if not self._absent(f)}

    def missing_pieces(self) -> list[str]:
        """The per-expert tensors absent from fused parameters that some pieces did arrive for."""
        return [n for f in sorted(self.filled) for n in self._absent(f)]


def _load_shard(path: Path, names, model, params, expected, optional, moe_layout, dtype, device,
                seen, unexpected, misshaped, scales: _Scales, per_expert: _PerExpert):
    """Stream one safetensors file into the meta-built model, tensor by tensor."""
    with _open_shard(path) as f:
        keys = list(f.keys())
        if names and set(names) - set(keys):
            missing_in_file = sorted(set(names) - set(keys))[:5]
            raise CheckpointError(f"{path}: index lists {missing_in_file} but the file does not hold them")
        for name in keys:
            if (piece := per_expert.target(name)) is not None:
                t = _read(f, path, name)
                if t.dtype == FP8_DTYPE:
                    t = scales.dequantize(f, path.name, name, t)
                per_expert.put(name, *piece, t)
                continue
            if name not in expected:
                # an FP8 scale is consumed with its weight (fp8="dequantize"), if that weight is ours
                if not (name.endswith(SCALE_SUFFIX) and (weight_name(name) in expected
                                                         or per_expert.target(weight_name(name)))):
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
            p = params[name]
            keep = p.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX)  # an FP8Linear's own tensors (fp8="keep")
            if p.dtype == FP8_DTYPE and t.dtype != FP8_DTYPE:
                raise CheckpointError(f"{path}: {name} is {t.dtype}, expected float8_e4m3fn (it has a scale tensor)")
            if t.dtype == FP8_DTYPE and not keep:
                t = scales.dequantize(f, path.name, name, t)
            elif t.dtype != FP8_DTYPE and scale_name(name) in scales.where:
                raise CheckpointError(f"{path}: {name} is {t.dtype}, but {scale_name(name)} exists; an FP8 weight "
                                      "must be float8_e4m3fn")
            elif t.dtype.itemsize == 1 and t.dtype.is_floating_point and not keep:
                raise CheckpointError(f"{path}: {name} is {t.dtype}; only float8_e4m3fn FP8 weights are supported")
            if is_expert and _expert_transform(name, shape, want, moe_layout):
                t = t.to(dtype).transpose(1, 2).contiguous()
            t = t.to(device=device, dtype=p.dtype if keep else dtype)
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=p.requires_grad))
            seen.add(name)


def _keep_fp8_linears(model: Qwen3VL, fp8_weights: set[str], block: tuple[int, int], backend: str) -> None:
    """Swap every nn.Linear whose checkpoint weight is FP8 for an FP8Linear (on the meta device)."""
    for w in sorted(fp8_weights):
        mod_name, _, attr = w.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            continue  # not ours: reported as unexpected
        if attr == "weight" and type(mod) is torch.nn.Linear:
            model.set_submodule(mod_name, FP8Linear(mod.in_features, mod.out_features, mod.bias is not None, block,
                                                    backend, device="meta"))


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    *, attn_backend: str | None = None, moe_backend: str | None = None,
                    moe_layout: str | None = None, fp8: str = "dequantize", fp8_backend: str = "auto",
                    progress: bool = True) -> Qwen3VL:
    """Load an official-layout checkpoint directory strictly (bf16 / fp32 or fine-grained FP8 weights).

    Args:
        path: directory with config.json and model.safetensors or sharded model-*.safetensors + index.json.
        dtype: target parameter dtype; device: target device (tensors are converted as they stream in).
        attn_backend: override the attention backend ("torch" | "triton"); moe_backend likewise for experts.
        moe_layout: None (infer from shapes), "official" or "transformers" (needed only when H == 2I).
        fp8: for FP8 checkpoints: "dequantize" every FP8 tensor to `dtype` while loading, or "keep" the weights of
            linear layers in FP8 (`FP8Linear`; MoE experts are still dequantised). Ignored for other checkpoints.
        fp8_backend: FP8Linear's matmul with fp8="keep": "auto" (Triton for up to 2,048 rows on CUDA, else
            "torch"), "torch" (dequantise, then F.linear) or "triton" (kernels.fp8_linear).
    Returns: Qwen3VL in eval mode; its config keeps `quantization` only with fp8="keep".
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if moe_layout not in (None, "official", "transformers"):
        raise ValueError(f"moe_layout must be None, 'official' or 'transformers', got {moe_layout!r}")
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    if fp8_backend not in FP8_BACKENDS:
        raise ValueError(f"fp8_backend must be one of {FP8_BACKENDS}, got {fp8_backend!r}")
    config = Qwen3VLConfig.from_file(path / "config.json")
    files = _shard_files(path)
    where = _tensor_files(path, files)
    fp8_weights = {weight_name(n) for n in where if n.endswith(SCALE_SUFFIX)}
    quant = config.quantization
    if fp8_weights and quant is None:
        raise CheckpointError(f"{path}: holds FP8 scale tensors (e.g. {scale_name(min(fp8_weights))}) but config.json "
                              "has no quantization_config")
    keep = fp8 == "keep" and bool(fp8_weights)
    if not keep:
        config = config.replace(quantization=None)  # the model holds real weights
    if attn_backend is not None:
        config = config.replace(attn_backend=attn_backend)
    if moe_backend is not None and config.is_moe:
        config = config.replace(text=dataclasses.replace(
            config.text, moe=dataclasses.replace(config.text.moe, backend=moe_backend)))
    with torch.device("meta"):
        model = Qwen3VL(config, init_weights=False)
    if keep:
        _keep_fp8_linears(model, fp8_weights, quant.weight_block_size, fp8_backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.text.tie_word_embeddings else set()
    params = dict(model.named_parameters(remove_duplicate=False))

    scales = _Scales(path, where, quant)
    per_expert = _PerExpert(model, params, expected, dtype, device)
    seen: set[str] = set()
    unexpected, misshaped = [], []
    bar = tqdm(total=len(files), desc=f"loading {path.name}", unit="shard", disable=not progress or len(files) < 2)
    for fname, names in files.items():
        _load_shard(path / fname, names, model, params, expected, optional, moe_layout, dtype, device,
                    seen, unexpected, misshaped, scales, per_expert)
        bar.update(1)
    bar.close()
    seen |= per_expert.complete()
    missing = sorted(set(expected) - seen - optional)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:10]}")
    if pieces := per_expert.missing_pieces():
        problems.append(f"missing expert tensors ({len(pieces)}): {pieces[:10]}")
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


def _fp8_state_dict(model: Qwen3VL, quant: FP8Config, dtype: torch.dtype | None
                    ) -> tuple[dict[str, torch.Tensor], FP8Config]:
    """The state dict in the fine-grained FP8 layout, and the quantization_config that describes it.

    Quantised: the weight of every nn.Linear that `quant.converts` (the MoE router, `mlp.gate`, never: transformers
    keeps it a plain router) and the MoE experts, written per expert (`experts.{e}.{gate,up,down}_proj.weight`, the
    official FP8 MoE layout), when the quantised matrices' dims are multiples of the block;
    like transformers' `Fp8Quantize`, other weights stay unquantised and their modules join `modules_to_not_convert`.
    FP8Linear modules are written as they are. Tensors are quantised one at a time (fp32 transient per tensor).
    """
    block = quant.weight_block_size
    skipped = set()
    targets: set[str] = set()  # parameter names to quantise
    for mod_name, mod in model.named_modules():
        if isinstance(mod, FP8Linear):
            if mod.block != block:
                raise ValueError(f"{mod_name} holds FP8 weights with blocks {mod.block}, not {block}")
            continue
        if mod_name == "lm_head" and model.config.text.tie_word_embeddings:
            continue  # tied to the (unquantised) embeddings; not written
        if type(mod) is torch.nn.Linear:
            shapes = {f"{mod_name}.weight": tuple(mod.weight.shape)}
        elif mod_name.endswith(".mlp.experts") and hasattr(mod, "gate_up_proj"):
            E, H, I2 = mod.gate_up_proj.shape
            # quantised per expert as nn.Linear weights [out, in]: gate / up [I, H], down [H, I]
            shapes = {f"{mod_name}.gate_up_proj": (I2 // 2, H), f"{mod_name}.down_proj": (H, I2 // 2)}
        else:
            continue
        divisible = all(n % block[0] == 0 and k % block[1] == 0 for n, k in shapes.values())
        if mod_name.endswith(".mlp.gate") or not quant.converts(mod_name) or not divisible:
            skipped.add(mod_name)
        else:
            targets.update(shapes)
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name in targets and _EXPERT_RE.search(name):
            # the official FP8 MoE layout: one FP8 nn.Linear weight (+ scale) per expert and projection
            prefix, _, kind = name.rpartition(".")
            for e in range(t.shape[0]):
                if kind == "down_proj":
                    pieces = {"down_proj": t[e].T}                                     # [H, I]
                else:
                    gate, up = t[e].chunk(2, dim=-1)                                     # [H, I] each
                    pieces = {"gate_proj": gate.T, "up_proj": up.T}
                for proj, w in pieces.items():
                    q, s = quantize_blockwise(w, block)
                    wname = f"{prefix}.{e}.{proj}.weight"
                    sd[wname], sd[scale_name(wname)] = q.cpu(), s.cpu()
        elif name in targets:
            q, s = quantize_blockwise(t, block)
            sd[name], sd[scale_name(name)] = q.cpu(), s.cpu()
        elif t.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX):
            sd[name] = t.to("cpu")
        else:
            sd[name] = t.to("cpu", dtype or t.dtype)
    # list the unquantised modules by full name, except those the user's patterns already cover
    extra = sorted(m for m in skipped if quant.converts(m))
    return sd, FP8Config(block, quant.modules_to_not_convert + tuple(extra), quant.activation_scheme, quant.fmt)


def save_pretrained(model: Qwen3VL, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, fp8: FP8Config | bool | None = None) -> Path:
    """Write config.json and the weights in the official layout (sharded with an index when over max_shard_size).

    Args:
        dtype: dtype of the written (unquantised) tensors; None keeps each tensor's dtype.
        fp8: None: write the model as it is (FP8Linear modules, from load_pretrained(fp8="keep"), stay FP8 with the
            model's quantization_config; its dequantised MoE experts are quantised back). True (FP8Config(): 128 x 128
            blocks, lm_head left in bf16) or an FP8Config: quantise to the fine-grained FP8 layout of the official
            `*-FP8` checkpoints. False: unquantised (refused for a model holding FP8Linear weights).
    Files are written under temporary names and renamed into place, so a crash never leaves a half-written shard
    under its final name. Returns the directory.
    """
    path = Path(path)
    limit = _parse_size(max_shard_size)
    config = model.config
    has_fp8 = any(isinstance(m, FP8Linear) for m in model.modules())
    if fp8 is True or (fp8 is None and has_fp8):
        fp8 = FP8Config() if fp8 is True or config.quantization is None else config.quantization
    if fp8 is False:
        if has_fp8:
            raise ValueError("fp8=False, but the model holds FP8Linear weights (loaded with fp8='keep'); load the "
                             "checkpoint with fp8='dequantize' to save it unquantised")
        fp8 = None
    if fp8 is not None and not isinstance(fp8, FP8Config):
        raise TypeError(f"fp8 must be None, a bool or an FP8Config, got {type(fp8).__name__}")
    if fp8 is not None:
        sd, quant = _fp8_state_dict(model, fp8, dtype)
        config = config.replace(quantization=quant)
    else:
        sd = {name: t.detach().to("cpu", dtype or t.dtype) for name, t in model.state_dict().items()}
        config = config.replace(quantization=None)
    path.mkdir(parents=True, exist_ok=True)
    if config.text.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the official files omit it
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        t = t.contiguous()
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
    _atomic_write(path / "config.json", json.dumps(config.to_hf(), indent=2))
    return path


def _atomic_write(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
