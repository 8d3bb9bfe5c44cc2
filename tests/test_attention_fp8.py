"""Tests of attention over an fp8 (e4m3) KV cache: `quantize_kv` / `dequantize_kv` (kernels/attention/fp8.py) and the
Triton kernels' KV_FP8 path, both dispatch routes of `attention` (split-KV decode; the flash forward for a chunk of
queries against a longer cache, bottom-right aligned), against the fp32 reference run on the dequantised K/V.

Every kernel output starts as NaN (the fixture of tests/test_attention_kernel.py). Tolerances there (`TOL`): the
reference runs on the dequantised values x8 * scale in fp32, so the only differences are the kernels' own roundings:
fp32 1e-4 (summation order; seen <= 3e-7), fp16 5e-3 (the dequantised K and V tiles and P rounded to fp16; seen
<= 8e-4), bf16 3e-2 (GPU). The quantisation error itself (fp8 cache vs the unquantised one) is checked separately,
in relative L2 norm of the output: on Gaussian K/V and q (D = 64) it measures 0.034-0.037, a bf16 cache 0.002-0.003
(e4m3 keeps 3 mantissa bits: a rounding of up to 2^-4 = 6% per element, about 3.6% rms); the bound is 0.06.
On the CPU the cases run through the Triton interpreter at small sizes (fp16 and fp32 q: the interpreter's bf16 dot
is wrong); the `gpu` cases run at full size with bf16 q on CUDA: `python -m pytest tests/test_attention_fp8.py -q`.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kernels.attention import attention, attention_naive, decode_attention, dequantize_kv, quantize_kv

from .test_attention_kernel import CUDA, DEVICE, TOL, _assert_close, _poison_outputs  # noqa: F401 (autouse fixture)

attn_pkg = importlib.import_module("kernels.attention")  # the package, whose globals `attention` dispatches through
FP8 = torch.float8_e4m3fn
QUANT_REL_L2 = 0.06  # fp8 vs unquantised attention output, relative L2 (measured 0.035-0.040 on Gaussian data)


def _fp8_cache(b, lk, hkv, d, extra=29):
    """Random K/V quantised into a preallocated cache longer than lk; returns views (as a generation loop passes
    them: strided K/V and scales) and the unquantised fp32 K/V."""
    k, v = torch.randn(2, b, lk + extra, hkv, d, device=DEVICE).unbind(0)
    k8, ks = quantize_kv(k)
    v8, vs = quantize_kv(v)
    cache = torch.stack([k8, v8])  # (2, B, L, Hkv, D) fp8
    scales = torch.stack([ks, vs], dim=-1)  # (B, L, Hkv, 2): scale strides differ from a contiguous (B, L, Hkv)
    return (cache[0, :, :lk], cache[1, :, :lk], scales[:, :lk, :, 0], scales[:, :lk, :, 1],
            k[:, :lk], v[:, :lk])


@pytest.fixture
def route(monkeypatch):
    """Records which kernel route `attention` took: 'decode' or 'flash_kv8'."""
    taken = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            taken.append(name)
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(attn_pkg, "decode_attention", spy("decode", attn_pkg.decode_attention))
    monkeypatch.setattr(attn_pkg, "flash_attn_fwd_kv8", spy("flash_kv8", attn_pkg.flash_attn_fwd_kv8))
    return taken


def _run_and_compare(q, k8, v8, ks, vs, dtype, route, want_route, **kw):
    with torch.no_grad():
        o, lse = attention(q, k8, v8, k_scale=ks, v_scale=vs, return_lse=True, **kw)
    assert route == [want_route], f"took {route}, expected {want_route}"
    ro, rlse = attention_naive(q, k8, v8, k_scale=ks, v_scale=vs, return_lse=True, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape
    _assert_close("o", o, ro, dtype)
    _assert_close("lse", lse, rlse, dtype)
    return o


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_dequantize_roundtrip():
    """Absmax scaling: each head vector's largest |x| maps to 448 (exactly representable), every element is within
    e4m3's rounding (2^-4 relative for normals, 2^-10 * scale absolute in the subnormal range), magnitudes from
    1e-3 to 1e3 per vector, and an all-zero vector stays zero (scale clamped, no NaN)."""
    x = torch.randn(2, 37, 3, 72, device=DEVICE) * torch.logspace(-3, 3, 37, device=DEVICE)[None, :, None, None]
    x[1, 5, 2] = 0.0
    x8, scale = quantize_kv(x.to(torch.bfloat16))
    x = x.to(torch.bfloat16).float()
    assert x8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == x.shape[:3]
    nonzero = x.abs().amax(-1) > 0
    assert torch.equal(x8.float().abs().amax(-1)[nonzero], torch.full_like(scale[nonzero], 448.0))
    xd = dequantize_kv(x8, scale)
    bound = 2.0 ** -4 * x.abs() + 2.0 ** -10 * scale[..., None] + 1e-6 * x.abs()  # + fp32 slop of the division
    assert ((xd - x).abs() <= bound).all(), f"max excess {((xd - x).abs() - bound).max().item():.3e}"
    assert torch.equal(xd[1, 5, 2], torch.zeros(72, device=DEVICE))
    assert dequantize_kv(x8, scale, torch.float16).dtype == torch.float16


# (id, B, Lq, Lk, Hq, Hkv, D, mask kwargs): Lk >= 1024 and Lq * Hq / Hkv <= 64 rows, so `attention` takes the
# split-KV path; on the CPU it splits Lk into 2-4 chunks with a ragged last one
DECODE_CASES = [
    ("lq1-gqa8to2-lk1100", 2, 1, 1100, 8, 2, 64, dict(causal=True)),
    ("lq4-gqa8to2-lk1537", 1, 4, 1537, 8, 2, 64, dict(causal=True)),
    ("lq1-mha4-lk2100-d72", 1, 1, 2100, 4, 4, 72, {}),
    ("lq4-mha4-lk1300", 2, 4, 1300, 4, 4, 64, dict(causal=True)),
    ("lq4-gqa8to2-window-global", 1, 4, 1200, 8, 2, 64, dict(causal=True, window=100, num_global=7)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_fp8_decode(case, dtype, route):
    _, b, lq, lk, hq, hkv, d, kw = case
    k8, v8, ks, vs, _, _ = _fp8_cache(b, lk, hkv, d)
    q = torch.randn(b, lq, hq, d, dtype=dtype, device=DEVICE)
    _run_and_compare(q, k8, v8, ks, vs, dtype, route, "decode", **kw)


# (id, B, Lq, Lk, Hq, Hkv, D, mask kwargs): a chunk of Lq new queries at key positions Lk - Lq .. Lk - 1
CHUNK_CASES = [
    ("causal-lq48-lk200-gqa8to2", 2, 48, 200, 8, 2, 64, dict(causal=True)),
    ("causal-lq48-lk200-mha-d80", 1, 48, 200, 4, 4, 80, dict(causal=True)),
    ("causal-window-global-lq48-lk200", 1, 48, 200, 4, 2, 64, dict(causal=True, window=60, num_global=5)),
    ("noncausal-lq33-lk130", 1, 33, 130, 4, 1, 64, {}),
]
_CHUNK_PARAMS = [pytest.param(c, torch.float32, id=f"{c[0]}-fp32") for c in CHUNK_CASES] + \
    [pytest.param(c, torch.float16, id=f"{c[0]}-fp16") for c in CHUNK_CASES[:2]]


@pytest.mark.parametrize("case, dtype", _CHUNK_PARAMS)
def test_fp8_chunk_prefill(case, dtype, route):
    _, b, lq, lk, hq, hkv, d, kw = case
    k8, v8, ks, vs, _, _ = _fp8_cache(b, lk, hkv, d)
    q = torch.randn(b, lq, hq, d, dtype=dtype, device=DEVICE)
    _run_and_compare(q, k8, v8, ks, vs, dtype, route, "flash_kv8", **kw)


@pytest.mark.parametrize("path", ["decode", "flash_kv8"])
def test_fp8_quantisation_error_vs_unquantised(path, route):
    """The cost of the fp8 cache itself: the kernel over quantised K/V against the fp32 reference over the original
    K/V (relative L2 of the output; LSE absolute), and a bf16 cache for scale (its error is ~16x smaller)."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    b, lq, lk, hq, hkv, d = (1, 2, 1100, 8, 2, 64) if path == "decode" else (1, 48, 200, 8, 2, 64)
    k8, v8, ks, vs, k, v = _fp8_cache(b, lk, hkv, d)
    q = torch.randn(b, lq, hq, d, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        o, lse = attention(q, k8, v8, k_scale=ks, v_scale=vs, causal=True, return_lse=True)
    assert route == [path]
    exact, exact_lse = attention_naive(q, k, v, causal=True, return_lse=True)
    bf16_kv = attention_naive(q, k.bfloat16(), v.bfloat16(), causal=True)
    err, err_bf16 = _rel_l2(o, exact), _rel_l2(bf16_kv, exact)
    assert err <= QUANT_REL_L2, f"fp8 KV: relative L2 error {err:.3f} > {QUANT_REL_L2}"
    assert err_bf16 < err / 4, f"bf16 KV error {err_bf16:.4f} not well below fp8's {err:.4f}"
    assert (lse - exact_lse).abs().max().item() <= 0.05  # the LSE moves with the scores' rounding only


def test_fp8_unit_scales_match_plain_kernels():
    """With scales of 1 and K/V that are exactly fp8 values, the fp8 kernels must give the plain kernels' output
    (the same tiles, read through the KV_FP8 loads)."""
    dtype = torch.float32
    b, lq, lk, hq, hkv, d = 1, 40, 150, 4, 2, 64
    k8 = (torch.randn(b, lk, hkv, d, device=DEVICE) * 8).to(FP8)
    v8 = (torch.randn(b, lk, hkv, d, device=DEVICE) * 8).to(FP8)
    ones = torch.ones(b, lk, hkv, device=DEVICE)
    q = torch.randn(b, lq, hq, d, dtype=dtype, device=DEVICE) / 8
    with torch.no_grad():
        o8 = attention(q, k8, v8, k_scale=ones, v_scale=ones, causal=True)
        o = attention(q, k8.to(dtype), v8.to(dtype), causal=True)
    _assert_close("o", o8, o, dtype)


def test_decode_attention_direct_fp8():
    """decode_attention called directly (a generation loop may): explicit split count, head-major scales (a
    (B, H, L) buffer passed as a (B, L, H) view), scales required."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    k8, v8, ks, vs, _, _ = _fp8_cache(2, 300, 2, 64)
    ks, vs = (s.transpose(1, 2).contiguous().transpose(1, 2) for s in (ks, vs))  # same values, strides (H*L, 1, L)
    q = torch.randn(2, 3, 8, 64, dtype=dtype, device=DEVICE)
    o, lse = decode_attention(q, k8, v8, causal=True, num_splits=3, k_scale=ks, v_scale=vs)
    ro, rlse = attention_naive(q, k8, v8, causal=True, k_scale=ks, v_scale=vs, return_lse=True)
    _assert_close("o", o, ro, dtype)
    _assert_close("lse", lse, rlse, dtype)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        decode_attention(q, k8, v8, causal=True)


def _bad_call(bad):
    b, lq, lk, hq, hkv, d = 1, 4, 40, 4, 2, 32
    k8, v8, ks, vs, k, v = _fp8_cache(b, lk, hkv, d)
    q = torch.randn(b, lq, hq, d, device=DEVICE)
    kw = dict(k_scale=ks, v_scale=vs)
    if bad == "scale-with-fp32-kv":
        k8, v8 = k, v
    elif bad == "no-v-scale":
        kw["v_scale"] = None
    elif bad == "v-not-fp8":
        v8 = v
    elif bad == "scale-shape":
        kw["k_scale"] = ks[:, :, :1]
    elif bad == "scale-dtype":
        kw["v_scale"] = vs.half()
    elif bad == "q-fp8":
        q = q.to(FP8)
    elif bad == "packed":
        cu = torch.tensor([0, 10, 40], dtype=torch.int32, device=DEVICE)
        q, k8, v8 = torch.randn(lk, hq, d, device=DEVICE), k8[0], v8[0]
        kw["cu_seqlens"] = cu
    elif bad == "grad":
        q.requires_grad_()
    return lambda: attention(q, k8, v8, **kw)


@pytest.mark.parametrize("bad, err, match", [
    ("scale-with-fp32-kv", ValueError, "float8_e4m3fn k and v"),
    ("no-v-scale", ValueError, "v_scale is None"),
    ("v-not-fp8", TypeError, "both k and v"),
    ("scale-shape", ValueError, r"\(B, Lk, Hkv\)"),
    ("scale-dtype", TypeError, "v_scale must be float32"),
    ("q-fp8", TypeError, "q must be float16, bfloat16 or float32"),
    ("packed", ValueError, "packed"),
    ("grad", RuntimeError, "forward only"),
])
def test_fp8_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        _bad_call(bad)()


# ----------------------------------------------------------------------------------------------------------------
# Full size on the GPU (bf16 q): a long-video cache of 64k tokens
# ----------------------------------------------------------------------------------------------------------------
def _reference_by_query_chunks(q, k8, v8, ks, vs, chunk=256, **kw):
    """attention_naive (fp8 K/V with scales, or plain K/V with scales None) over query chunks: the full (Hq, Lq, Lk)
    fp32 score matrix of Lq = 2048, Lk = 65536 would take 8.6 GB per copy. Query i sits at key position Lk - Lq + i,
    so chunk [a, e) is the reference over the keys up to Lk - Lq + e with the same bottom-right alignment (causal
    masks only)."""
    lq, lk = q.shape[1], k8.shape[1]
    outs, lses = [], []
    for a in range(0, lq, chunk):
        e = min(a + chunk, lq)
        n = lk - lq + e
        o, lse = attention_naive(q[:, a:e], k8[:, :n], v8[:, :n], k_scale=None if ks is None else ks[:, :n],
                                 v_scale=None if vs is None else vs[:, :n], return_lse=True, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


GPU_CASES = [
    ("decode-lq1-hq16-hkv8-lk65536", 1, 1, 65536, 16, 8, 128, "decode"),
    ("decode-lq4-hq16-hkv8-lk65536-b2", 2, 4, 65536, 16, 8, 128, "decode"),
    ("chunk-lq2048-lk65536-hq16-hkv8", 1, 2048, 65536, 16, 8, 128, "flash_kv8"),
]


@pytest.mark.skipif(not CUDA, reason="full-size cases need a CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_fp8_gpu(case, route):
    _, b, lq, lk, hq, hkv, d, want = case
    dtype = torch.bfloat16
    k8, v8, ks, vs, k, v = _fp8_cache(b, lk, hkv, d)
    q = torch.randn(b, lq, hq, d, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        o, lse = attention(q, k8, v8, k_scale=ks, v_scale=vs, causal=True, return_lse=True)
    assert route == [want]
    ro, rlse = _reference_by_query_chunks(q, k8, v8, ks, vs, causal=True)
    _assert_close("o", o, ro, dtype)
    _assert_close("lse", lse, rlse, dtype)
    exact, _ = _reference_by_query_chunks(q, k, v, None, None, causal=True)
    assert _rel_l2(o, exact) <= QUANT_REL_L2
