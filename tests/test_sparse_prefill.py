"""Block-sparse prefill in the model (model/sparsity.py through Qwen3VL.prefill and the needle suite's options).

With parameters that keep every block (XAttention threshold 1.0, a window longer than the prompt) the sparse
prefill must equal the dense one: the same last logits and the same KV cache, through chunks that attend to the
cache (Lq < Lk) and a video's tokens. A pattern that drops blocks must change the result (the option is really
applied), decoding steps (one query) stay dense, and the vision tower is not touched (its features, hence the
cached keys of the first chunk's visual tokens, are the same).
CPU: the kernels run through the Triton interpreter; tiny random model, fp32.
"""
from __future__ import annotations

import pytest
import torch

from model import Qwen3VL, preset
from model.attention import attend
from model.generation import KVCache
from model.masks import AttentionMask
from model.sparsity import SparsityConfig, as_sparsity
from tests.hf_reference import Sample, batch

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32: the interpreter's ieee dots vs SDPA, summation order only


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Qwen3VL(preset("tiny")).eval()


def _prompt():
    b = batch([Sample(torch.Generator().manual_seed(3)).text(7).video(2, 4, 4).text(20)])
    b.pop("attention_mask")
    return b


def _prefill(model, b, sparsity):
    ids = b["input_ids"]
    cache = KVCache.for_model(model, 1, ids.shape[1])
    media = {k: v for k, v in b.items() if k != "input_ids"}
    out = model.prefill(ids, cache, chunk_size=32, sparsity=sparsity, **media)
    return out.logits[:, -1], cache


@pytest.mark.parametrize("sparsity", [
    dict(method="xattention", block_size=16, min_queries=8, params={"threshold": 1.0, "stride": 4}),
    dict(method="window", block_size=16, min_queries=8, params={"window": 4096, "num_global": 0}),
], ids=["xattention-threshold1", "window-covers-all"])
def test_all_blocks_kept_equals_dense_prefill(tiny, sparsity):
    b = _prompt()
    ref_logits, ref_cache = _prefill(tiny, b, None)
    logits, cache = _prefill(tiny, b, sparsity)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    L = b["input_ids"].shape[1]
    for i in range(len(cache.k)):
        torch.testing.assert_close(cache.k[i][:, :L], ref_cache.k[i][:, :L], **TOL)


def test_dropping_blocks_changes_the_prefill(tiny):
    b = _prompt()
    ref_logits, ref_cache = _prefill(tiny, b, None)
    sparse = dict(method="window", block_size=16, min_queries=8, params={"window": 1, "num_global": 0})
    logits, cache = _prefill(tiny, b, sparse)
    assert not torch.allclose(logits, ref_logits, rtol=1e-3, atol=1e-3)
    # the first layer's keys come from the embeddings and the vision tower only: unchanged by the decoder's sparsity
    torch.testing.assert_close(cache.k[0], ref_cache.k[0], **TOL)


def test_decode_step_stays_dense():
    q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    cfg = SparsityConfig(method="window", block_size=16, min_queries=2, params={"window": 1})
    dense = attend(q, k, v, AttentionMask(causal=True))
    assert torch.equal(attend(q, k, v, AttentionMask(causal=True, sparsity=cfg)), dense)


def test_bad_sparsity_options():
    assert as_sparsity("none") is None and as_sparsity(None) is None
    with pytest.raises(ValueError, match="method"):
        as_sparsity("bigbird")
    with pytest.raises(ValueError, match="no parameter"):
        as_sparsity({"method": "window", "params": {"threshold": 0.9}})
    with pytest.raises(ValueError, match="block_size"):
        as_sparsity({"method": "xattention", "block_size": 100})


def test_needle_config_sparsity():
    from eval.niah import NeedleConfig
    from model.config import ConfigError

    cfg = NeedleConfig(chunk_size=64, sparsity="xattention", sparsity_params={"params": {"threshold": 0.9}})
    assert cfg.prefill_sparsity().params == {"threshold": 0.9}
    with pytest.raises(ConfigError, match="chunk_size"):
        NeedleConfig(sparsity="xattention")
    with pytest.raises(ConfigError, match="needle.sparsity"):
        NeedleConfig(chunk_size=64, sparsity="nope")
