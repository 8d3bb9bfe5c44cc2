"""The attention mask description (model/masks.py) and the attention backends that render it (model/attention.py).

- `AttentionMask.dense` against a hand-written loop over (batch, query, key), for every feature alone and combined;
  its FlexAttention `mask_mod`, evaluated point by point, against `dense`.
- The backends on the same mask: `torch` (SDPA) and `flex` (FlexAttention, eager on CPU) against the fp32 reference
  of kernels/attention/naive.py (fp32 tolerance 1e-5: summation order only), and flex against torch inside the tiny
  model (padded and packed batches, with the vision tower's per-frame documents).
- A mask a backend cannot run raises and names the backend and the feature; the model routes padded batches of the
  triton backend to SDPA explicitly (the decoder then computes exactly what the torch backend computes).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from kernels.attention.naive import attention_naive
from model import Qwen3VL, preset
from model.attention import attend
from model.masks import AttentionMask
from tests.hf_reference import Sample, batch

SEED = 1234


def _loop_mask(lq, lk, *, causal=False, window=None, num_global=0, global_queries=False, bounds=None,
               key_padding=None):
    """The visibility rule written out element by element: (B, Lq, Lk) bool."""
    n_batch = 1 if key_padding is None else key_padding.shape[0]
    bounds = [0, lk] if bounds is None else bounds
    out = torch.zeros(n_batch, lq, lk, dtype=torch.bool)
    for b in range(n_batch):
        for i in range(lq):
            p = lk - lq + i  # bottom-right aligned
            for j in range(lk):
                doc_p = max(d for d in range(len(bounds) - 1) if bounds[d] <= max(p, 0))
                doc_j = max(d for d in range(len(bounds) - 1) if bounds[d] <= j)
                if doc_p != doc_j:
                    continue
                pp, jj = p - bounds[doc_p], j - bounds[doc_j]
                if causal and jj > pp:
                    continue
                if window is not None and not (abs(pp - jj) < window or jj < num_global
                                               or (global_queries and pp < num_global)):
                    continue
                if key_padding is not None and not key_padding[b, j] and j != p:
                    continue
                out[b, i, j] = True
    return out


FEATURES = dict(causal=dict(causal=True), window=dict(window=3), global_keys=dict(window=3, num_global=2),
                global_queries=dict(window=3, num_global=2, global_queries=True))
COMBOS = [{}] + [v for v in FEATURES.values()] + [dict(causal=True, window=3, num_global=2),
                                                  dict(causal=True, window=2, num_global=1, global_queries=True)]


def _ids(combo):
    return "-".join(f"{k}={v}" for k, v in combo.items()) or "full"


@pytest.mark.parametrize("lq,lk", [(7, 7), (3, 9), (1, 6)], ids=["square", "cache-3of9", "decode-1of6"])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_dense_matches_loop(combo, lq, lk):
    torch.manual_seed(SEED)
    got = AttentionMask(**combo).dense(lq, lk)
    assert got.shape == (lq, lk)
    assert torch.equal(got, _loop_mask(lq, lk, **combo)[0])


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_dense_documents_match_loop(combo):
    bounds = [0, 4, 5, 11, 14]
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = AttentionMask(cu_seqlens=cu, **combo).dense(14, 14)
    assert torch.equal(got, _loop_mask(14, 14, bounds=bounds, **combo)[0])


@pytest.mark.parametrize("lq,lk", [(6, 6), (2, 8)], ids=["prefill", "cache-2of8"])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_dense_key_padding_matches_loop(combo, lq, lk):
    g = torch.Generator().manual_seed(SEED)
    key_padding = torch.rand(3, lk, generator=g) > 0.4
    key_padding[0, :3] = False  # left padding, as a batch of prompts has it
    got = AttentionMask(key_padding=key_padding, **combo).dense(lq, lk)
    assert got.shape == (3, 1, lq, lk)
    assert torch.equal(got[:, 0], _loop_mask(lq, lk, key_padding=key_padding, **combo))
    assert got.any(-1).all(), "every query row sees at least itself"


@pytest.mark.parametrize("documents", [False, True], ids=["one-sequence", "documents"])
def test_mask_mod_pointwise_matches_dense(documents):
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32) if documents else None
    kp = None if documents else torch.tensor([[False, True, True, True, True, True, True, True, True, True],
                                              [True] * 10])
    lq = 10 if documents else 4
    mask = AttentionMask(causal=True, window=3, num_global=1, cu_seqlens=cu, key_padding=kp)
    dense = mask.dense(lq, 10)
    dense = dense if kp is not None else dense[None, None]
    mod = mask.mask_mod(lq, 10)
    for b, i, j in itertools.product(range(dense.shape[0]), range(lq), range(10)):
        got = mod(torch.tensor(b), torch.tensor(0), torch.tensor(i), torch.tensor(j))
        assert bool(got) == bool(dense[b, 0, i, j]), (b, i, j)


def test_mask_validation_and_features():
    with pytest.raises(ValueError, match="window"):
        AttentionMask(window=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        AttentionMask(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), key_padding=torch.ones(1, 3, dtype=bool))
    with pytest.raises(ValueError, match="int32"):
        AttentionMask(cu_seqlens=torch.tensor([0, 3]))
    assert AttentionMask(causal=True, num_global=4).features() == ("causal",)  # globals refine a window only
    assert AttentionMask(window=2, num_global=1, global_queries=True).features() == (
        "window", "global keys", "global queries")


# ------------------------------------------------------------------ backends on one mask
def _qkv(lq, lk, hq=4, hkv=2, d=16, batch=2, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, hq, d, generator=g), torch.randn(batch, lk, hkv, d, generator=g),
            torch.randn(batch, lk, hkv, d, generator=g))


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("lq,lk", [(9, 9), (4, 11)], ids=["square", "cache-4of11"])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_backend_matches_reference(combo, lq, lk, backend):
    """torch (SDPA, dense mask when needed) and flex against the fp32 reference, whose mask is the same rule."""
    q, k, v = _qkv(lq, lk)
    got = attend(q, k, v, AttentionMask(**combo), backend=backend)
    torch.testing.assert_close(got, attention_naive(q, k, v, **combo), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("n_docs", [1, 3, 20], ids=["one-doc", "few-docs", "many-docs"])
@pytest.mark.parametrize("combo", [{}, dict(causal=True), dict(causal=True, window=3, num_global=1)], ids=_ids)
def test_backend_documents_match_reference(combo, n_docs, backend):
    """Packed documents through every SDPA path (one call, per-document loop, one block-diagonal masked call)."""
    g = torch.Generator().manual_seed(SEED + n_docs)
    lengths = torch.randint(1, 9, (n_docs,), generator=g).tolist()
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    q, k, v = (x[0] for x in _qkv(sum(lengths), sum(lengths), batch=1, seed=SEED + n_docs))
    got = attend(q, k, v, AttentionMask(cu_seqlens=cu, **combo), backend=backend)
    torch.testing.assert_close(got, attention_naive(q, k, v, cu_seqlens=cu, **combo), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lq,lk", [(6, 6), (1, 9)], ids=["prefill", "decode-1of9"])
def test_flex_matches_torch_with_key_padding(lq, lk):
    q, k, v = _qkv(lq, lk, batch=3)
    kp = torch.ones(3, lk, dtype=torch.bool)
    kp[0, :4], kp[1, :1] = False, False  # left padding
    mask = AttentionMask(causal=True, key_padding=kp)
    torch.testing.assert_close(attend(q, k, v, mask, backend="flex"), attend(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_gradients_match_torch():
    q, k, v = (x.cuda() for x in _qkv(7, 7))
    mask = AttentionMask(causal=True, window=3, num_global=1)
    grads = []
    for backend in ("torch", "flex"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attend(*leaves, mask, backend=backend).square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        # fp32 on the GPU, O(1) gradients: the two backends reduce in different orders (flex's unfused path
        # materialises the scores, SDPA tiles them); 1.3e-5 absolute was measured on an H200
        torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)


def test_triton_backend_sends_vision_calls_to_sdpa():
    """On a GPU, `triton` runs non-causal calls over one document or equal-length documents (the vision tower's
    frames) through SDPA, which is faster there; unequal documents, causal masks, CPU tensors and an unknown
    max_seqlen stay on the kernel. The SDPA route equals the reference (its batched view of the packed row is
    exercised on CPU by forcing the predicate)."""
    import model.attention as ma

    class Cuda:  # stands in for a CUDA tensor: only .is_cuda and .shape are read
        is_cuda, shape = True, (12, 4, 16)

    cu_eq, cu_uneq = torch.tensor([0, 4, 8, 12], dtype=torch.int32), torch.tensor([0, 3, 8, 12], dtype=torch.int32)
    assert ma._sdpa_is_faster(Cuda(), AttentionMask(cu_seqlens=cu_eq, max_seqlen=4))
    assert ma._sdpa_is_faster(Cuda(), AttentionMask())
    assert not ma._sdpa_is_faster(Cuda(), AttentionMask(cu_seqlens=cu_uneq, max_seqlen=5))
    assert not ma._sdpa_is_faster(Cuda(), AttentionMask(cu_seqlens=cu_eq))          # max_seqlen unknown
    assert not ma._sdpa_is_faster(Cuda(), AttentionMask(cu_seqlens=cu_eq, max_seqlen=4, causal=True))
    assert not ma._sdpa_is_faster(torch.zeros(12, 4, 16), AttentionMask(cu_seqlens=cu_eq, max_seqlen=4))
    q, k, v = (x[0] for x in _qkv(12, 12, batch=1))
    ma._sdpa_is_faster, real = (lambda q, mask: True), ma._sdpa_is_faster
    try:
        got = attend(q, k, v, AttentionMask(cu_seqlens=cu_eq, max_seqlen=4), backend="triton")
        one = attend(q[None], k[None], v[None], AttentionMask(), backend="triton")[0]
    finally:
        ma._sdpa_is_faster = real
    torch.testing.assert_close(got, attention_naive(q, k, v, cu_seqlens=cu_eq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, attention_naive(q[None], k[None], v[None])[0], rtol=1e-5, atol=1e-5)


def test_triton_backend_refuses_key_padding():
    q, k, v = _qkv(3, 5)
    mask = AttentionMask(causal=True, key_padding=torch.tensor([[False, True, True, True, True]] * 2))
    with pytest.raises(NotImplementedError, match=r"'triton'.*key padding"):
        attend(q, k, v, mask, backend="triton")
    with pytest.raises(TypeError, match="AttentionMask"):
        attend(q, k, v, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, k, v, mask, backend="cudnn")


# ------------------------------------------------------------------ inside the model
def _model(backend):
    torch.manual_seed(0)
    return Qwen3VL(preset("tiny", attn_backend=backend)).eval()


def test_flex_backend_in_model_matches_torch():
    """The tiny model with attn_backend=flex: a left-padded batch with an image (causal + key padding in the
    decoder, per-image documents in the vision tower) and a packed batch of two documents, same logits as torch."""
    ref, flex = _model("torch"), _model("flex")
    flex.load_state_dict(ref.state_dict())
    rng = torch.Generator().manual_seed(SEED)
    padded = batch([Sample(rng).text(3).image(4, 4).text(2), Sample(rng).text(4)])
    assert not bool(padded["attention_mask"].all())
    with torch.no_grad():
        torch.testing.assert_close(flex(**padded).logits, ref(**padded).logits, rtol=1e-5, atol=1e-5)
        ids = torch.randint(1000, 50000, (1, 11), generator=rng)
        cu = torch.tensor([0, 5, 11], dtype=torch.int32)
        torch.testing.assert_close(flex(ids, cu_seqlens=cu).logits, ref(ids, cu_seqlens=cu).logits,
                                   rtol=1e-5, atol=1e-5)


def test_triton_model_routes_padded_batch_to_sdpa():
    """attn_backend=triton with a left-padded text batch: the kernels lack key padding, so Qwen3VL runs the decoder
    through SDPA by name; its logits are exactly the torch backend's (same calls), for prefill and a decode step."""
    ref, tri = _model("torch"), _model("triton")
    tri.load_state_dict(ref.state_dict())
    rng = torch.Generator().manual_seed(SEED)
    b = batch([Sample(rng).text(6), Sample(rng).text(3)])
    with torch.no_grad():
        assert torch.equal(tri(**b).logits, ref(**b).logits)
        out_ref = ref.generate(b["input_ids"], b["attention_mask"], max_new_tokens=3)
        out_tri = tri.generate(b["input_ids"], b["attention_mask"], max_new_tokens=3)
    assert torch.equal(out_tri, out_ref)
