"""Tests of the block-sparse attention kernel (`kernels.attention.sparse_attention`).

The kernel is compared with its fp32 reference (`sparse_attention_reference`: dense scores masked by the expanded
block mask and the causal rule) on random block masks, and with the dense reference of kernels/attention/naive.py
when every block is selected; the sparse reference itself is checked against a loop over query rows written
from the definition. Shapes are tiny on purpose (CPU: the Triton interpreter) and awkward: lengths that are not
multiples of the blocks, Lq < Lk (a chunk of queries after a KV cache, bottom-right aligned), GQA 8/1 and 16/8,
rows with no selected block. Every kernel output starts as NaN, so an unwritten element fails.

Tolerances (max abs error / max(1, the reference's max magnitude)), as tests/test_attention_kernel.py:
fp32 1e-4 (ieee dots, summation order only), fp16 5e-3 (P rounded to fp16 before the PV product, output rounding).
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import attention_naive, sparse_attention, sparse_attention_reference

from .test_attention_kernel import DEVICE, TOL, _poison_outputs  # noqa: F401 (autouse: unwritten outputs are NaN)


def _close(got, ref, dtype, what="o"):
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten element)"
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    assert err <= TOL[dtype], f"{what}: relative max error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def _inputs(B, lq, lk, hq, hkv, d, dtype):
    q = torch.randn(B, lq, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(B, lk, hkv, d, dtype=dtype, device=DEVICE)
    v = torch.randn(B, lk, hkv, d, dtype=dtype, device=DEVICE)
    return q, k, v


def _mask(B, h, lq, lk, bm, bn, p=0.5):
    return torch.rand(B, h, math.ceil(lq / bm), math.ceil(lk / bn), device=DEVICE) < p


CASES = {  # B, Lq, Lk, Hq, Hkv, D, (bm, bn), causal, dtype
    "causal-b16-ragged": (2, 45, 45, 2, 2, 16, (16, 16), True, torch.float32),
    "causal-gqa8/1-lq<lk": (1, 19, 83, 8, 1, 16, (16, 32), True, torch.float32),
    "causal-gqa16/8-fp16": (1, 40, 40, 16, 8, 16, (32, 16), True, torch.float16),
    "noncausal-lq<lk-d24": (1, 21, 50, 4, 2, 24, (16, 16), False, torch.float16),
    "causal-b64-lq<lk": (1, 70, 150, 2, 1, 16, (64, 64), True, torch.float32),
    "causal-b128-ragged": (1, 150, 200, 2, 2, 16, (128, 128), True, torch.float16),
    # fp32 runs 64 x 32 kernel tiles (kernel_tiles): both mask blocks split into tiles
    "causal-b128x64-fp32-subtiled": (1, 150, 200, 4, 2, 16, (128, 64), True, torch.float32),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sparse_matches_reference(case):
    B, lq, lk, hq, hkv, d, bs, causal, dtype = CASES[case]
    q, k, v = _inputs(B, lq, lk, hq, hkv, d, dtype)
    mask = _mask(B, hq, lq, lk, *bs)
    mask[:, :, 0] = False  # some empty rows
    o, lse = sparse_attention(q, k, v, mask, block_size=bs, causal=causal, return_lse=True)
    ro, rlse = sparse_attention_reference(q, k, v, mask, block_size=bs, causal=causal, return_lse=True)
    _close(o, ro, dtype)
    inf = torch.isinf(rlse)
    assert torch.equal(torch.isinf(lse), inf), "rows that see nothing differ"
    _close(lse[~inf], rlse[~inf], dtype, "lse")
    assert (o[:, :bs[0]] == 0).all(), "a query block with no selected key block must return 0"


@pytest.mark.parametrize("case", ["causal-b16-ragged", "causal-gqa8/1-lq<lk", "noncausal-lq<lk-d24",
                                  "causal-b128-ragged", "causal-b128x64-fp32-subtiled"])
def test_all_blocks_is_dense_attention(case):
    B, lq, lk, hq, hkv, d, bs, causal, dtype = CASES[case]
    q, k, v = _inputs(B, lq, lk, hq, hkv, d, dtype)
    mask = torch.ones(B, hq, math.ceil(lq / bs[0]), math.ceil(lk / bs[1]), dtype=torch.bool, device=DEVICE)
    o = sparse_attention(q, k, v, mask, block_size=bs, causal=causal)
    _close(o, attention_naive(q, k, v, causal=causal), dtype)


def test_empty_mask_returns_zero():
    q, k, v = _inputs(1, 33, 33, 2, 1, 16, torch.float32)
    mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool, device=DEVICE)
    o, lse = sparse_attention(q, k, v, mask, block_size=(16, 16), return_lse=True)
    assert (o == 0).all() and torch.isinf(lse).all()


def test_reference_against_row_loop():
    """The sparse reference against a loop over (batch, head, query row) written from the definition."""
    B, lq, lk, hq, hkv, d, bm, bn = 1, 21, 45, 4, 2, 8, 16, 16
    q, k, v = _inputs(B, lq, lk, hq, hkv, d, torch.float32)
    mask = _mask(B, hq, lq, lk, bm, bn)
    ref = sparse_attention_reference(q, k, v, mask, block_size=(bm, bn), causal=True)
    want = torch.zeros_like(ref)
    for b in range(B):
        for h in range(hq):
            for i in range(lq):
                keys = [j for j in range(lk) if j <= lk - lq + i and mask[b, h, i // bm, j // bn]]
                if not keys:
                    continue
                kh, vh = k[b, keys, h // (hq // hkv)], v[b, keys, h // (hq // hkv)]
                p = torch.softmax(kh @ q[b, i, h] / math.sqrt(d), dim=0)
                want[b, i, h] = p @ vh
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)


def test_forward_only():
    q, k, v = _inputs(1, 16, 16, 2, 1, 16, torch.float32)
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError, match="forward only"):
        sparse_attention(q.requires_grad_(), k, v, mask, block_size=(16, 16))


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=(16, 48)), "block_size"),
    (dict(block_size=(256, 128)), "block_size"),
    (dict(mask_shape=(1, 2, 3, 2)), "block_mask must be"),
    (dict(mask_dtype=torch.uint8), "bool"),
    (dict(k_dtype=torch.float16), "dtypes differ"),
    (dict(hkv=3), "multiple"),
], ids=["block48", "block256", "mask-shape", "mask-dtype", "kv-dtype", "gqa-4/3"])
def test_bad_input(bad, match):
    hkv = bad.get("hkv", 1)
    q = torch.randn(1, 33, 4 if hkv == 3 else 2, 16)
    k = torch.randn(1, 33, hkv, 16, dtype=bad.get("k_dtype", torch.float32))
    v = torch.randn(1, 33, hkv, 16, dtype=bad.get("k_dtype", torch.float32))
    shape = bad.get("mask_shape", (1, q.shape[2], 3, 3))
    mask = torch.ones(shape, dtype=bad.get("mask_dtype", torch.bool))
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_attention(q, k, v, mask, block_size=bad.get("block_size", (16, 16)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size case: CUDA only")
@pytest.mark.parametrize("lq, lk, bs", [(4096, 4096, (128, 128)), (1000, 5000, (128, 128)), (3000, 3000, (64, 64))],
                         ids=["self-4096-b128", "chunk-after-cache-b128", "ragged-b64"])
def test_sparse_gpu_bf16(lq, lk, bs):
    """The 2B decoder's heads (16 / 8, head_dim 128) in bf16 at a few thousand tokens, random half of the blocks."""
    q, k, v = _inputs(1, lq, lk, 16, 8, 128, torch.bfloat16)
    mask = _mask(1, 16, lq, lk, *bs)
    _close(sparse_attention(q, k, v, mask, block_size=bs), sparse_attention_reference(q, k, v, mask, block_size=bs),
           torch.bfloat16)
