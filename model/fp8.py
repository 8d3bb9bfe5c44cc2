"""Fine-grained FP8 weights: the layout of the official `Qwen/Qwen3-VL-*-Instruct-FP8` checkpoints.

The layout is DeepSeek-V3's block-wise FP8 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", sec. 3.3.2) as
transformers reads and writes it (`FineGrainedFP8Config` in transformers/utils/quantization_config.py, `Fp8Quantize`
/ `Fp8Dequantize` in transformers/integrations/finegrained_fp8.py):

- a weight `W` [..., N, K] is stored as `float8_e4m3fn` under its own name, with an fp32 companion
  `<module>.weight_scale_inv` (for a parameter not called `weight`, e.g. fused experts: `<name>_scale_inv`)
  of shape [..., ceil(N / bn), ceil(K / bk)] for `weight_block_size` [bn, bk] (128 x 128 in the releases);
- the real weight is `fp8 * weight_scale_inv` of its block (the last row / column block may be partial);
- quantising a block: `amax = max |W|`, `scale = 448 / amax` (448 = the e4m3fn maximum), `q = clamp(W * scale)`,
  `weight_scale_inv = 1 / scale` (an all-zero block keeps scale 1), exactly transformers' arithmetic;
- `config.json` carries `quantization_config`: `quant_method` "fp8", `fmt` "e4m3", `activation_scheme`
  "dynamic", `weight_block_size`, `modules_to_not_convert` (modules left in bf16).

`FP8Config` parses that block; `quantize_blockwise` / `dequantize_blockwise` are the two conversions;
`FP8Linear` keeps a linear layer's weight in FP8 and multiplies with bf16 / fp16 / fp32 activations (W8A16), either
dequantising the weight in PyTorch ("torch") or inside a Triton matmul (`kernels.fp8_linear`, "triton").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"
FP8_BACKENDS = ("auto", "torch", "triton")
# "auto": the Triton W8A16 kernel up to this many rows on CUDA, dequantise + cuBLAS above it (and off CUDA). Measured
# on an H200 at the 8B layer shapes (docs/benchmarks.md, "FP8 W8A16 linear"): Triton 1.05-1.09x bf16 at 1-16 rows,
# 2.3x faster than dequantise + F.linear at 512 rows, 1.7x slower at 4,096; the two cross near ~1,800 rows.
FP8_AUTO_TRITON_ROWS = 2048


def scale_name(weight_name: str) -> str:
    """The name of a weight's per-block scale tensor (transformers' rule: `x.weight` -> `x.weight_scale_inv`)."""
    return weight_name + SCALE_SUFFIX


def weight_name(scale_name: str) -> str:
    """Inverse of `scale_name`."""
    if not scale_name.endswith(SCALE_SUFFIX):
        raise ValueError(f"{scale_name!r} is not a scale tensor name (no {SCALE_SUFFIX!r} suffix)")
    return scale_name[: -len(SCALE_SUFFIX)]


@dataclass(frozen=True)
class FP8Config:
    """The `quantization_config` of a fine-grained FP8 checkpoint (only what the official checkpoints use).

    Args:
        weight_block_size: (bn, bk) rows x columns of one scale block.
        modules_to_not_convert: module names (or transformers' patterns) whose weights stay in bf16.
    """

    weight_block_size: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"

    def __post_init__(self):
        bs = self.weight_block_size
        if (not isinstance(bs, (tuple, list)) or len(bs) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bs)):
            raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {bs!r}")
        object.__setattr__(self, "weight_block_size", tuple(bs))
        mods = self.modules_to_not_convert
        if not isinstance(mods, (tuple, list)) or not all(isinstance(m, str) for m in mods):
            raise ValueError(f"quantization_config.modules_to_not_convert must be a list of strings, got {mods!r}")
        object.__setattr__(self, "modules_to_not_convert", tuple(mods))
        if self.activation_scheme != "dynamic":
            raise ValueError(f"quantization_config.activation_scheme {self.activation_scheme!r} unsupported: only "
                             "'dynamic' (no stored activation scales) is read")
        if self.fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt {self.fmt!r} unsupported: only 'e4m3' (float8_e4m3fn)")

    # Keys transformers' FineGrainedFP8Config.to_dict writes, with the values we can honour; anything else is refused.
    _FIXED = {"quant_method": ("fp8",), "scale_fmt": ("float",), "expert_dtype": ("fp8",),
              "modules_to_convert": (None, []), "dequantize": (False, True)}

    @classmethod
    def from_hf(cls, d: Any, where: str = "quantization_config") -> "FP8Config":
        """Parse a config.json `quantization_config` object; anything we cannot honour raises ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object, got {type(d).__name__}")
        known = {"weight_block_size", "modules_to_not_convert", "activation_scheme", "fmt"} | set(cls._FIXED)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; refusing to guess what they mean")
        if d.get("quant_method") != "fp8":
            raise ValueError(f"{where}.quant_method {d.get('quant_method')!r} unsupported (only 'fp8', fine-grained "
                             "FP8 with weight_scale_inv)")
        for k, allowed in cls._FIXED.items():
            if k in d and d[k] not in allowed:
                raise ValueError(f"{where}.{k} {d[k]!r} unsupported (expected one of {list(allowed)})")
        try:
            return cls(weight_block_size=d.get("weight_block_size", (128, 128)),
                       modules_to_not_convert=d.get("modules_to_not_convert") or (),
                       activation_scheme=d.get("activation_scheme", "dynamic"), fmt=d.get("fmt", "e4m3"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The official `quantization_config` block."""
        return {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.weight_block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}

    def converts(self, module_name: str) -> bool:
        """Whether `module_name` is quantised: transformers' `should_convert_module` rule (a pattern matches from the
        start up to a module boundary, as a regex with that boundary, or as a suffix)."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{p}){boundary}", module_name) or module_name.endswith(p)
                       for p in self.modules_to_not_convert)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale grid of a weight [..., N, K]: [..., ceil(N / bn), ceil(K / bk)]."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def _expand(scale: Tensor, n: int, k: int, block: tuple[int, int]) -> Tensor:
    """Per-block scales [..., nb, kb] -> per-element [..., n, k] (partial last blocks cropped)."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :n, :].repeat_interleave(block[1], dim=-1)[..., :k]


def dequantize_blockwise(q: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
                         ) -> Tensor:
    """FP8 weight -> real weight: fp32(q) * fp32(scale_inv) of its block, rounded once to `dtype`.

    Args:
        q: [..., N, K] float8_e4m3fn.
        scale_inv: [..., ceil(N / bn), ceil(K / bk)] fp32 (or bf16) per-block scales.
        block: (bn, bk).
    Returns: [..., N, K] `dtype`.
    """
    *_, n, k = q.shape
    if tuple(scale_inv.shape) != scale_shape(tuple(q.shape), block):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(q.shape)} with blocks "
                         f"{block} (expected {scale_shape(tuple(q.shape), block)})")
    return (q.float() * _expand(scale_inv.float(), n, k, block)).to(dtype)


def quantize_blockwise(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Real weight -> (FP8 weight, fp32 weight_scale_inv), one scale per block (partial edge blocks allowed).

    Args:
        w: [..., N, K] any float dtype (computed in fp32).
        block: (bn, bk).
    Returns: q [..., N, K] float8_e4m3fn; scale_inv [..., ceil(N / bn), ceil(K / bk)] fp32.
    """
    *lead, n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    w32 = w.float()
    # zero-pad to whole blocks: padding never raises a block's amax
    padded = F.pad(w32, (0, kb * bk - k, 0, nb * bn - n))
    amax = padded.reshape(*lead, nb, bn, kb, bk).abs().amax(dim=(-3, -1))       # [..., nb, kb]
    scale = torch.where(amax > 0, FP8_MAX / amax.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    q = (w32 * _expand(scale, n, k, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, (1.0 / scale).float()


class FP8Linear(nn.Module):
    """A bias-optional linear layer whose weight stays in FP8 (W8A16): y = x @ dequant(W).T + b.

    Parameters are named as in the checkpoint (`weight` float8_e4m3fn [N, K], `weight_scale_inv` fp32
    [ceil(N / bn), ceil(K / bk)], `bias`), so the module's state_dict is the FP8 checkpoint layout. Frozen: FP8
    weights are for inference.

    Args:
        in_features: K; out_features: N; bias: whether a bias exists; block: (bn, bk).
        backend: "torch" (dequantise to the activation dtype, then F.linear), "triton" (`kernels.fp8_linear`,
            the dequantisation inside the matmul; CUDA or TRITON_INTERPRET) or "auto" (Triton for up to
            FP8_AUTO_TRITON_ROWS rows on CUDA, i.e. decode and short prefill chunks; "torch" otherwise).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, block: tuple[int, int],
                 backend: str = "auto", device=None):
        super().__init__()
        if backend not in FP8_BACKENDS:
            raise ValueError(f"FP8 backend must be one of {FP8_BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.block, self.backend = in_features, out_features, tuple(block), backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape((out_features, in_features), self.block), dtype=torch.float32, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int], backend: str = "auto") -> "FP8Linear":
        """Quantise an nn.Linear (its bias keeps its dtype)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, block, backend,
                device=linear.weight.device)
        q, s = quantize_blockwise(linear.weight.detach(), m.block)
        m.weight.data, m.weight_scale_inv.data = q, s
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., K) bf16 / fp16 / fp32 -> (..., N) x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        backend = self.backend
        if backend == "auto":
            backend = "triton" if x.is_cuda and x.numel() // self.in_features <= FP8_AUTO_TRITON_ROWS else "torch"
        if backend == "triton":
            from kernels.fp8_linear import fp8_linear  # Triton is imported only when this backend is chosen

            return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, backend={self.backend}")
