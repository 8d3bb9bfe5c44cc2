"""The long-context engine (model/generation.py's KVCache, Qwen3VL.prefill, generate after a cached prefix).

Oracles: the one-shot forward of the whole prompt (itself checked against transformers in tests/test_model.py)
for chunked prefill, and transformers' `generate` on the whole prompt for generation after a cached, saved, loaded
and truncated prefix. fp32 on CPU: rtol = atol = 1e-5 (the chunked and one-shot passes run the same math in a
different op order; observed differences ~1e-6).
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from model import Qwen3VL, load_pretrained, preset
from model.generation import FP8, KVCache, dequantize_kv, quantize_kv
from tests.hf_reference import PAD, Sample, batch, hf_inputs, hf_model, hf_tiny_config

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Qwen3VL(preset("tiny")).eval()


def _vision(b: dict) -> dict:
    return {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask")}


def _prompt(seed=1):
    rng = torch.Generator().manual_seed(seed)
    # a video of 4 groups (16 tokens each), then an image and text: chunk sizes 3 / 7 / 16 cut through frames and
    # through the DeepStack positions of both
    return Sample(rng).text(5).video(4, 4, 4).text(3).image(4, 6).text(4)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 10_000])
def test_chunked_prefill_equals_one_shot_forward(tiny, chunk):
    b = batch([_prompt()])
    b.pop("attention_mask")
    ids = b["input_ids"]
    L = ids.shape[1]
    ref_cache = KVCache.for_model(tiny, 1, L)
    with torch.no_grad():
        ref = tiny(**b, past_key_values=ref_cache)
    cache = KVCache.for_model(tiny, 1, L + 5)
    out = tiny.prefill(ids, cache, chunk_size=chunk, **_vision(b))
    assert cache.length == L
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], **FP32)
    assert torch.equal(out.rope_deltas, ref.rope_deltas) and torch.equal(cache.rope_deltas, ref.rope_deltas)
    for i in range(len(cache.k)):
        torch.testing.assert_close(cache.k[i][:, :L], ref_cache.k[i], **FP32)
        torch.testing.assert_close(cache.v[i][:, :L], ref_cache.v[i], **FP32)


def test_prefill_in_slices_of_vision_groups_and_left_padded_batch(tiny):
    """A padded batch of two prompts, prefilled in chunks with the vision tower run 16 patch rows (one temporal
    group) at a time: same last logits and rope deltas as the one-shot forward."""
    rng = torch.Generator().manual_seed(2)
    b = batch([Sample(rng).text(3).video(3, 4, 4).text(2), Sample(rng).text(9).image(4, 4).text(1)])
    assert (b["attention_mask"] == 0).any()
    with torch.no_grad():
        ref = tiny(**b)
    cache = KVCache.for_model(tiny, 2, b["input_ids"].shape[1])
    out = tiny.prefill(b["input_ids"], cache, chunk_size=5, attention_mask=b["attention_mask"], vision_max_patches=16,
                       **_vision(b))
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], **FP32)
    assert torch.equal(out.rope_deltas, ref.rope_deltas)


def test_question_after_cached_video_equals_one_prompt(tiny):
    """Prefill the video part, then the question part (appended: positions continue from the cache): same last
    logits and rope deltas as one forward of video + question."""
    rng = torch.Generator().manual_seed(4)
    video = Sample(rng).text(4).video(3, 4, 4)
    n_prefix = len(video.ids)
    full = batch([video.text(6)])
    full.pop("attention_mask")
    with torch.no_grad():
        ref = tiny(**full)
    cache = KVCache.for_model(tiny, 1, 64)
    ids = full["input_ids"]
    tiny.prefill(ids[:, :n_prefix], cache, chunk_size=4, **_vision(full))
    out = tiny.prefill(ids[:, n_prefix:], cache, chunk_size=4)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], **FP32)
    assert torch.equal(out.rope_deltas, ref.rope_deltas)


def test_generation_after_saved_loaded_truncated_prefix_matches_transformers(tmp_path):
    """Index once, ask many: a video prefix is prefilled, saved, loaded and used for two questions (truncating back
    to the prefix between them); every answer is token-identical to transformers' greedy generate on the whole
    prompt, and to ours from scratch."""
    d = tmp_path / "ckpt"
    hf = hf_model(hf_tiny_config(64), seed=5)
    hf.save_pretrained(d)
    ours = load_pretrained(d).eval()
    rng = torch.Generator().manual_seed(6)
    prefix = Sample(rng).text(4).video(3, 4, 6)
    n_prefix = len(prefix.ids)
    pb = batch([prefix])
    cache = KVCache.for_model(ours, 1, n_prefix)
    ours.prefill(pb["input_ids"], cache, chunk_size=7, **_vision(pb))
    cache.save(tmp_path / "cache")
    loaded = KVCache.load(tmp_path / "cache", max_len=n_prefix + 64, model=ours)
    n_new = 12
    for q_seed in (7, 8):
        question = torch.randint(1000, 50000, (1, 5 + q_seed), generator=torch.Generator().manual_seed(q_seed))
        full = {**pb, "input_ids": torch.cat([pb["input_ids"], question], 1)}
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        with torch.no_grad():
            ref = hf.generate(**hf_inputs(full), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                              pad_token_id=PAD, eos_token_id=None)
        scratch = ours.generate(**full, max_new_tokens=n_new, stop_token_ids=())
        got = ours.generate(question, past_key_values=loaded.truncate(n_prefix), max_new_tokens=n_new,
                            stop_token_ids=())
        assert torch.equal(scratch, ref)
        assert torch.equal(got, ref[:, n_prefix:])


def test_fp8_cache_within_tolerance_of_bf16_cache(tiny):
    """FP8 (e4m3, one scale per token and KV head) vs a bf16 cache, bf16 model: last logits within 5% relative
    Frobenius error (observed 2.5-3% on this tiny random model, against 0.7% for bf16 vs fp32; e4m3 keeps 3
    mantissa bits), and the cache's dequantised keys within half an e4m3 step of the exact ones."""
    m = copy.deepcopy(tiny).to(torch.bfloat16)
    b = batch([_prompt(3)])
    b.pop("attention_mask")
    L = b["input_ids"].shape[1]
    exact = KVCache.for_model(m, 1, L)
    fp8 = KVCache.for_model(m, 1, L, dtype=FP8)
    a = m.prefill(b["input_ids"], exact, chunk_size=8, **_vision(b)).logits.float()
    q = m.prefill(b["input_ids"], fp8, chunk_size=8, **_vision(b)).logits.float()
    rel = ((q - a).norm() / a.norm()).item()
    assert 0 < rel < 0.05, rel
    assert fp8.k[0].dtype == FP8 and fp8.k_scale[0].shape == (1, L, exact.num_kv_heads)
    deq = dequantize_kv(fp8.k[0], fp8.k_scale[0], torch.float32)
    ref = exact.k[0].float()
    err = (deq - ref).abs() / ref.abs().amax(-1, keepdim=True)
    assert float(err.max()) <= 1 / 16 + 1e-6  # half an e4m3 step at the top binade: 2^-4 relative to the row max


def test_quantize_kv_round_trip_and_zero_rows():
    x = torch.randn(2, 5, 3, 16) * torch.logspace(-3, 3, 5).view(1, 5, 1, 1)
    x[0, 0, 0] = 0
    x8, s = quantize_kv(x)
    assert x8.dtype == FP8 and s.shape == (2, 5, 3)
    y = dequantize_kv(x8, s, torch.float32)
    assert torch.equal(y[0, 0, 0], torch.zeros(16))
    assert float(((y - x).abs() / x.abs().amax(-1, keepdim=True).clamp(min=1e-30)).max()) <= 1 / 16


def test_fp8_cache_saves_and_loads_bit_exact(tiny, tmp_path):
    b = batch([_prompt(5)])
    b.pop("attention_mask")
    L = b["input_ids"].shape[1]
    c = KVCache.for_model(tiny, 1, L, dtype=FP8)
    tiny.prefill(b["input_ids"], c, chunk_size=9, **_vision(b))
    c.save(tmp_path / "c")
    d = KVCache.load(tmp_path / "c", model=tiny)
    assert d.length == L and d.dtype == FP8
    for i in range(c.num_layers):
        assert torch.equal(d.k[i].view(torch.uint8), c.k[i].view(torch.uint8))
        assert torch.equal(d.v_scale[i], c.v_scale[i])
    assert torch.equal(d.rope_deltas, c.rope_deltas)


def test_bad_caches_are_refused_with_reasons(tiny, tmp_path):
    ids = torch.randint(1000, 5000, (1, 20))
    c = KVCache.for_model(tiny, 1, 20)
    tiny.prefill(ids, c, chunk_size=8)
    c.save(tmp_path / "c")
    # another model configuration (here: YaRN on, which changes every cached key)
    other = Qwen3VL(preset("tiny").replace(text=preset("tiny").text.__class__(
        **{**preset("tiny").text.__dict__, "rope": preset("tiny").text.rope.__class__(
            **{**preset("tiny").text.rope.__dict__, "rope_type": "yarn", "factor": 2.0,
               "original_max_position_embeddings": 64})})))
    with pytest.raises(ValueError, match="another configuration"):
        KVCache.load(tmp_path / "c", model=other)
    with pytest.raises(ValueError, match="another configuration"):
        other.prefill(ids, KVCache.load(tmp_path / "c", max_len=40), chunk_size=8)
    # a truncated layer file
    f = tmp_path / "c" / "layer_001.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="layer_001.safetensors is truncated or corrupt"):
        KVCache.load(tmp_path / "c")
    # token ids that do not match the fingerprint in cache.json
    c.save(tmp_path / "c2")
    meta = json.loads((tmp_path / "c2" / "cache.json").read_text())
    meta["prompt_sha256"] = "0" * 64
    (tmp_path / "c2" / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        KVCache.load(tmp_path / "c2")
    with pytest.raises(FileNotFoundError, match="cache.json missing"):
        KVCache.load(tmp_path / "nothing")
    # no room left, and truncation out of range
    with pytest.raises(ValueError, match="do not fit the cache"):
        tiny.prefill(ids, c, chunk_size=8)
    with pytest.raises(ValueError, match="truncate"):
        c.truncate(21)
    with pytest.raises(ValueError, match="room for"):
        tiny.generate(ids[:, :3], past_key_values=c, max_new_tokens=4)


def test_positions_past_native_context_warn_without_rope_scaling():
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "max_position_embeddings": 16}))
    m = Qwen3VL(cfg).eval()
    ids = torch.randint(1000, 5000, (1, 20))
    with pytest.warns(UserWarning, match="native context of 16 positions"):
        m.prefill(ids, KVCache.for_model(m, 1, 20), chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.prefill(ids[:, :10], KVCache.for_model(m, 1, 10), chunk_size=8)


def test_convert_bf16_cache_to_fp8_equals_fp8_of_the_same_keys(tiny):
    ids = torch.randint(1000, 5000, (1, 24))
    c = KVCache.for_model(tiny, 1, 30)
    tiny.prefill(ids, c, chunk_size=8)
    exact_k = c.k[1][:, :24].clone()
    c.convert(FP8)
    assert c.dtype == FP8 and c.k[1].dtype == FP8
    k8, ks = quantize_kv(exact_k)
    assert torch.equal(c.k[1][:, :24].view(torch.uint8), k8.view(torch.uint8)) and torch.equal(c.k_scale[1][:, :24], ks)
    out = tiny.generate(torch.randint(1000, 5000, (1, 3)), past_key_values=c, max_new_tokens=3, stop_token_ids=())
    assert out.shape == (1, 6)


def test_generate_checks_its_arguments_and_grows_its_own_cache(tiny, monkeypatch):
    ids = torch.randint(1000, 5000, (1, 6))
    for kw, msg in (({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
                    ({"do_sample": True, "top_p": 0.0}, "top_p"), ({"do_sample": True, "top_k": -2}, "top_k"),
                    ({"do_sample": True, "temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=msg):
            tiny.generate(ids, **kw)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate(ids[:, :0], max_new_tokens=2)
    padded = torch.cat([torch.full((1, 3), tiny.config.pad_token_id), ids[:, :3]], 1)
    with pytest.warns(UserWarning, match="no attention_mask"):
        tiny.generate(torch.cat([padded, ids]), max_new_tokens=1)
    # a cache grown (doubled) several times from 4 free tokens gives the same tokens as one sized up front
    import model.generation as generation

    monkeypatch.setattr(generation, "INITIAL_FREE_TOKENS", 4)
    grows = []
    monkeypatch.setattr(KVCache, "grow", lambda self, n, _grow=KVCache.grow: grows.append(n) or _grow(self, n))
    a = tiny.generate(ids, max_new_tokens=40, stop_token_ids=())
    assert grows == [20, 40, 46]  # 6 + 4 -> 20 -> 40 -> 46 (capped at the prompt + max_new_tokens)
    big = KVCache.for_model(tiny, 1, 6 + 40)
    b = tiny.generate(ids, max_new_tokens=40, stop_token_ids=(), past_key_values=big)
    assert a.shape == b.shape == (1, 46) and torch.equal(a, b)


_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton-interpreter test (CPU tensors)")


@_CPU_ONLY
@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["exact", "fp8"])
def test_triton_backend_chunked_prefill_and_generation_match_torch(tiny, cache_dtype):
    """attn_backend triton (the Triton interpreter here): chunked prefill (bottom-right causal chunks over the
    cache; FP8 dequantised inside the kernels) and generation after it give the torch backend's logits and tokens."""
    tri = Qwen3VL(tiny.config.replace(attn_backend="triton")).eval()
    tri.load_state_dict(tiny.state_dict())
    b = batch([_prompt(7)])
    b.pop("attention_mask")
    L = b["input_ids"].shape[1]
    outs = []
    for m in (tiny, tri):
        c = KVCache.for_model(m, 1, L + 8, cache_dtype)
        logits = m.prefill(b["input_ids"], c, chunk_size=13, **_vision(b)).logits
        tokens = m.generate(torch.tensor([[1234, 2345]]), past_key_values=c, max_new_tokens=4, stop_token_ids=())
        outs.append((logits, tokens))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1][1], outs[0][1])


def _static_vs_eager(m, cache_dtype, graph, steps=4, device="cpu"):
    """Logits of `steps` decode steps: StaticDecoder (whole preallocated cache, device-side length) vs eager."""
    from model.generation import StaticDecoder

    torch.manual_seed(1)
    ids = torch.randint(1000, 5000, (2, 30), device=device)
    out = []
    for static in (False, True):
        c = KVCache.for_model(m, 2, 30 + steps + 3, cache_dtype)
        m.prefill(ids, c, chunk_size=16)
        dec = StaticDecoder(m, c, graph=graph) if static else None
        logits = []
        tok = torch.randint(1000, 5000, (2, steps), generator=torch.Generator().manual_seed(2)).to(device)
        with torch.no_grad():
            for s in range(steps):
                pos = c.next_position.view(1, 2, 1).expand(3, 2, 1)
                if dec is not None:
                    logits.append(dec.step(tok[:, s:s + 1], pos).clone())
                else:
                    logits.append(m(tok[:, s:s + 1], position_ids=pos, past_key_values=c, logits_to_keep=1).logits)
        if dec is not None:
            dec.close()
        out.append((torch.cat(logits, 1), c))
    return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=_CPU_ONLY)])
@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["exact", "fp8"])
def test_static_decode_step_equals_eager_decoding(tiny, backend, cache_dtype):
    """The static decode step (StaticDecoder without a graph on CPU: whole preallocated cache read with the valid
    length as a device tensor, K/V written at a device-side position) gives eager decoding's logits and cache."""
    m = Qwen3VL(tiny.config.replace(attn_backend=backend)).eval()
    m.load_state_dict(tiny.state_dict())
    (a, ca), (b, cb) = _static_vs_eager(m, cache_dtype, graph=False)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert ca.length == cb.length and torch.equal(ca.next_pos, cb.next_pos)
    # layer 0's new keys come from the same embeddings: bit-equal, written at the same positions; deeper layers
    # differ by the attention's summation order (1e-7 in fp32; an FP8 rounding may flip there)
    x, y = ca.k[0][:, :ca.length], cb.k[0][:, :cb.length]
    assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if cache_dtype == FP8 else torch.equal(x, y)
    if cache_dtype is None:
        for i in range(1, ca.num_layers):
            torch.testing.assert_close(cb.v[i][:, :cb.length], ca.v[i][:, :ca.length], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["exact", "fp8"])
def test_cuda_graph_decode_equals_eager_decoding_gpu(cache_dtype):
    torch.manual_seed(0)
    m = Qwen3VL(preset("tiny", attn_backend="triton")).cuda().eval()
    (a, _), (b, _) = _static_vs_eager(m, cache_dtype, graph=True, steps=6, device="cuda")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@_CPU_ONLY
def test_decode_kernel_reads_valid_length_from_device():
    """kernels.attention.attention(kv_length=): rows of a preallocated cache with different valid lengths equal
    attention over each row's valid prefix (queries at its end)."""
    from kernels.attention import attention, attention_naive

    g = torch.Generator().manual_seed(0)
    B, Lmax, hq, hkv, d = 2, 1200, 4, 2, 32
    q = torch.randn(B, 1, hq, d, generator=g)
    k = torch.randn(B, Lmax, hkv, d, generator=g)
    v = torch.randn(B, Lmax, hkv, d, generator=g)
    k[:, 1100:] = float("nan")  # nothing past the valid length may be read into the result
    v[:, 1100:] = float("nan")
    n = torch.tensor([1030, 1099], dtype=torch.int32)
    o = attention(q, k, v, causal=True, kv_length=n)
    for b in range(B):
        ref = attention_naive(q[b:b + 1], k[b:b + 1, :n[b]], v[b:b + 1, :n[b]], causal=True)
        torch.testing.assert_close(o[b:b + 1], ref.to(o.dtype), rtol=1e-5, atol=1e-5)
