"""FP8 (e4m3) KV cache format: per-(token, KV head) scaled quantisation of K/V, and the checks of the fp8 inputs.

A cache stored as torch.float8_e4m3fn with one fp32 scale per (batch, token, KV head) takes half the memory of a
bf16 cache. The value of element d is x8[..., d].float() * scale[...] (absmax scaling of each head vector to the
largest finite e4m3fn value, 448; the e4m3 format of Micikevicius et al., 2022, "FP8 Formats for Deep Learning").
The Triton kernels (forward.py, decode.py) read such a cache directly and dequantise each K/V tile as they load it
(their KV_FP8 flag); no full-precision copy of the cache is built. `quantize_kv` and `dequantize_kv` (the reference
side) live with the cache that stores the format, model/generation.py's KVCache, and are re-exported here.

Accuracy, measured on Gaussian q, K, V (D = 64, causal, Lk 200-1100; tests/test_attention_fp8.py): the attention
output over an fp8 cache is 3.4-3.7% off the unquantised one in relative L2 norm (a bf16 cache: 0.2-0.25%), the LSE
within 0.012. Sharper attention costs more: with q scaled by 4 (score std 4) 6-8%, the LSE within 0.27.

The kernels take the scales through their strides, so any (B, L, H) view works. KVCache keeps them head-major,
(B, H, L) passed as `.transpose(1, 2)`: the scales of a key tile are then one contiguous read instead of one 4-byte
read every H * 4 bytes.
"""
from __future__ import annotations

import torch

from model.generation import FP8 as FP8_DTYPE
from model.generation import FP8_MAX, dequantize_kv, quantize_kv  # noqa: F401  (re-exported)


def check_kv8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale, v_scale, packed: bool) -> None:
    """Validate an fp8 K/V call of `attention` (k or v is float8_e4m3fn): both fp8, both scales given,
    (B, Lk, Hkv) fp32 on k's device, the (B, L, H, D) layout, q in fp16/bf16/fp32."""
    if k.dtype != FP8_DTYPE or v.dtype != FP8_DTYPE:
        raise TypeError(f"attention: fp8 KV needs both k and v as float8_e4m3fn, got {k.dtype} and {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention: with an fp8 KV cache q must be float16, bfloat16 or float32, got {q.dtype}")
    if packed:
        raise ValueError("attention: fp8 K/V (k_scale, v_scale) supports the (B, L, H, D) layout only, "
                         "not packed sequences (cu_seqlens)")
    want = tuple(k.shape[:3])  # (B, Lk, Hkv)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"attention: k and v are float8_e4m3fn but {name} is None; pass the fp32 scales "
                             f"(B, Lk, Hkv) from kernels.attention.quantize_kv")
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(s).__name__}")
        if s.dtype != torch.float32:
            raise TypeError(f"attention: {name} must be float32, got {s.dtype}")
        if tuple(s.shape) != want:
            raise ValueError(f"attention: {name} must have shape (B, Lk, Hkv) = {want}, got {tuple(s.shape)}")
        if s.device != k.device:
            raise ValueError(f"attention: {name} is on {s.device}, k on {k.device}")


__all__ = ["quantize_kv", "dequantize_kv", "check_kv8", "FP8_DTYPE", "FP8_MAX"]
