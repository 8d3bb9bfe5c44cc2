"""Tests of the Triton attention kernels (`kernels.attention`) against the plain-PyTorch fp32 reference (`naive.py`).

Forward output, LSE and dq/dk/dv are compared on fresh random inputs, with every kernel output pre-filled with NaN
(so an element the kernels forget to write fails), on awkward shapes: sequence 1, 17, 131, 257, documents of
unequal length, head_dim 48/72/80/96, Hq/Hkv = 8/1, 16/8, 12/4, 6/2, Lq != Lk, global queries (`global_queries`:
the first num_global positions attend everywhere) with the query block holding them partly global. On the CPU they
run through the Triton interpreter at tiny sizes (fp32 and fp16: the interpreter's bf16 dot is wrong); the `gpu`
cases run at full size in bf16/fp16 on CUDA: `python -m pytest tests/test_attention_kernel.py -q` on the GPU
machine.

Tolerances (max abs error divided by max(1, the reference's max magnitude), per tensor; e.g. dq is exactly 0
for sequence length 1):
- fp32: 1e-4. The kernels use fp32 (ieee) dots; the error is summation order only (seen ~1e-6).
- fp16: 5e-3. P and dS are rounded to fp16 before the second matmul of each pair (rel. 2^-11 each), plus output
  rounding.
- bf16: 3e-2. Same roundings with an 8-bit mantissa (2^-8 = 4e-3 each, accumulated over many tiles).
"""
from __future__ import annotations

import pytest
import torch

from kernels.attention import attention, attention_naive, decode_attention, visibility_mask
from kernels.attention import common as kernel_common
from kernels.attention import flash as flash_mod

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: an unwritten element shows up as a mismatch."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(kernel_common, "empty_output", nan_empty)


def _assert_close(name, got, ref, dtype):
    """Max abs error relative to the reference's magnitude; -inf LSE entries must match exactly."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf), f"{name}: infinite entries differ"
    got, ref = got[~inf], ref[~inf]
    assert not torch.isnan(got).any(), f"{name}: NaN in output (unwritten or invalid)"
    if ref.numel() == 0:
        return
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)  # absolute below magnitude 1
    assert err <= TOL[dtype], f"{name}: relative max error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def _rand(*shape, dtype, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def _check_against_reference(q, k, v, dtype, backward=True, **kw):
    """Run kernel and reference on the same leaves; compare o, lse and (optionally) dq, dk, dv."""
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    o, lse = attention(*leaves, return_lse=True, **kw)
    ref_leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    ro, rlse = attention_naive(*ref_leaves, return_lse=True, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape
    _compare(o, lse, ro, rlse, leaves if backward else None, ref_leaves, dtype)


def _compare(o, lse, ro, rlse, leaves, ref_leaves, dtype, tag=""):
    """o and lse against the reference; then, unless leaves is None, backward a random dO through both and
    compare dq, dk, dv."""
    _assert_close(f"o{tag}", o, ro, dtype)
    _assert_close(f"lse{tag}", lse, rlse, dtype)
    if leaves is None:
        return
    do = torch.randn_like(o)
    o.backward(do)
    ro.float().backward(do.float())
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        _assert_close(name, a.grad, b.grad, dtype)


# (id, batch B or document lengths, Lq, Lk, Hq, Hkv, D, mask kwargs). CPU cases stay tiny: the interpreter is slow.
CPU_CASES = [
    ("noncausal-seq1-mqa-d64", 2, 1, 1, 8, 1, 64, {}),
    ("causal-seq17-gqa-d72", 2, 17, 17, 12, 4, 72, dict(causal=True)),
    ("causal-seq131-d80", 1, 131, 131, 2, 2, 80, dict(causal=True)),
    ("noncausal-seq257-mqa-d96", 1, 257, 257, 8, 1, 96, {}),
    ("noncausal-varlen-gqa-d72", [5, 17, 1, 40], None, None, 16, 8, 72, {}),
    ("causal-varlen-gqa-d64", [33, 7, 64], None, None, 12, 4, 64, dict(causal=True)),
    ("causal-window-global-gqa", 1, 131, 131, 12, 4, 64, dict(causal=True, window=17, num_global=3)),
    ("noncausal-window-mqa-d128", 1, 131, 131, 8, 1, 128, dict(window=9)),
    ("noncausal-window-global", 1, 100, 100, 2, 1, 32, dict(window=20, num_global=40)),
    ("causal-window-global-varlen", [50, 90], None, None, 4, 2, 64, dict(causal=True, window=16, num_global=4)),
    ("causal-lq3-lk131-bottomright", 2, 3, 131, 8, 1, 64, dict(causal=True)),
    ("causal-lq20-lk7-emptyrows", 1, 20, 7, 4, 2, 64, dict(causal=True)),
    # global queries: G=5 inside the first query block; G=40 spans a block and a half (block size 32 on the CPU) and
    # covers all of the 3-token document; Lq != Lk both ways (query i at key position Lk - Lq + i)
    ("noncausal-window-globalq-gqa", 1, 131, 131, 8, 2, 64, dict(window=16, num_global=5, global_queries=True)),
    ("noncausal-window-globalq-varlen-d48", [70, 3, 45], None, None, 6, 2, 48,
     dict(window=8, num_global=40, global_queries=True)),
    ("causal-window-globalq", 1, 131, 131, 4, 2, 64, dict(causal=True, window=16, num_global=5, global_queries=True)),
    ("noncausal-window-globalq-lq40-lk70", 2, 40, 70, 4, 1, 64, dict(window=10, num_global=45, global_queries=True)),
    ("noncausal-window-globalq-lq45-lk20", 1, 45, 20, 4, 4, 32, dict(window=6, num_global=3, global_queries=True)),
]

GPU_CASES = [
    ("causal-gqa-d128", 2, 1024, 1024, 16, 8, 128, dict(causal=True)),
    ("noncausal-gqa-d128", 1, 1000, 1000, 12, 4, 128, {}),
    ("causal-mqa-d64", 1, 1023, 1023, 8, 1, 64, dict(causal=True)),
    ("noncausal-varlen-d72", [1024, 256, 1, 767, 64], None, None, 16, 16, 72, {}),
    ("causal-varlen-gqa-d128", [700, 1300, 33], None, None, 16, 8, 128, dict(causal=True)),
    ("noncausal-d80", 2, 333, 333, 4, 4, 80, {}),
    ("causal-d96", 1, 777, 777, 4, 2, 96, dict(causal=True)),
    ("causal-window-gqa", 1, 2048, 2048, 16, 8, 128, dict(causal=True, window=256)),
    ("causal-window-global-gqa", 1, 2048, 2048, 16, 8, 128, dict(causal=True, window=300, num_global=64)),
    ("noncausal-window-global-varlen", [1000, 900], None, None, 8, 2, 64, dict(window=128, num_global=16)),
    ("causal-lq64-lk2000", 1, 64, 2000, 16, 8, 128, dict(causal=True)),
    ("noncausal-window-globalq-varlen", [1000, 900, 77], None, None, 8, 2, 128,
     dict(window=128, num_global=200, global_queries=True)),
]


def _make_inputs(batch, lq, lk, hq, hkv, d, dtype):
    if isinstance(batch, list):
        cu = torch.tensor([0] + batch, device=DEVICE).cumsum(0).to(torch.int32)
        t = int(cu[-1])
        return _rand(t, hq, d, dtype=dtype), _rand(t, hkv, d, dtype=dtype), _rand(t, hkv, d, dtype=dtype), \
            dict(cu_seqlens=cu)
    return (_rand(batch, lq, hq, d, dtype=dtype), _rand(batch, lk, hkv, d, dtype=dtype),
            _rand(batch, lk, hkv, d, dtype=dtype), {})


# CPU (interpreter): fp32 for every case, fp16 for a representative few (the interpreter is slow and its bf16 dot
# is wrong). CUDA: bf16 for every case, fp32 (ieee dots, slow to compile) for one.
_FP16_CPU = ("causal-seq17-gqa-d72", "causal-varlen-gqa-d64", "causal-window-global-gqa",
             "noncausal-window-globalq-gqa", "noncausal-window-globalq-varlen-d48")
if CUDA:
    _CPU_PARAMS = [pytest.param(c, torch.bfloat16, id=f"{c[0]}-bf16") for c in CPU_CASES] + \
        [pytest.param(c, torch.float32, id=f"{c[0]}-fp32") for c in CPU_CASES if c[0] == "causal-varlen-gqa-d64"]
else:
    _CPU_PARAMS = [pytest.param(c, torch.float32, id=f"{c[0]}-fp32") for c in CPU_CASES] + \
        [pytest.param(c, torch.float16, id=f"{c[0]}-fp16") for c in CPU_CASES if c[0] in _FP16_CPU]


@pytest.mark.parametrize("case, dtype", _CPU_PARAMS)
def test_attention(case, dtype):
    _, batch, lq, lk, hq, hkv, d, kw = case
    q, k, v, extra = _make_inputs(batch, lq, lk, hq, hkv, d, dtype)
    _check_against_reference(q, k, v, dtype, **kw, **extra)


_GPU_PARAMS = [pytest.param(c, torch.bfloat16, id=f"{c[0]}-bf16") for c in GPU_CASES] + \
    [pytest.param(c, torch.float16, id=f"{c[0]}-fp16") for c in GPU_CASES
     if c[0] in ("causal-gqa-d128", "noncausal-varlen-d72", "noncausal-window-global-varlen")]


@pytest.mark.skipif(not CUDA, reason="full-size cases need a CUDA device")
@pytest.mark.parametrize("case, dtype", _GPU_PARAMS)
def test_attention_gpu(case, dtype):
    _, batch, lq, lk, hq, hkv, d, kw = case
    q, k, v, extra = _make_inputs(batch, lq, lk, hq, hkv, d, dtype)
    _check_against_reference(q, k, v, dtype, **kw, **extra)


def test_attention_noncontiguous_views_and_scale():
    """q/k/v as slices of one fused projection (the vision tower's qkv), custom scale."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    t, h, d = 45, 4, 64
    qkv = _rand(t, 3, h, d, dtype=dtype)
    q, k, v = qkv.unbind(1)  # (T, H, D) views with token stride 3*H*D
    cu = torch.tensor([0, 20, 45], dtype=torch.int32, device=DEVICE)
    _check_against_reference(q, k, v, dtype, cu_seqlens=cu, scale=0.3)
    qkv = _rand(2, 19, h, 3 * d, dtype=dtype)
    q, k, v = qkv.split(d, dim=-1)  # (B, L, H, D) views with a strided head dimension
    _check_against_reference(q, k, v, dtype, causal=True)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=40, num_global=5), {},
                                dict(window=2, num_global=298, global_queries=True)],
                         ids=["causal", "causal-window-global", "noncausal", "window-globalq"])
def test_decode_split_kv(kw):
    """Flash-decoding path (few queries, long cache) with GQA, several splits, a ragged last split, K/V as views of a
    larger cache buffer. window-globalq: query 0 (key position 297 < G) also sees key 299, outside its window."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    b, lq, lk, hq, hkv, d = 2, 3, 300, 8, 2, 72
    q = _rand(b, lq, hq, d, dtype=dtype)
    cache = _rand(2, b, lk + 37, hkv, d, dtype=dtype)  # a preallocated KV cache, filled up to lk
    k, v = cache[0, :, :lk], cache[1, :, :lk]  # strided views, as a generation loop passes them
    o, lse = decode_attention(q, k, v, num_splits=4, **kw)
    ro, rlse = attention_naive(q, k, v, return_lse=True, **kw)
    _assert_close("o", o, ro, dtype)
    _assert_close("lse", lse, rlse, dtype)


def test_decode_dispatch_and_masked_tiles_not_loaded():
    """attention() without grad on a long cache takes the decode path; with grad the flash path. Keys far left of
    the window hold NaN: a kernel that loaded those tiles (even to mask them) would produce NaN."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    b, lq, lk, hq, hkv, d = 1, 2, 1100, 4, 1, 64
    kw = dict(causal=True, window=30, num_global=5)  # visible keys: [0, 5) and [1069, 1100)
    q, k, v = _rand(b, lq, hq, d, dtype=dtype), _rand(b, lk, hkv, d, dtype=dtype), _rand(b, lk, hkv, d, dtype=dtype)
    kp, vp = k.clone(), v.clone()
    kp[:, 128:1024] = float("nan")  # whole 128-key tiles that no query sees
    vp[:, 128:1024] = float("nan")
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, rlse = attention_naive(*ref, return_lse=True, **kw)
    with torch.no_grad():
        o, lse = attention(q, kp, vp, return_lse=True, **kw)
    _assert_close("o(decode)", o, ro, dtype)
    _assert_close("lse(decode)", lse, rlse, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, kp, vp)]
    o, lse = attention(*leaves, return_lse=True, **kw)
    _compare(o, lse, ro, rlse, leaves, ref, dtype, tag="(flash)")


def test_cu_seqlens_checked_again_after_inplace_change():
    """The longest-document cache is keyed on the cu_seqlens tensor and its version: an in-place edit is re-checked."""
    q = _rand(300, 2, 16, dtype=torch.float32)
    cu = torch.tensor([0, 150, 300], dtype=torch.int32, device=DEVICE)
    _assert_close("o", attention(q, q, q, cu_seqlens=cu), attention_naive(q, q, q, cu_seqlens=cu), torch.float32)
    cu[1] = 290  # longest document 150 -> 290, same tensor: a stale cached length would leave rows unwritten (NaN)
    _assert_close("o(edited cu)", attention(q, q, q, cu_seqlens=cu), attention_naive(q, q, q, cu_seqlens=cu),
                  torch.float32)
    cu[2] = 5  # now invalid: must raise, not reuse the cached check
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q, q, q, cu_seqlens=cu)


@pytest.mark.parametrize("bad, match", [
    (dict(k_heads=3), "multiple of key/value heads"),
    (dict(dtype_k=torch.float64), "dtype"),
    (dict(window=0), "window"),
    (dict(cu=[0, 5, 3]), "cu_seqlens"),
    (dict(cu_dtype=torch.int64), "int32"),
    (dict(global_queries=1), "global_queries"),
])
def test_attention_bad_inputs(bad, match):
    q = _rand(10, 4, 16, dtype=torch.float32)
    k = _rand(10, bad.get("k_heads", 2), 16, dtype=bad.get("dtype_k", torch.float32))
    cu = torch.tensor(bad.get("cu", [0, 4, 10]), dtype=bad.get("cu_dtype", torch.int32), device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        attention(q, k, k, cu_seqlens=cu, window=bad.get("window"), global_queries=bad.get("global_queries", False))


def test_visibility_mask_global_queries_by_hand():
    """The reference rule itself, written out: window 2, G = 2, 6 keys; Lq = Lk (rows 0-1 global) and Lq = 3 < Lk
    (rows sit at key positions 3-5: none global, the flag changes nothing)."""
    want = torch.tensor([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0],
                         [1, 1, 0, 1, 1, 1],
                         [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(visibility_mask(6, 6, window=2, num_global=2, global_queries=True), want)
    assert torch.equal(visibility_mask(3, 6, window=2, num_global=2, global_queries=True), want[3:])
    assert torch.equal(visibility_mask(6, 6, causal=True, window=2, num_global=2, global_queries=True),
                       want & torch.ones(6, 6, dtype=torch.bool).tril())


def test_global_queries_causal_kernel_path():
    """With causal=True global queries change nothing (a query's keys j <= i < G are global keys); attention() drops
    the flag, so the kernels' causal + GLOBAL_Q code is checked here directly, packed, against the reference."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    kw = dict(causal=True, window=6, num_global=37)
    cu = torch.tensor([0, 60, 100], dtype=torch.int32, device=DEVICE)
    q, k, v = _rand(100, 4, 32, dtype=dtype), _rand(100, 2, 32, dtype=dtype), _rand(100, 2, 32, dtype=dtype)
    mask_gq = attention_naive(q, k, v, cu_seqlens=cu, global_queries=True, **kw)
    torch.testing.assert_close(mask_gq, attention_naive(q, k, v, cu_seqlens=cu, **kw), rtol=0, atol=0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = flash_mod.flash_attn_fwd(*leaves, cu, 60, True, 6, 37, 32 ** -0.5, True)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, rlse = attention_naive(*ref, cu_seqlens=cu, global_queries=True, return_lse=True, **kw)
    _compare(o, lse, ro, rlse, leaves, ref, dtype)


@pytest.mark.parametrize("poison", ["kv", "q_do"])
def test_global_queries_masked_tiles_not_loaded(poison):
    """Non-causal window + global queries: every key is visible (to the global queries), but a query block without
    global queries must not load key tiles outside its window, and a key block must not load query tiles that do
    not see it. Tile-aligned NaN rows [3u, 4u) of K/V (or of Q/dO): rows/keys [u, 2u) see none of them, so they
    must come out finite and equal to the clean reference; tiles are at most u wide (32 interpreter, 128 CUDA)."""
    dtype = torch.float32 if not CUDA else torch.bfloat16
    u = 128 if CUDA else 32
    b, seq, hq, hkv, d = 1, 5 * u, 4, 2, 64
    kw = dict(window=u // 4, num_global=5, global_queries=True)
    q, k, v = _rand(b, seq, hq, d, dtype=dtype), _rand(b, seq, hkv, d, dtype=dtype), _rand(b, seq, hkv, d, dtype=dtype)
    do = torch.randn_like(q)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, rlse = attention_naive(*ref, return_lse=True, **kw)
    ro.float().backward(do.float())
    bad = slice(3 * u, 4 * u)
    good = slice(u, 2 * u)
    qp, kp, vp, dop = q.clone(), k.clone(), v.clone(), do.clone()
    for x in ((kp, vp) if poison == "kv" else (qp, dop)):
        x[:, bad] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (qp, kp, vp)]
    o, lse = attention(*leaves, return_lse=True, **kw)
    o.backward(dop)
    if poison == "kv":
        assert torch.isnan(o[:, :5]).all(), "global queries should see the poisoned keys"
        _assert_close("o[good]", o[:, good], ro[:, good], dtype)
        _assert_close("lse[good]", lse[:, :, good], rlse[:, :, good], dtype)
        _assert_close("dq[good]", leaves[0].grad[:, good], ref[0].grad[:, good], dtype)
    else:
        _assert_close("o[good]", o[:, good], ro[:, good], dtype)
        _assert_close("dk[good]", leaves[1].grad[:, good], ref[1].grad[:, good], dtype)
        _assert_close("dv[good]", leaves[2].grad[:, good], ref[2].grad[:, good], dtype)
